"""Errors a user can cause end in one sentence and a documented exit code, and change nothing."""
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args, env=None, user=None):
    cmd = [sys.executable, "-m", "app", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", *cmd]
    e = dict(os.environ, PORTWATCH_CONFIG="/dev/null", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=e, timeout=60)


def one_sentence(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.startswith("portwatch: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.kernel
def test_collect_without_root_says_so(tmp_path):
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to drop root for this test")
    tmp_path.chmod(0o777)
    out = run("collect", "--interface", "lo", "--db", str(tmp_path / "x.db"), user="nobody",
              env={"PORTWATCH_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 3
    assert "needs root" in one_sentence(out.stderr)
    assert not (tmp_path / "x.db").exists()


def test_corrupt_database_is_refused_and_left_alone(tmp_path):
    db = tmp_path / "ports.db"
    db.write_bytes(b"this is not a database" * 200)
    before = db.read_bytes()
    for args in (["status", "--db", str(db)], ["evaluate", "--db", str(db)], ["blacklist", "list", "--db", str(db)]):
        out = run(*args, env={"PORTWATCH_STATE_DIR": str(tmp_path / "state")})
        assert out.returncode == 4, (args, out.stderr)
        assert "corrupt" in one_sentence(out.stderr) or "not a database" in one_sentence(out.stderr)
    assert db.read_bytes() == before


def test_locked_database_is_reported_not_waited_on_forever(tmp_path, monkeypatch):
    from app.db import connection
    db = tmp_path / "ports.db"
    connection.connect(db).close()
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 300)
        from app.cli import main
        rc = main(["blacklist", "add", "198.18.0.9", "--db", str(db)])
    finally:
        holder.rollback()
        holder.close()
    assert rc == 4


def test_bad_address_and_bad_config_values(tmp_path, capsys):
    out = run("blacklist", "add", "198.18.0.300", "--db", str(tmp_path / "p.db"),
              env={"PORTWATCH_STATE_DIR": str(tmp_path / "state"), "PORTWATCH_PIN_ROOT": str(tmp_path / "pins")})
    assert out.returncode == 2 and "198.18.0.300" in one_sentence(out.stderr)
    out = run("status", "--db", str(tmp_path / "p.db"), env={"PORTWATCH_COLLECTOR_ROUND_SECONDS": "soon"})
    assert out.returncode == 2 and "collector.round_seconds" in one_sentence(out.stderr)
