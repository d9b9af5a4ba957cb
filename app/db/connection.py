"""SQLite connections: WAL, busy timeout, foreign keys, schema migrations with a backup first.

One write path: every writer opens with :func:`connect` and writes inside ``with conn:`` blocks
(one round = one transaction). Readers that only read use ``connect(path, readonly=True)``.
"""
from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

from app.errors import DatabaseError

log = logging.getLogger(__name__)

INIT_SQL = Path(__file__).resolve().parent.parent.parent / "init.sql"
BUSY_TIMEOUT_MS = 15000

# version -> SQL that upgrades from version-1. Version 1 is the first init.sql; init.sql always
# creates the newest schema (and sets its user_version) for a fresh database.
MIGRATIONS: dict[int, str] = {
    # 2: the blocklist tables, for a version-1 database made before init.sql had them (the same
    #    statements as init.sql's blocklist section; IF NOT EXISTS: a no-op where they exist)
    2: """
    CREATE TABLE IF NOT EXISTS blacklist (
        address      TEXT PRIMARY KEY,           -- CIDR ('198.18.0.9/32', '2001:db8::/64')
        reason       TEXT NOT NULL,
        evidence     TEXT,                       -- JSON
        anomaly_id   INTEGER,
        origin       TEXT NOT NULL DEFAULT 'manual',  -- 'manual' or 'auto'
        created_at   REAL NOT NULL,
        expires_at   REAL,                       -- NULL = never
        status       TEXT NOT NULL,              -- 'active', 'expired', 'removed', 'dry-run'
        drops        INTEGER NOT NULL DEFAULT 0, -- packets dropped for this entry, all time
        offences     INTEGER NOT NULL DEFAULT 1,
        removed_at   REAL
    );

    CREATE TABLE IF NOT EXISTS blacklist_drops (
        round_id INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
        address  TEXT NOT NULL,
        drops    INTEGER NOT NULL,
        PRIMARY KEY (round_id, address)
    ) WITHOUT ROWID;

    CREATE TABLE IF NOT EXISTS blacklist_events (
        id       INTEGER PRIMARY KEY,
        at       REAL NOT NULL,
        address  TEXT NOT NULL,
        action   TEXT NOT NULL,                  -- 'block', 'would-block', 'expire', 'remove', 'refused', 'reconcile-add', ...
        detail   TEXT
    );
    CREATE INDEX IF NOT EXISTS blacklist_events_address ON blacklist_events(address, at);

    -- per interface: each entry's in-map drop counter when reconcile last read it. blacklist.drops
    -- grows by the counter's growth since then; an entry (re-)added to a map starts again from 0.
    CREATE TABLE IF NOT EXISTS blacklist_map_counters (
        interface  TEXT NOT NULL,
        address    TEXT NOT NULL,                -- CIDR, as in blacklist.address
        drops      INTEGER NOT NULL,             -- the map's cumulative counter at read_at
        drop_bytes INTEGER NOT NULL,
        read_at    REAL NOT NULL,
        PRIMARY KEY (interface, address)
    ) WITHOUT ROWID;
""",
}
SCHEMA_VERSION = 1 + len(MIGRATIONS)


def connect(path: str | Path, readonly: bool = False, migrate: bool = True) -> sqlite3.Connection:
    """Open the database at ``path`` (created with the schema when absent unless ``readonly``).

    Raises DatabaseError with one sentence for a corrupt, locked, unreadable or too-new database.
    """
    path = Path(path)
    try:
        if readonly:
            if not path.exists():
                raise DatabaseError(f"database {path} does not exist yet: run a collection first (python -m app collect)")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                   check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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
        raise _explain(exc, path) from None
    except OSError as exc:
        raise DatabaseError(f"database {path} cannot be opened: {exc.strerror}") from None


def _explain(exc: sqlite3.Error, path: Path) -> DatabaseError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return DatabaseError(f"database {path} is locked by another process for more than {BUSY_TIMEOUT_MS // 1000} s: try again later")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return DatabaseError(f"database {path} is corrupt ({text}): restore a backup or move it aside; portwatch did not change it")
    if "readonly" in text or "unable to open" in text:
        return DatabaseError(f"database {path} cannot be opened for writing ({text}): check its permissions and directory")
    return DatabaseError(f"database {path}: {text}")


def explain(exc: sqlite3.Error, path: str | Path) -> DatabaseError:
    """The one-sentence DatabaseError for an sqlite3 error raised while using ``path``."""
    return _explain(exc, Path(path))


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"database {path} has schema version {version}, newer than this portwatch ({SCHEMA_VERSION}): upgrade portwatch")
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        # a brand-new file, or one made by hand without the schema: apply init.sql
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables and not conn.execute("SELECT 1 FROM sqlite_master WHERE name='rounds'").fetchone():
            raise DatabaseError(f"database {path} holds other tables and no portwatch schema: choose another --db")
        conn.executescript(INIT_SQL.read_text())
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        log.info("created schema version %d in %s", version, path)
    if version < SCHEMA_VERSION:
        backup = path.with_name(f"{path.name}.v{version}.{int(time.time())}.bak")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copy2(path, backup)
        log.info("backed up %s to %s before migrating", path, backup)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with conn:
                conn.executescript(MIGRATIONS[target])
                conn.execute(f"PRAGMA user_version = {target}")
        log.info("migrated %s to schema version %d", path, SCHEMA_VERSION)


def check_integrity(conn: sqlite3.Connection) -> str:
    """'ok' or the first problem PRAGMA quick_check reports."""
    return conn.execute("PRAGMA quick_check").fetchone()[0]
