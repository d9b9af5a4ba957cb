"""`python -m app config show [--json]` / `config check`: values, sources, masked secrets."""
from __future__ import annotations

import json

import pytest

from app.cli import main
from app.commands.config_cmd import MASK, mask


@pytest.fixture
def config_file(state_env):
    path = state_env / "config.toml"
    path.write_text('db = "/tmp/pw-test.db"\n[alerts]\nsmtp_password = "hunter2"\n'
                    'webhook_url = "https://hooks.example.test/services/T0/B0/SECRET"\n'
                    '[reports]\ntop_ports = 3\n')
    return path


def test_config_show_text(config_file, monkeypatch, capsys):
    monkeypatch.setenv("PORTWATCH_COLLECTOR_ROUND_SECONDS", "5")
    assert main(["config", "show", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# config file: {config_file}"
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines()[1:]}
    assert lines["reports.top_ports"].endswith(f"# file:{config_file}") and "= 3 " in lines["reports.top_ports"]
    assert "= 5.0 " in lines["collector.round_seconds"]
    assert lines["collector.round_seconds"].endswith("# env:PORTWATCH_COLLECTOR_ROUND_SECONDS")
    assert lines["collector.rounds"].endswith("# default")
    assert "hunter2" not in out and "SECRET" not in out
    assert f'"{MASK}"' in lines["alerts.smtp_password"]
    assert '"https://hooks.example.test/' in lines["alerts.webhook_url"]


def test_config_show_json(config_file, capsys):
    assert main(["config", "show", "--json", "--config", str(config_file), "--db", "/tmp/other.db"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_file"] == str(config_file)
    settings = data["settings"]
    assert settings["general.db"] == {"value": "/tmp/other.db", "source": "command line"}
    assert settings["alerts.smtp_password"]["value"] == MASK
    assert settings["retention.keep_days"] == {"value": 14.0, "source": "default"}
    assert "hunter2" not in json.dumps(data)


def test_config_check(config_file, capsys):
    assert main(["config", "check", "--config", str(config_file)]) == 0
    assert "configuration is valid" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("[reports]\ntop_ports = \"many\"\n", "config key 'reports.top_ports' must be int"),
    ("[reports]\ncolour = 1\n", "unknown config key 'reports.colour'"),
    ("[nosuch]\nx = 1\n", "unknown config section [nosuch]"),
    ("this is = = not toml\n", "is not valid TOML"),
])
def test_config_errors_name_the_key(state_env, capsys, text, message):
    bad = state_env / "bad.toml"
    bad.write_text(text)
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_config_without_action(state_env, capsys):
    assert main(["config"]) == 2
    assert "config needs an action" in capsys.readouterr().err


def test_mask():
    assert mask("alerts", "smtp_password", "x") == MASK and mask("alerts", "smtp_password", "") == ""
    assert mask("alerts", "smtp_password_file", "/run/secrets/smtp") == "/run/secrets/smtp"
    assert mask("alerts", "webhook_url", "http://127.0.0.1:8080/hook?token=abc") == f"http://127.0.0.1:8080/{MASK}"
    assert mask("alerts", "webhook_url", "https://example.test") == "https://example.test"
    assert mask("alerts", "smtp_user", "bob") == "bob"


@pytest.mark.parametrize("command", ["report", "status", "cleanup", "doctor", "install-cron", "config"])
def test_every_ops_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: portwatch {command}") and "exit codes:" in out


def test_config_check_reports_every_bad_value_at_once(state_env, capsys):
    path = state_env / "bad.toml"
    path.write_text('[collector]\nxdp_mode = "turbo"\nport_map_size = 0\nrounds = "three"\n'
                    '[evaluator]\nwindow = 0\n[blocklist]\nbase_ttl_seconds = -10\n'
                    'allowlist = ["not-a-cidr", "198.18.0.0/15", "fe80::1%eth0"]\n'
                    '[retention]\nkeep_days = -1\n[alerts]\nsmtp_port = 99999\n[colector]\nx = 1\n')
    assert main(["config", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "portwatch: error: 9 problems in the configuration:"
    where = f"(file:{path})"
    assert sorted(line.strip() for line in err[1:]) == sorted([
        f"unknown config section [colector] in {path}",
        f"config key 'collector.rounds' must be int, got 'three' {where}",
        f"config key 'collector.xdp_mode' = 'turbo' must be one of auto, native, generic {where}",
        f"config key 'collector.port_map_size' = 0 must be between 1 and 16777216 {where}",
        f"config key 'evaluator.window' = 0 must be between 2 and 10000 {where}",
        f"config key 'blocklist.base_ttl_seconds' = -10.0 must be above 0 and at most 31622400 {where}",
        "config key 'blocklist.allowlist' = ['not-a-cidr', '198.18.0.0/15', 'fe80::1%eth0'] holds entries that "
        "are not IPv4/IPv6 networks (ADDR or ADDR/LEN, host bits clear, no %zone): 'not-a-cidr', "
        f"'fe80::1%eth0' {where}",
        f"config key 'retention.keep_days' = -1.0 must be above 0 and at most 36600 {where}",
        f"config key 'alerts.smtp_port' = 99999 must be between 1 and 65535 {where}",
    ])


def test_config_check_names_the_environment_variable(state_env, monkeypatch, capsys):
    monkeypatch.setenv("PORTWATCH_EVALUATOR_WINDOW", "1")
    assert main(["config", "check"]) == 2
    assert capsys.readouterr().err.strip() == ("portwatch: error: config key 'evaluator.window' = 1 must be between "
                                               "2 and 10000 (env:PORTWATCH_EVALUATOR_WINDOW)")
