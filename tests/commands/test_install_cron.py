"""`python -m app install-cron`: writes what it says (parsed back) carrying the database, config,
interface and PORTWATCH_* settings it ran with; refuses bad input and non-root users; --systemd units;
the logrotate file (checked by logrotate -d); --uninstall. Every path is redirected into tmp_path:
nothing is written to /etc, nothing is enabled."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.config import REPO_ROOT
from tests.test_crontab import parse_crontab


@pytest.fixture
def paths(state_env):
    (state_env / "cron.d").mkdir()
    (state_env / "units").mkdir()
    (state_env / "logrotate.d").mkdir()
    return {"cron": state_env / "cron.d" / "portwatch", "units": state_env / "units",
            "rotate": state_env / "logrotate.d" / "portwatch", "logs": state_env / "logs"}


def _args(paths, *extra) -> list[str]:
    return ["install-cron", "--cron-file", str(paths["cron"]), "--unit-dir", str(paths["units"]),
            "--logrotate-file", str(paths["rotate"]), "--log-dir", str(paths["logs"]), *extra]


def _unquoted(command: str) -> list[str]:
    return shlex.split(command.replace("\\%", "%"))


def test_install_cron_writes_the_entries(paths, state_env, capsys, monkeypatch):
    monkeypatch.setenv("PORTWATCH_BLOCKLIST_DRY_RUN", "true")
    monkeypatch.setenv("PORTWATCH_ALERTS_WEBHOOK_URL", "http://198.18.0.1/hook?a=1&b=50%")
    assert main(["--db", str(state_env / "my.db"), *_args(paths, "--interface", "pwnoif0", "--user", "root")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {paths['cron']}:") and "user root" in out
    from app.commands.install_cron import AS_FLAGS
    carried = [k for k in os.environ if k.startswith("PORTWATCH_") and k not in AS_FLAGS]   # + state_env's
    assert f"database {state_env / 'my.db'}" in out and "interface pwnoif0" in out
    assert f"{len(carried)} PORTWATCH_* settings" in out and len(carried) >= 2
    assert paths["logs"].is_dir() and oct(paths["logs"].stat().st_mode & 0o777) == "0o700"
    assert oct(paths["cron"].stat().st_mode & 0o777) == "0o644"
    entries = parse_crontab(paths["cron"].read_text(), with_user=True)
    assert [e["schedule"] for e in entries] == [["*", "*", "*", "*", "*"], ["7", "*", "*", "*", "*"],
                                                ["23", "3", "*", "*", "*"]]
    python = str(Path(sys.prefix) / "bin" / "python")
    for entry in entries:
        assert entry["user"] == "root" and "50%" not in entry["command"]      # cron's '%' escaped
        words = _unquoted(entry["command"])
        assert words[:6] == ["umask", "077", "&&", "cd", str(REPO_ROOT), "&&"] and "flock" not in words
        assert python in words and os.path.isabs(python)
        assert "PORTWATCH_BLOCKLIST_DRY_RUN=true" in words
        assert "PORTWATCH_ALERTS_WEBHOOK_URL=http://198.18.0.1/hook?a=1&b=50%" in words
        assert words[words.index("--db") + 1] == str(state_env / "my.db")
        assert words[words.index("--config") + 1] == str(state_env / "none.toml")   # $PORTWATCH_CONFIG
        log_file = words[words.index(">>") + 1]
        assert log_file.startswith(str(paths["logs"]) + "/") and log_file.endswith(".log")
        assert not any(w.startswith(("PORTWATCH_DB=", "PORTWATCH_CONFIG=")) for w in words)   # flags instead
    collector, evaluator, cleanup = (_unquoted(e["command"]) for e in entries)
    assert str(REPO_ROOT / "app" / "port_collector.py") in collector
    assert collector[collector.index("--interface") + 1] == "pwnoif0" and "--interface" not in evaluator
    assert str(REPO_ROOT / "app" / "port_detector.py") in evaluator
    assert cleanup[cleanup.index(python) + 1:cleanup.index(python) + 4] == ["-m", "app", "cleanup"]
    for words in (collector, evaluator):
        script = next(w for w in words if w.endswith(".py"))
        assert Path(script).is_file()
    # the carried command really runs with those settings: the cleanup line through sh, as cron would
    # (cron unescapes '%'); the database it names does not exist, which its log must say
    subprocess.run(["sh", "-c", entries[2]["command"].replace("\\%", "%")], timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert str(state_env / "my.db") in (paths["logs"] / "cleanup.log").read_text()
    assert paths["rotate"].read_text().startswith("# portwatch job logs")


def test_install_cron_dry_run_writes_nothing(paths, capsys):
    assert main([*_args(paths, "--dry-run")]) == 0
    out = capsys.readouterr().out
    assert not paths["cron"].exists() and not paths["rotate"].exists() and not paths["logs"].exists()
    cron_part = out.split(f"# would write {paths['rotate']}")[0]
    assert cron_part.startswith(f"# would write {paths['cron']}")
    assert len(parse_crontab(cron_part, with_user=True)) == 3
    assert f"{paths['logs']}/*.log {{" in out


@pytest.mark.parametrize("argv, message", [
    (["--user", "pw-no-such-user"], "user 'pw-no-such-user' does not exist"),
    (["--user", "nobody"], "user 'nobody' is not root"),
    (["--cron-file", "/etc/cron.d/portwatch.cron"], "names contain a dot"),
    (["--cron-file", "/nonexistent-dir/portwatch"], "directory /nonexistent-dir does not exist"),
    (["--python", "/nonexistent/python"], "is not an executable python"),
])
def test_install_cron_errors(paths, capsys, argv, message):
    assert main([*_args(paths), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not paths["cron"].exists() and not paths["rotate"].exists()


def test_install_cron_needs_permission(paths, capsys, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(paths["cron"].parent))
    monkeypatch.setattr("tempfile.mkstemp", deny)
    assert main(_args(paths)) == 3
    assert "run install-cron as root" in capsys.readouterr().err


def test_systemd_units(paths, state_env, capsys, monkeypatch):
    monkeypatch.setenv("PORTWATCH_SNIFFER_ENABLED", "false")
    assert main(["--db", str(state_env / "my db.db"), *_args(paths, "--systemd", "--interface", "pwnoif0")]) == 0
    out = capsys.readouterr().out
    assert "systemctl enable --now portwatch-collector.timer portwatch-evaluator.timer portwatch-cleanup.timer" in out
    assert not paths["cron"].exists()
    names = sorted(p.name for p in paths["units"].iterdir())
    assert names == ["portwatch-cleanup.service", "portwatch-cleanup.timer", "portwatch-collector.service",
                     "portwatch-collector.timer", "portwatch-evaluator.service", "portwatch-evaluator.timer"]
    service = (paths["units"] / "portwatch-collector.service").read_text()
    assert "Type=oneshot" in service and "UMask=0077" in service
    assert "Environment=PORTWATCH_SNIFFER_ENABLED=false" in service
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert f'--db "{state_env / "my db.db"}"' in exec_start and "--interface pwnoif0" in exec_start
    assert f"StandardOutput=append:{paths['logs']}/collector.log" in service
    assert "OnCalendar=*-*-* *:07:00" in (paths["units"] / "portwatch-evaluator.timer").read_text()
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", *(str(p) for p in paths["units"].iterdir())],
                               capture_output=True, text=True, timeout=60)
        problems = [line for line in check.stderr.splitlines() if "portwatch-" in line]
        assert not problems, check.stderr
    assert main([*_args(paths, "--systemd", "--uninstall")]) == 0
    assert not any(paths["units"].iterdir()) and not paths["rotate"].exists()
    assert "removed 7 files" in capsys.readouterr().out


def test_uninstall_removes_only_what_it_wrote(paths, capsys):
    assert main(_args(paths)) == 0
    assert main([*_args(paths, "--uninstall", "--dry-run")]) == 0
    assert f"would remove {paths['cron']}" in capsys.readouterr().out and paths["cron"].exists()
    assert main([*_args(paths, "--uninstall")]) == 0
    assert not paths["cron"].exists() and not paths["rotate"].exists()
    assert main([*_args(paths, "--uninstall")]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    paths["cron"].write_text("* * * * * root /bin/true\n")          # someone else's file
    assert main([*_args(paths, "--uninstall")]) == 2
    assert "was not written by install-cron" in capsys.readouterr().err and paths["cron"].exists()


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is not installed (make setup installs it)")
def test_logrotate_file_is_valid(paths, tmp_path):
    assert main(_args(paths)) == 0
    log = paths["logs"] / "collector.log"
    log.write_text("a line\n" * 10)
    check = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(paths["rotate"])],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert f"considering log {paths['logs']}/*.log" in check.stderr or str(log) in check.stderr
    assert "error" not in check.stderr.lower()
    shipped = REPO_ROOT / "contrib" / "logrotate" / "portwatch"
    check = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state2"), str(shipped)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "error" not in check.stderr.lower(), check.stderr


def test_fleet_node_service(paths, state_env, capsys, monkeypatch, tmp_path):
    """--systemd --fleet-node: `python -m app fleet node` as a long-running service restarted on failure;
    the cron variant refuses it (a node is a daemon); a node that could not start is refused."""
    monkeypatch.setenv("PORTWATCH_FLEET_SUPERLINK", "198.18.80.1:9092")
    assert main([*_args(paths, "--fleet-node")]) == 2                       # cron: use systemd for it
    assert "--systemd --fleet-node" in capsys.readouterr().err
    assert not paths["cron"].exists() and not any(paths["units"].iterdir())
    assert main([*_args(paths, "--systemd", "--fleet-node")]) == 2          # no TLS CA: it would never start
    assert "fleet.ca_cert is not set" in capsys.readouterr().err and not any(paths["units"].iterdir())
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PORTWATCH_FLEET_CA_CERT", str(ca))
    db = state_env / "ports.db"
    assert main(["--db", str(db), *_args(paths, "--systemd", "--fleet-node")]) == 0
    out = capsys.readouterr().out
    assert "portwatch-cleanup.timer portwatch-fleet-node.service" in out
    unit = (paths["units"] / "portwatch-fleet-node.service").read_text()
    lines = unit.splitlines()
    assert "Type=simple" in lines and "Restart=on-failure" in lines and "WantedBy=multi-user.target" in lines
    assert not (paths["units"] / "portwatch-fleet-node.timer").exists()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert f"-m app fleet node --db {db} --config " in exec_start           # what this run was given
    assert f"Environment=PORTWATCH_FLEET_SUPERLINK=198.18.80.1:9092" in lines
    assert f"StandardOutput=append:{paths['logs']}/fleet-node.log" in lines
    # the unit's command is one the CLI accepts (argparse of `fleet node`, not run)
    from app.cli import build_parser
    argv = shlex.split(exec_start.split("=", 1)[1])
    assert argv[1:3] == ["-m", "app"]
    parsed = build_parser().parse_args(argv[3:])
    assert (parsed.command, parsed.action, parsed.db) == ("fleet", "node", str(db))
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(paths["units"] / "portwatch-fleet-node.service")],
                               capture_output=True, text=True, timeout=60)
        problems = [line for line in check.stderr.splitlines() if "portwatch-" in line]
        assert not problems, check.stderr
    assert main([*_args(paths, "--systemd", "--uninstall")]) == 0
    assert not any(paths["units"].iterdir())
    assert "removed 8 files" in capsys.readouterr().out


def test_cron_with_a_fleet_says_to_use_systemd_for_the_node(paths, capsys, monkeypatch):
    monkeypatch.setenv("PORTWATCH_FLEET_SUPERLINK", "198.18.80.1:9092")
    assert main(_args(paths)) == 0
    assert "install-cron --systemd --fleet-node" in capsys.readouterr().out
