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

# version -> SQL that upgrades from version-1. Version 1 is init.sql itself; a fresh database runs
# init.sql and then every migration, so what a migration adds is not repeated in init.sql.
MIGRATIONS: dict[int, str] = {
    # the fleet (issue 13): models.origin; a CrowdSec LAPI's decisions mirrored here, pushes queued
    2: """
ALTER TABLE models ADD COLUMN origin TEXT NOT NULL DEFAULT 'local';   -- 'local' or 'fleet'
CREATE TABLE IF NOT EXISTS crowdsec_decisions (
    id       INTEGER PRIMARY KEY,            -- the LAPI's decision id
    address  TEXT NOT NULL,                  -- CIDR, as in blacklist.address
    scenario TEXT,
    origin   TEXT,                           -- the LAPI's origin ('crowdsec', 'cscli', 'CAPI', ...)
    until    REAL NOT NULL,                  -- epoch seconds: the decision's end
    seen_at  REAL NOT NULL,                  -- first pulled
    refused  TEXT                            -- why this host does not enforce it (an interlock), logged once
);
CREATE INDEX IF NOT EXISTS crowdsec_decisions_address ON crowdsec_decisions(address);
CREATE TABLE IF NOT EXISTS crowdsec_pushes (
    id               INTEGER PRIMARY KEY,
    address          TEXT NOT NULL,          -- CIDR of the ledger row pushed
    block_created_at REAL NOT NULL,          -- blacklist.created_at of that block (one push per block)
    action           TEXT NOT NULL,          -- 'add' (an alert with its decision) or 'delete'
    scenario         TEXT NOT NULL,          -- 'portwatch/<detector>'
    message          TEXT,
    expires_at       REAL,                   -- the block's expiry: the decision's duration is what is left
    queued_at        REAL NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',  -- 'pending', 'sent', 'dropped', 'cancelled'
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    sent_at          REAL,
    alert_id         TEXT,
    UNIQUE (address, block_created_at, action)
);
CREATE INDEX IF NOT EXISTS crowdsec_pushes_state ON crowdsec_pushes(state, id);
CREATE TABLE IF NOT EXISTS crowdsec_state (
    key   TEXT PRIMARY KEY,
    value TEXT
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
    created = version == 0
    if version == 0:
        # a brand-new file, or one made by hand without the schema: apply init.sql
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables and not conn.execute("SELECT 1 FROM sqlite_master WHERE name='rounds'").fetchone():
            raise DatabaseError(f"database {path} holds other tables and no portwatch schema: choose another --db")
        conn.executescript(INIT_SQL.read_text())
        version = 1
        log.info("created schema version 1 in %s", path)
    if version < SCHEMA_VERSION:
        if not created:                         # a database made just now holds nothing to back up
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
