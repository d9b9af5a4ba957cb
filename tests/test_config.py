"""app/config.py: defaults < TOML file < PORTWATCH_* environment; unknown keys and bad values are
reported by name; sources say where each value came from."""
from __future__ import annotations

import pytest

from app import config
from app.config import ConfigError, load


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path):
    settings = load(None, environ={"PORTWATCH_CONFIG": str(write(tmp_path, ""))})
    assert settings.retention.keep_days == 14.0 and settings.alerts.smtp_port == 587
    assert all(source == "default" for *_, source in settings.items())


def test_file_then_environment_override(tmp_path):
    path = write(tmp_path, 'db = "/tmp/a.db"\n[collector]\nround_seconds = 30\n[blocklist]\nallowlist = ["10.0.0.0/8"]\n')
    env = {"PORTWATCH_COLLECTOR_ROUND_SECONDS": "5", "PORTWATCH_ALERTS_SYSLOG": "yes",
           "PORTWATCH_BLOCKLIST_ALLOWLIST": "192.0.2.0/24, 198.51.100.0/24", "PORTWATCH_STATE_DIR": "/tmp/s"}
    s = load(path, environ=env)
    assert s.general.db == "/tmp/a.db" and s.sources["general.db"] == f"file:{path}"
    assert s.collector.round_seconds == 5.0
    assert s.sources["collector.round_seconds"] == "env:PORTWATCH_COLLECTOR_ROUND_SECONDS"
    assert s.alerts.syslog is True
    assert s.blocklist.allowlist == ["192.0.2.0/24", "198.51.100.0/24"]
    assert s.general.state_dir == "/tmp/s" and s.sources["general.state_dir"] == "env:PORTWATCH_STATE_DIR"
    assert s.config_path == str(path)


@pytest.mark.parametrize("text, message", [
    ("[collector]\nrounds = \"three\"\n", "config key 'collector.rounds' must be int, got 'three'"),
    ("[collector]\nround_seconds = true\n", "config key 'collector.round_seconds' must be float"),
    ("[alerts]\nsyslog = \"yes\"\n", "config key 'alerts.syslog' must be bool"),
    ("[reports]\nout_dir = 5\n", "config key 'reports.out_dir' must be str"),
    ("[blocklist]\nallowlist = \"10.0.0.0/8\"\n", "config key 'blocklist.allowlist' must be list"),
    ("[collector]\nround_secs = 5\n", "unknown config key 'collector.round_secs'"),
    ("dbpath = \"/x\"\n", "unknown config key 'dbpath'"),
    ("[colector]\nrounds = 1\n", "unknown config section [colector]"),
    ("[collector\n", "is not valid TOML"),
])
def test_bad_file_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), environ={})
    assert message in str(exc.value)


@pytest.mark.parametrize("env, message", [
    ({"PORTWATCH_COLLECTOR_ROUNDS": "x"}, "config key 'collector.rounds' must be int, got 'x'"),
    ({"PORTWATCH_ALERTS_SYSLOG": "maybe"}, "config key 'alerts.syslog' must be bool"),
    ({"PORTWATCH_RETENTION_KEEP_DAYZ": "3"}, "unknown environment setting PORTWATCH_RETENTION_KEEP_DAYZ"),
])
def test_bad_environment_values_are_named(tmp_path, env, message):
    env = dict(env, PORTWATCH_CONFIG=str(write(tmp_path, "")))
    with pytest.raises(ConfigError) as exc:
        load(None, environ=env)
    assert message in str(exc.value)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(None, environ={"PORTWATCH_CONFIG": str(tmp_path / "absent.toml")})


def test_ops_keys_exist_with_safe_defaults():
    s = config.Settings()
    assert s.alerts.smtp_password == "" and s.alerts.smtp_starttls is True
    assert s.alerts.max_seconds > 0 and s.alerts.cooldown_seconds > 0
    assert s.metrics.textfile_dir == "" and s.metrics.file_name.endswith(".prom")
    assert s.reports.since == "7d" and s.reports.top_ports > 0
    assert s.retention.keep_days == 14.0


def test_override_records_the_command_line():
    s = config.Settings()
    s.override("retention", "keep_days", 3.0)
    s.override("retention", "keep_days", None)     # None leaves it
    assert s.retention.keep_days == 3.0 and s.sources["retention.keep_days"] == "command line"
