"""`python -m app install-cron`: writes what it says (parsed back), refuses bad input."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.config import REPO_ROOT
from tests.test_crontab import parse_crontab


def test_install_cron_writes_the_entries(state_env, capsys):
    cron_file = state_env / "cron.d" / "portwatch"
    cron_file.parent.mkdir()
    logs = state_env / "logs"
    assert main(["install-cron", "--cron-file", str(cron_file), "--log-dir", str(logs), "--user", "root"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {cron_file}:") and "user root" in out
    assert logs.is_dir() and oct(logs.stat().st_mode & 0o777) == "0o700"
    assert oct(cron_file.stat().st_mode & 0o777) == "0o644"
    entries = parse_crontab(cron_file.read_text(), with_user=True)
    assert [e["schedule"] for e in entries] == [["*", "*", "*", "*", "*"], ["7", "*", "*", "*", "*"],
                                                ["23", "3", "*", "*", "*"]]
    python = str(Path(sys.prefix) / "bin" / "python")
    for entry in entries:
        assert entry["user"] == "root"
        words = shlex.split(entry["command"])
        assert words[:3] == ["umask", "077", "&&"] and "flock" not in words    # locks: general.run_dir
        assert python in words and os.path.isabs(python)
        assert words[-2] == ">>" or ">>" in words
        log_file = words[words.index(">>") + 1]
        assert log_file.startswith(str(logs) + "/") and log_file.endswith(".log")
    collector, evaluator, cleanup = (shlex.split(e["command"]) for e in entries)
    assert str(REPO_ROOT / "app" / "port_collector.py") in collector
    assert str(REPO_ROOT / "app" / "port_detector.py") in evaluator
    assert cleanup[3:6] == ["cd", str(REPO_ROOT), "&&"] and cleanup[-5:-3] == ["app", "cleanup"]
    for words in (collector, evaluator):
        script = next(w for w in words if w.endswith(".py"))
        assert Path(script).is_file()


def test_install_cron_dry_run_writes_nothing(state_env, capsys):
    target = state_env / "portwatch"
    assert main(["install-cron", "--dry-run", "--cron-file", str(target)]) == 0
    out = capsys.readouterr().out
    assert not target.exists()
    assert out.startswith(f"# would write {target}")
    assert len(parse_crontab(out, with_user=True)) == 3


@pytest.mark.parametrize("argv, message", [
    (["--user", "pw-no-such-user"], "user 'pw-no-such-user' does not exist"),
    (["--cron-file", "/etc/cron.d/portwatch.cron"], "names contain a dot"),
    (["--cron-file", "/nonexistent-dir/portwatch"], "directory /nonexistent-dir does not exist"),
    (["--python", "/nonexistent/python"], "is not an executable python"),
])
def test_install_cron_errors(state_env, capsys, argv, message):
    assert main(["install-cron", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_install_cron_needs_permission(state_env, capsys, monkeypatch):
    target = state_env / "ro" / "portwatch"
    target.parent.mkdir()

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target.parent))
    monkeypatch.setattr("tempfile.mkstemp", deny)
    assert main(["install-cron", "--cron-file", str(target), "--log-dir", str(state_env / "l")]) == 3
    assert "run install-cron as root" in capsys.readouterr().err
