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


# --- refuse bad input before it lands: exit code, one sentence, database byte-identical ---

def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lab_env(tmp_path, **more):
    return {"PORTWATCH_STATE_DIR": str(tmp_path / "state"), "PORTWATCH_RUN_DIR": str(tmp_path / "run"),
            "PORTWATCH_PIN_ROOT": str(tmp_path / "no-pins"), **more}


@pytest.fixture
def good_db(tmp_path):
    """A real portwatch database with one blocklist entry, every page on disk (no -wal left)."""
    db = tmp_path / "ports.db"
    from app.db.connection import connect
    connect(db).close()                         # made as collect makes it: `blacklist add` creates no database
    out = run("blacklist", "add", "198.18.0.50", "--ttl", "1h", "--db", str(db), env=lab_env(tmp_path))
    assert out.returncode == 0, out.stderr
    conn = connect(db)
    with conn:                                  # enough rows that the tables span many pages
        conn.execute("CREATE TABLE IF NOT EXISTS pw_filler(id INTEGER PRIMARY KEY, t TEXT)")
        conn.executemany("INSERT INTO pw_filler(t) VALUES (?)", [("x" * 300 + str(i),) for i in range(3000)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


@pytest.fixture
def corrupt_db(good_db, tmp_path):
    """A copy of a real database with bytes overwritten inside a b-tree page (the header stays valid)."""
    bad = tmp_path / "corrupt.db"
    data = bytearray(good_db.read_bytes())
    page = 4096
    start = len(data) - 40 * page + 64
    data[start:start + 2000] = b"\xff" * 2000
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("args", [
    ["evaluate"],
    ["blacklist", "add", "198.18.0.9"],
    ["blacklist", "remove", "198.18.0.50"],
    ["blacklist", "flush"],
    ["cleanup", "--keep-days", "1"],
])
def test_writers_refuse_a_corrupt_database_before_writing(corrupt_db, tmp_path, args):
    before = sha256(corrupt_db)
    out = run(*args, "--db", str(corrupt_db), env=lab_env(tmp_path))
    assert out.returncode == 4, out.stderr
    line = one_sentence(out.stderr)
    assert "is corrupt (quick_check:" in line and "portwatch did not change it" in line
    assert sha256(corrupt_db) == before
    assert not corrupt_db.with_name("corrupt.db-wal").exists()


@pytest.mark.parametrize("args, says", [
    (["blacklist", "add", "198.18.0.9", "--ttl", "1e308"], "--ttl must be at most 7d (604800 s), got '1e308'"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "nan"], "--ttl must be a finite duration like 90, 15m, 1h or 7d"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "inf"], "--ttl must be a finite duration"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "-5"], "--ttl must not be negative, got '-5'"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "0"], "--ttl must be above 0"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "8d"], "--ttl must be at most 7d"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "soon"], "--ttl must be a duration like 90, 15m, 1h or 7d"),
    (["blacklist", "add", "fe80::1%eth0"], "fe80::1%eth0 carries a zone"),
    (["blacklist", "remove", "fe80::1%eth0"], "fe80::1%eth0 carries a zone"),
    (["collect", "--round-seconds", "nan"], "argument --round-seconds: must be a finite duration"),
    (["collect", "--round-seconds", "inf"], "argument --round-seconds: must be a finite duration"),
    (["collect", "--round-seconds", "-1"], "argument --round-seconds: must not be negative"),
    (["run", "--evaluate-every", "nan"], "argument --evaluate-every: must be a finite duration"),
    (["collect", "--round-seconds", "1e12"], "argument --round-seconds: must be at most 1d (86400 s), got '1e12'"),
    (["run", "--round-seconds", "2d"], "argument --round-seconds: must be at most 1d (86400 s), got '2d'"),
    (["collect", "--rounds", "100000000000000"], "argument --rounds: must be between 0 and 1000000000"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "1e18"], "--ttl must be at most 7d (604800 s), got '1e18'"),
    (["blacklist", "add", "198.18.0.9", "--ttl", "1e11"], "--ttl must be at most 7d (604800 s), got '1e11'"),
    (["top", "--interval", "1e9"], "argument --interval: must be at most 1h (3600 s), got '1e9'"),
    (["top", "--count", "0"], "argument --count: must be between 1 and 1000000000, got 0"),
    (["model", "rollback", "99999999999999999999999"], "argument VERSION: must be between 1 and"),
    (["anomalies", "show", "99999999999999999999999"], "'99999999999999999999999' is not a finding id"),
    (["cleanup", "--keep-days", "1e300"], "--keep-days must be a number of days above 0 and at most 36500"),
    (["report", "--top-ports", "1000000000", "--out", "REPORTS"], "--top-ports must be 0 or more and at most 1000"),
    (["report", "--since", "nan", "--out", "REPORTS"], "--since 'nan' is neither"),
])
def test_bad_flags_are_one_sentence_and_change_nothing(good_db, tmp_path, args, says):
    before = sha256(good_db)
    args = [a.replace("REPORTS", str(tmp_path / "reports")) for a in args]
    out = run(*args, "--db", str(good_db), env=lab_env(tmp_path))
    assert out.returncode == 2, out.stderr
    errors = [l for l in out.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in out.stderr, out.stderr
    assert sha256(good_db) == before
    assert not (tmp_path / "reports").exists()


def test_durations_accept_units(good_db, tmp_path):
    for ttl, seconds in (("90", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)):
        out = run("blacklist", "add", "198.18.0.9", "--ttl", ttl, "--db", str(good_db), env=lab_env(tmp_path))
        assert out.returncode == 0, out.stderr
        conn = sqlite3.connect(good_db)
        created, expires = conn.execute("SELECT created_at, expires_at FROM blacklist WHERE address = "
                                        "'198.18.0.9/32'").fetchone()
        conn.close()
        assert abs((expires - created) - seconds) < 5, (ttl, expires - created)


@pytest.mark.parametrize("toml, key", [
    ("[evaluator]\nwindow = 0\n", "evaluator.window"),
    ("[collector]\nxdp_mode = \"turbo\"\n", "collector.xdp_mode"),
    ("[collector]\nport_map_size = 0\n", "collector.port_map_size"),
    ("[blocklist]\nbase_ttl_seconds = -10\n", "blocklist.base_ttl_seconds"),
    ("[blocklist]\nallowlist = [\"not-a-cidr\"]\n", "blocklist.allowlist"),
    ("[blocklist]\nallowlist = [\"fe80::1%eth0\"]\n", "blocklist.allowlist"),
    ("[retention]\nkeep_days = -1\n", "retention.keep_days"),
    ("[alerts]\nsmtp_port = 99999\n", "alerts.smtp_port"),
    ("[blocklist]\nbase_ttl_seconds = nan\n", "blocklist.base_ttl_seconds"),
])
@pytest.mark.parametrize("command", [["evaluate"], ["blacklist", "add", "198.18.0.9"], ["cleanup"]])
def test_bad_config_values_stop_every_writer_before_it_writes(good_db, tmp_path, toml, key, command):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    before = sha256(good_db)
    out = run(*command, "--db", str(good_db), "--config", str(cfg), env=lab_env(tmp_path))
    assert out.returncode == 2, out.stderr
    line = one_sentence(out.stderr)
    assert f"config key '{key}'" in line and f"file:{cfg}" in line
    assert sha256(good_db) == before


def test_non_utf8_config_is_one_sentence(good_db, tmp_path):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes("[alerts]\nmail_from = \"b\xe9atrice@example.org\"\n".encode("latin-1"))
    before = sha256(good_db)
    out = run("blacklist", "add", "198.18.0.9", "--db", str(good_db), "--config", str(cfg), env=lab_env(tmp_path))
    assert out.returncode == 2
    assert one_sentence(out.stderr) == (f"portwatch: error: config file {cfg} is not UTF-8 text (byte 0xe9 at "
                                        "offset 23): save it as UTF-8")
    assert sha256(good_db) == before


def test_an_out_of_range_setting_is_refused_naming_its_key(good_db, tmp_path):
    before = sha256(good_db)
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[blocklist]\nmax_ttl_seconds = 1e308\n")
    out = run("config", "check", "--config", str(cfg), "--db", str(good_db), env=lab_env(tmp_path))
    assert out.returncode == 2
    assert "config key 'blocklist.max_ttl_seconds' = 1e+308 must be above 0 and at most 31622400" in out.stderr
    out = run("blacklist", "add", "198.18.0.9", "--ttl", "1e18", "--config", str(cfg), "--db", str(good_db),
              env=lab_env(tmp_path))
    assert out.returncode == 2 and "blocklist.max_ttl_seconds" in one_sentence(out.stderr)
    out = run("collect", "--db", str(good_db), env=lab_env(tmp_path, PORTWATCH_COLLECTOR_ROUND_SECONDS="1e12"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert one_sentence(out.stderr) == ("portwatch: error: config key 'collector.round_seconds' = 1000000000000.0 must "
                                        "be above 0 and at most 86400 (env:PORTWATCH_COLLECTOR_ROUND_SECONDS)")
    assert sha256(good_db) == before


def test_readers_survive_a_stored_value_out_of_range(good_db, tmp_path):
    conn = sqlite3.connect(good_db)
    with conn:
        conn.execute("UPDATE blacklist SET expires_at = 1e18, created_at = -1e300")
    conn.close()
    before = sha256(good_db)
    out = run("blacklist", "list", "--db", str(good_db), env=lab_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "at 1e+18 s (out of range)" in out.stdout
    out = run("blacklist", "list", "--json", "--db", str(good_db), env=lab_env(tmp_path))
    assert out.returncode == 0 and __import__("json").loads(out.stdout)[0]["expires_at"] == 1e18
    out = run("report", "--out", str(tmp_path / "r"), "--since", "all", "--db", str(good_db), env=lab_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert sha256(good_db) == before


@pytest.mark.parametrize("args", [
    ["evaluate"], ["blacklist", "add", "198.18.0.9"], ["blacklist", "remove", "198.18.0.9"], ["blacklist", "flush"],
    ["allow", "add", "198.18.0.9"], ["allow", "remove", "198.18.0.9"], ["model", "rollback", "1"],
])
def test_writers_refuse_a_database_path_that_does_not_exist(tmp_path, args):
    db = tmp_path / "typo" / "ports.db"
    out = run(*args, "--db", str(db), env=lab_env(tmp_path))
    assert out.returncode == 4, out.stderr
    assert one_sentence(out.stderr) == (f"portwatch: error: database {db} does not exist: check --db (or general.db); "
                                        "only collect, run, replay and setup create a database")
    assert not db.parent.exists()


@pytest.mark.parametrize("args", [
    ["status"], ["anomalies", "list"], ["blacklist", "list"], ["allow", "list"], ["model", "list"],
    ["fleet", "status"], ["config", "show"],
])
def test_readers_create_no_file_beside_a_0644_database(good_db, tmp_path, args):
    good_db.chmod(0o644)
    beside = lambda: sorted(p.name for p in good_db.parent.iterdir() if p.name.startswith(good_db.name))  # noqa: E731
    before, digest = beside(), sha256(good_db)
    assert before == ["ports.db"]
    run(*args, "--db", str(good_db), env=lab_env(tmp_path))
    assert beside() == before                                            # no -wal, no -shm
    assert sha256(good_db) == digest


def test_blacklist_list_on_a_database_that_does_not_exist_says_so(tmp_path):
    db = tmp_path / "typo" / "ports.db"
    out = run("blacklist", "list", "--db", str(db), env=lab_env(tmp_path))
    assert out.returncode == 4 and one_sentence(out.stderr) == (
        f"portwatch: error: database {db} does not exist: check --db (or general.db); the blocklist ledger is kept "
        "in the database")
    assert not db.parent.exists()
