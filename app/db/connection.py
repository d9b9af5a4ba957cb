"""SQLite connections: WAL, busy timeout, foreign keys, schema migrations with a backup first.

One write path: every writer opens with :func:`connect` and writes inside ``with conn:`` blocks
(one round = one transaction). Readers that only read use ``connect(path, readonly=True)``. Before
its first write a process checks the file is sound (:func:`_check_sound`) and runs its file step
(:func:`use_file_step`). This package imports nothing of portwatch but app.errors.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path
from typing import Callable

from app.db.migrations import MIGRATIONS
from app.errors import DatabaseError, NeedsRootError, UsageError

log = logging.getLogger(__name__)

# the schema: an installed wheel's copy (app/_data/init.sql), else the checkout's at the repository root
# (the rule of app/resources.py, which finds the BPF sources; tests/db/test_connection.py checks they agree)
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_WHEEL_SCHEMA = _PACKAGE_DIR / "_data" / "init.sql"
INIT_SQL = _WHEEL_SCHEMA if _WHEEL_SCHEMA.exists() else _PACKAGE_DIR.parent / "init.sql"
BUSY_TIMEOUT_MS = 15000

# numbers may have gaps (numbers reserved by work not merged yet): the newest is the highest, and a database
# gets every migration numbered above its version, in ascending order
SCHEMA_VERSION = max(MIGRATIONS)
QUICK_CHECK_MAX_BYTES = 256 << 20
_checked: set[str] = set()       # databases this process has quick_check'ed (writers check once per process)


def connect(path: str | Path, readonly: bool = False, migrate: bool = True, create: bool = True) -> sqlite3.Connection:
    """Open the database at ``path`` (created with the schema when absent, if ``create`` and not ``readonly``).

    Raises DatabaseError with one sentence for a missing (``create`` False, or ``readonly``), corrupt,
    locked, unreadable or too-new database. Only the commands that make a database (collect, run,
    replay, setup) create one: any other writer given a path that does not exist names it and stops, so a
    mistyped --db never becomes a new empty database.
    """
    path = Path(path)
    _check_access(path, readonly)
    if not readonly and not create and not path.exists():
        raise DatabaseError(f"database {path} does not exist: check --db (or general.db); only collect, run, "
                            "replay and setup create a database")
    try:
        if readonly:
            if not path.exists():
                raise DatabaseError(f"database {path} does not exist yet: run a collection first (python -m app collect)")
            conn = _open_readonly(path)
        else:
            _prepare_file(path)
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            _check_sound(conn, path)
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if migrate:
                _migrate(conn, path, version)
        elif version == 0:
            raise DatabaseError(f"database {path} has no portwatch schema: run a collection first")
        elif version > SCHEMA_VERSION:
            raise DatabaseError(f"database {path} has schema version {version}, newer than this portwatch ({SCHEMA_VERSION}): upgrade portwatch")
        return conn
    except sqlite3.DatabaseError as exc:
        raise _database_error(exc, path) from None
    except OSError as exc:
        raise DatabaseError(f"database {path} cannot be opened: {exc.strerror}") from None


def _check_access(path: Path, readonly: bool) -> None:
    """One sentence before SQLite's own ("unable to open", "disk I/O error"): a directory named as
    the database is bad input (exit 2); a root-only file opened by another user needs root (exit 3)."""
    if path.is_dir():
        raise UsageError(f"database path {path} is a directory: name the database file (e.g. {path / 'ports.db'})")
    if os.geteuid() == 0 or not path.exists():
        return
    if not os.access(path, os.R_OK):
        raise NeedsRootError(f"reading database {path} needs root (it is readable by root only): run it with sudo, "
                             "or set general.group and join that group")
    if not readonly and not os.access(path, os.W_OK):
        raise NeedsRootError(f"writing database {path} needs root: run it with sudo")


def _open_readonly(path: Path) -> sqlite3.Connection:
    """``mode=ro``; a reader never creates a file. With no ``-wal`` beside the database no writer has it
    open and every commit is in the main file: the reader opens it ``immutable=1`` (SQLite would otherwise
    create ``-wal`` and ``-shm``, with the main file's mode). A reader that may read the file but not create
    its -shm (a general.group member: the directory is not writable for it) gets the main file the same way."""
    if not path.with_name(path.name + "-wal").exists():
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    try:
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if not ("readonly" in str(exc) or "unable to open" in str(exc)) or os.geteuid() == 0:
            raise
    if not os.access(path, os.R_OK):
        raise DatabaseError(f"database {path} is not readable by this user: run as root, or set general.group "
                            "and join that group")
    log.warning("cannot create %s-shm: reading the database as of its last checkpoint (a portwatch run's "
                "newest rounds may be missing)", path)
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)


def root_only(path: Path) -> None:
    """The file step of a process that installed none: missing directories 0700, the file created
    0600, and an existing database file (and its -wal/-shm/-journal) that this user owns (any, as
    root) and that is no symbolic link given 0600."""
    missing = []
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)           # mkdir's mode passes through the umask
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    for name in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            st = name.lstat()
            if stat.S_ISREG(st.st_mode) and (os.geteuid() == 0 or st.st_uid == os.geteuid()) \
                    and stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(name, 0o600)
        except (FileNotFoundError, PermissionError):
            continue


_file_step: Callable[[Path], None] = root_only


def use_file_step(step: Callable[[Path], None]) -> None:
    """Install ``step(path)``, run before SQLite opens a database file for writing in this process: it
    creates the file (and its directories) with their modes, or tightens an existing one (SQLite gives
    -wal/-shm the database's mode). The CLI installs app.permissions' step (0600, or 0640 for
    ``general.group``); a process that installs none gets :func:`root_only`."""
    global _file_step
    _file_step = step


def _prepare_file(path: Path) -> None:
    _file_step(path)


def _check_sound(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check once per process and file, before the first write; DatabaseError if not ok.

    A corrupt file is refused (DatabaseError, exit 4) before anything is written into it. Files up to
    QUICK_CHECK_MAX_BYTES get ``PRAGMA quick_check`` (measured: 0.46 s for 352 MB, warm cache, so about
    0.33 s at the limit); larger ones a cheap check (:func:`_cheap_check`: header, page count against the
    file size, the schema read) so the minute collector does not read a large file end to end every minute.
    """
    key = str(path.resolve())
    if key in _checked:
        return
    try:
        size = path.stat().st_size
        if size <= QUICK_CHECK_MAX_BYTES:
            result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        else:
            result = _cheap_check(conn, path, size)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _database_error(exc, path) from None
    if result != "ok":
        conn.close()
        first = " ".join(line for line in result.splitlines() if not line.startswith("***"))
        raise DatabaseError(f"database {path} is corrupt (quick_check: {first}): restore a backup or move it "
                            "aside; portwatch did not change it")
    _checked.add(key)


def _cheap_check(conn: sqlite3.Connection, path: Path, size: int) -> str:
    """'ok', or what is wrong with the header, the page count or the schema of a large file."""
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            return "the file header is not SQLite's"
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    wal = path.with_name(path.name + "-wal")
    room = size + (wal.stat().st_size if wal.exists() else 0) + page_size     # new pages may sit in the WAL
    if pages * page_size > room:
        return f"it counts {pages} pages of {page_size} bytes, more than the file and its WAL hold"
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()     # reads and parses the whole schema
    return "ok"


def _database_error(exc: sqlite3.Error, path: Path) -> DatabaseError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return DatabaseError(f"database {path} is locked by another process for more than {BUSY_TIMEOUT_MS // 1000} s: try again later")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return DatabaseError(f"database {path} is corrupt ({text}): restore a backup or move it aside; portwatch did not change it")
    if "readonly" in text or "unable to open" in text:
        return DatabaseError(f"database {path} cannot be opened for writing ({text}): check its permissions and directory")
    return DatabaseError(f"database {path}: {text}")


def database_error(exc: sqlite3.Error, path: str | Path) -> DatabaseError:
    """The one-sentence DatabaseError for an sqlite3 error raised while using ``path``."""
    return _database_error(exc, Path(path))


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"database {path} has schema version {version}, newer than this portwatch ({SCHEMA_VERSION}): upgrade portwatch")
    if version == SCHEMA_VERSION:
        return
    created = version == 0
    if version == 0:
        # a brand-new file, or one made by hand without the schema: apply init.sql
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables and not conn.execute("SELECT 1 FROM sqlite_master WHERE name='rounds'").fetchone():
            raise DatabaseError(f"database {path} holds other tables and no portwatch schema: choose another --db")
        conn.executescript(INIT_SQL.read_text())
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        log.info("created schema version %d in %s", version, path)
    if version < SCHEMA_VERSION:
        if not created:                         # a database made just now holds nothing to back up
            backup = path.with_name(f"{path.name}.v{version}.{int(time.time())}.bak")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copy2(path, backup)
            log.info("backed up %s to %s before migrating", path, backup)
        for target in sorted(n for n in MIGRATIONS if n > version):
            with conn:
                conn.executescript(MIGRATIONS[target])
                conn.execute(f"PRAGMA user_version = {target}")
        log.info("migrated %s to schema version %d", path, SCHEMA_VERSION)


def check_integrity(conn: sqlite3.Connection) -> str:
    """'ok' or the first problem PRAGMA quick_check reports."""
    return conn.execute("PRAGMA quick_check").fetchone()[0]
