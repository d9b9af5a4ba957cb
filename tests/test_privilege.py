"""Least privilege: an ordinary local user (created here, removed after) can neither read portwatch's
database (nor its -wal) nor block a run through a lock file; a configured group can read, others not."""
from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import LockedError

REPO = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("PW_TEST_PREFIX", "pwtt")[:4]

pytestmark = pytest.mark.kernel        # creating users and dropping to them needs root (under CI: must run)


def _run(*cmd, check=False):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture
def group():
    name = f"{PREFIX}grp"
    _run("groupdel", name)
    _run("groupadd", name, check=True)
    try:
        yield name
    finally:
        _run("groupdel", name)


@pytest.fixture
def user(group):
    """An unprivileged user (no home, no shell) and its member twin in ``group``; removed even on failure."""
    names = [f"{PREFIX}usr", f"{PREFIX}mem"]
    for name in names:
        _run("userdel", name)
        _run("groupdel", name)
    try:
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", names[0], check=True)
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, names[1], check=True)
        yield names[0]
    finally:
        for name in names:
            _run("userdel", name)
            _run("groupdel", name)             # the user's own group, where useradd made one
        left = [n for n in names if _run("getent", "passwd", n).returncode == 0]
        assert not left, f"test users left behind: {left}"


def as_user(name: str, *cmd, groups: bool = False):
    """Run ``cmd`` as ``name`` (its own primary group; its supplementary groups only with ``groups``)."""
    drop = ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups" if groups else "--clear-groups"]
    return _run(*drop, *cmd)


def open_world(tmp_path: Path) -> None:
    """Make the test's directories traversable by anyone: only portwatch's own modes may protect."""
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o005)


def portwatch(tmp_path, *args, env=None):
    e = dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=str(tmp_path / "db" / "ports.db"),
             PORTWATCH_STATE_DIR=str(tmp_path / "state"), PORTWATCH_RUN_DIR=str(tmp_path / "run"),
             PORTWATCH_PIN_ROOT=str(tmp_path / "no-pins"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=REPO,
                          env=e, timeout=120)


def make_database(tmp_path, env=None) -> Path:
    """A database written by the CLI (blacklist add: a writer), with a non-empty -wal kept open. Only
    collect, run and setup create a store, so it is made first as they make it: same settings, same modes."""
    made = subprocess.run([sys.executable, "-c", "from app import config\nfrom app.cli import secure_files\n"
                           "from app.db.connection import connect\n"
                           "s = config.load(); secure_files(s); connect(s.general.db).close()"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=str(tmp_path / "db" / "ports.db"),
                                   PORTWATCH_STATE_DIR=str(tmp_path / "state"), **(env or {})))
    assert made.returncode == 0, made.stderr
    out = portwatch(tmp_path, "blacklist", "add", "198.18.7.9", "--ttl", "1h", env=env)
    assert out.returncode == 0, out.stderr
    return tmp_path / "db" / "ports.db"


def test_ordinary_user_cannot_read_the_database_or_its_wal(tmp_path, user):
    db = make_database(tmp_path)
    holder = sqlite3.connect(db)                  # a run in progress: SQLite makes -wal/-shm like the database
    holder.execute("PRAGMA wal_autocheckpoint = 0")
    holder.execute("UPDATE blacklist SET reason = reason || ' (held)'")
    holder.commit()
    try:
        open_world(tmp_path)
        files = [db, db.with_name("ports.db-wal"), db.with_name("ports.db-shm")]
        assert all(f.exists() for f in files)
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        for f in files[:2]:
            out = as_user(user, "cat", str(f))
            assert out.returncode != 0 and "Permission denied" in out.stderr, (f, out)
        out = as_user(user, sys.executable, "-c", f"import sqlite3; sqlite3.connect('file:{db}?mode=ro', uri=True)"
                      ".execute('select * from blacklist').fetchall()")
        assert out.returncode != 0 and "unable to open" in out.stderr
        assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o700      # the directory it created
    finally:
        holder.close()


def test_group_members_read_the_database_others_do_not(tmp_path, user, group):
    db = make_database(tmp_path, env={"PORTWATCH_GROUP": group})
    open_world(tmp_path)
    st = db.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == __import__("grp").getgrnam(group).gr_gid
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o2750
    read = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from app.db.connection import connect; print(connect({str(db)!r}, readonly=True)"
            ".execute('select address from blacklist').fetchone()[0])"]
    member = as_user(f"{PREFIX}mem", *read, groups=True)
    assert member.returncode == 0 and "198.18.7.9/32" in member.stdout, member.stderr
    outsider = as_user(user, *read)
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr, outsider.stderr
    outsider = as_user(user, "cat", str(db))
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr


def test_ordinary_user_cannot_take_or_block_a_lock(tmp_path, user):
    from tests.helpers import make_settings
    from app.services import locks
    settings = make_settings(tmp_path)
    open_world(tmp_path)
    with locks.holding(settings, "collector-pwx0", "busy"):
        pass
    lock = locks.path(settings, "collector-pwx0")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert stat.S_IMODE(lock.parent.stat().st_mode) == 0o700
    # the user tries to hold it (shared lock through a read-only descriptor, as before the fix)
    out = as_user(user, "flock", "-n", "-s", str(lock), "true")
    assert out.returncode != 0 and "Permission denied" in out.stderr, out
    # root's run still gets its lock
    held = locks.hold(settings, "collector-pwx0", "busy")
    try:
        with pytest.raises(LockedError, match="busy"):            # and a second holder is refused
            locks.hold(settings, "collector-pwx0", "busy")
    finally:
        held.close()


def test_ordinary_user_cannot_take_or_block_an_interface_lock(user):
    """The interface lock (collect, --takeover, down) lives at a fixed root-only place."""
    from app.services import locks
    name = f"{PREFIX}lk0"
    with locks.hold_interface(name, "busy"):
        lock = locks.interface_path(name)
        assert lock.parent == locks.INTERFACE_DIR == Path("/run/portwatch/interfaces")
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and stat.S_IMODE(lock.parent.stat().st_mode) == 0o700
        out = as_user(user, "flock", "-n", "-s", str(lock), "true")
        assert out.returncode != 0 and "Permission denied" in out.stderr, out
        with pytest.raises(LockedError, match="busy"):
            locks.hold_interface(name, "busy")
    lock.unlink()


def test_before_the_fix_a_0644_lock_let_a_user_block_root(tmp_path, user):
    """The control: the old lock (0644 in a world-traversable dir) can be flock'ed read-only by anyone."""
    open_world(tmp_path)
    old = tmp_path / "old-collector.lock"
    old.write_text("")
    old.chmod(0o644)
    blocker = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                                "flock", "-s", str(old), "sleep", "20"], start_new_session=True)
    try:
        with open(old, "w") as fh:
            for _ in range(100):                       # until the user's flock holds it (bounded: 10 s)
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    __import__("time").sleep(0.1)
                except BlockingIOError:
                    break
            else:
                pytest.fail("the user never got the old lock")
    finally:
        os.killpg(blocker.pid, 9)               # flock and its sleep: the user must have no process left
        blocker.wait()


def test_run_dir_and_lock_files_are_tightened(tmp_path):
    from tests.helpers import make_settings
    from app.services import locks
    settings = make_settings(tmp_path)
    run = Path(settings.general.run_dir)
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    (run / "evaluate.lock").write_text("")
    (run / "evaluate.lock").chmod(0o644)
    with locks.holding(settings, "evaluate", "busy"):
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        assert stat.S_IMODE((run / "evaluate.lock").stat().st_mode) == 0o600


def test_cleanup_under_a_user_attack_still_runs(tmp_path, user):
    """End to end: the user tries to pre-create and hold cleanup's lock; root's cleanup runs (exit 0)."""
    make_database(tmp_path)
    open_world(tmp_path)
    lock = tmp_path / "run" / "cleanup.lock"
    attempt = as_user(user, "flock", "-n", "-s", str(lock), "true")
    assert attempt.returncode != 0
    out = portwatch(tmp_path, "cleanup", "--keep-days", "1")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_existing_loose_database_is_tightened_and_doctor_reports_loose_files(tmp_path):
    db = make_database(tmp_path)
    db.chmod(0o644)
    reports = tmp_path / "state" / "reports"
    reports.mkdir(parents=True)
    (reports / "index.html").write_text("x")
    (reports / "index.html").chmod(0o644)
    env = {"PORTWATCH_REPORTS_OUT_DIR": str(reports)}
    out = portwatch(tmp_path, "doctor", "--json", env=env)
    import json
    modes = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "file modes")
    assert modes["status"] == "warn" and str(db) in modes["detail"] and "0644" in modes["detail"]
    out = portwatch(tmp_path, "doctor", "--fix-modes", env=env)
    assert f"\n  {db}\n" in out.stdout and str(reports / "index.html") in out.stdout
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE((reports / "index.html").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    modes = next(c for c in json.loads(portwatch(tmp_path, "doctor", "--json", env=env).stdout)["checks"]
                 if c["name"] == "file modes")
    assert modes["status"] == "ok"
    # and a writer's open tightens the database by itself
    db.chmod(0o644)
    assert portwatch(tmp_path, "blacklist", "remove", "198.18.7.9").returncode == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
