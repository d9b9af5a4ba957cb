"""SQLite connections: WAL, busy timeout, foreign keys, schema migrations with a backup first.

One write path: every writer opens with :func:`connect` and writes inside ``with conn:`` blocks
(one round = one transaction). Readers that only read use ``connect(path, readonly=True)``.

Before its first write a process checks the database is sound (on its first writable open of each
file): a corrupt file is refused (DatabaseError, exit 4) before anything is written into it. Files up
to QUICK_CHECK_MAX_BYTES get ``PRAGMA quick_check`` (measured: 0.46 s for 352 MB, warm cache, so
about 0.33 s at the limit); larger ones a cheap check (header, page count against the file size, the
schema read) so the minute collector does not read a large file end to end every minute.
The file is created with the modes of app/permissions.py (0600, or 0640 for ``general.group``;
SQLite gives -wal/-shm the same), and an existing one is tightened on open.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

from app import permissions, resources
from app.errors import DatabaseError, NeedsRootError, UsageError

log = logging.getLogger(__name__)

INIT_SQL = resources.INIT_SQL
BUSY_TIMEOUT_MS = 15000

# Migration 9 (init.sql holds the same): one row per round the model judged.
MODEL_ROUND_ERRORS_SQL = """
CREATE TABLE IF NOT EXISTS model_round_errors (
    round_id      INTEGER PRIMARY KEY REFERENCES rounds(id) ON DELETE CASCADE,
    evaluation_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    model_version INTEGER NOT NULL,
    threshold     REAL,                      -- the judging model's threshold (NULL: infinite, it cannot alert)
    max_error     REAL NOT NULL,             -- largest judged per-round error over the ports
    median_error  REAL NOT NULL,             -- median over the ports
    ports         INTEGER NOT NULL           -- ports judged in the round
);
CREATE INDEX IF NOT EXISTS model_round_errors_eval ON model_round_errors(evaluation_id);
"""

# Migration 4 — issue 9/12 kernel counting: family-aware sources with fragments and TTL ranges, evictions and new
# sources per round, SYN-limit drops, the TC egress program's tables (egress_port_stats,
# destination_stats, outbound flows as flows.direction = 'out') and two-way peers. init.sql holds the
# same for fresh databases.
KERNEL_COUNTING_SQL = """
ALTER TABLE rounds ADD COLUMN source_evictions INTEGER;
ALTER TABLE rounds ADD COLUMN new_sources INTEGER;
ALTER TABLE rounds ADD COLUMN per_source_incomplete INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rounds ADD COLUMN short_fragments INTEGER;
ALTER TABLE rounds ADD COLUMN syn_limited_packets INTEGER;
ALTER TABLE rounds ADD COLUMN egress_packets INTEGER;
ALTER TABLE rounds ADD COLUMN egress_bytes INTEGER;
ALTER TABLE rounds ADD COLUMN egress_unparsed INTEGER;
ALTER TABLE rounds ADD COLUMN egress_dropped_packets INTEGER;
ALTER TABLE rounds ADD COLUMN destination_entries INTEGER;
ALTER TABLE rounds ADD COLUMN destination_evictions INTEGER;
ALTER TABLE rounds ADD COLUMN egress_flow_evictions INTEGER;
ALTER TABLE rounds ADD COLUMN egress_program_id INTEGER;
ALTER TABLE rounds ADD COLUMN two_way_peers INTEGER;
ALTER TABLE source_stats ADD COLUMN fragments INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_stats ADD COLUMN ttl_min INTEGER;
ALTER TABLE source_stats ADD COLUMN ttl_max INTEGER;
ALTER TABLE flows ADD COLUMN direction TEXT NOT NULL DEFAULT 'in';   -- 'in' (XDP) or 'out' (TC egress)
CREATE TABLE IF NOT EXISTS egress_port_stats (
    round_id      INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    port_id       INTEGER NOT NULL REFERENCES ports(id),   -- the LOCAL (source) port, folded like port_stats
    packets       INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,          -- frame bytes on the wire (GSO super-packets counted per segment)
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    syn           INTEGER NOT NULL DEFAULT 0,  -- SYN without ACK sent
    PRIMARY KEY (round_id, port_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS egress_port_stats_port ON egress_port_stats(port_id, round_id);

CREATE TABLE IF NOT EXISTS destination_stats (
    round_id       INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    address        TEXT NOT NULL,            -- remote address this host sent to
    packets        INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    syn            INTEGER NOT NULL DEFAULT 0,
    distinct_ports INTEGER NOT NULL DEFAULT 0,  -- remote (port, protocol) pairs sent to in the round
    PRIMARY KEY (round_id, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS destination_stats_address ON destination_stats(address, round_id);

-- remote addresses that talked WITH this host: a two-way exchange seen in a round (TCP with the remote's
-- ACK / UDP, both directions on the same ports) or an ESTABLISHED socket the scanner saw
CREATE TABLE IF NOT EXISTS peers (
    address        TEXT PRIMARY KEY,
    first_seen     REAL NOT NULL,            -- first two-way exchange (epoch seconds)
    last_two_way   REAL NOT NULL,            -- latest one
    two_way_rounds INTEGER NOT NULL DEFAULT 0,  -- rounds with a two-way exchange
    last_round_id  INTEGER,
    last_evidence  TEXT                      -- 'flows', 'established' or 'flows+established'
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peers_last ON peers(last_two_way);
"""

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
    # 3: the fleet (issue 13): models.origin; a CrowdSec LAPI's decisions mirrored here, pushes queued
    3: """
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
    # 4: issue 11: the allowlist kept in the database (`allow add|remove|list`), beside the config one;
    #    anomalies.updated_at: when a finding last grew (a scan that lasts is one finding, updated);
    #    v_recent_anomalies shows each finding's summary line and when it last grew
    4: """
CREATE TABLE IF NOT EXISTS allowlist (
    address    TEXT PRIMARY KEY,             -- CIDR, as in blacklist.address
    reason     TEXT,
    created_at REAL NOT NULL
);
ALTER TABLE anomalies ADD COLUMN updated_at REAL;
DROP VIEW IF EXISTS v_recent_anomalies;
CREATE VIEW v_recent_anomalies AS
SELECT a.id, datetime(a.created_at, 'unixepoch') AS at, a.detector,
       CASE WHEN p.value = -1 THEN 'ephemeral' ELSE CAST(p.value AS TEXT) END AS port, p.protocol,
       round(a.score, 3) AS score, round(a.threshold, 3) AS threshold, a.source,
       a.first_round_id, a.last_round_id,
       json_extract(CASE WHEN json_valid(a.reasons) THEN a.reasons END, '$.summary') AS summary,
       datetime(a.updated_at, 'unixepoch') AS grown, a.reasons
FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
WHERE COALESCE(a.updated_at, a.created_at) >= strftime('%s', 'now') - 7 * 86400
ORDER BY a.id DESC;
""",
    # 5: issue 9/12 kernel counting (renumbering it is this one key plus init.sql's user_version)
    5: KERNEL_COUNTING_SQL,
    # 6: issue 12 (items 3-5): the DNS question's type and a response's code in packets; the views
    #    v_top_destinations and v_dns_clients (the egress tables themselves are migration 5)
    6: """
ALTER TABLE packets ADD COLUMN qry_type INTEGER;
ALTER TABLE packets ADD COLUMN rcode INTEGER;
CREATE VIEW IF NOT EXISTS v_top_destinations AS
SELECT ds.address, SUM(ds.packets) AS packets, SUM(ds.bytes) AS bytes_out, SUM(ds.syn) AS syn,
       MAX(ds.distinct_ports) AS max_ports_in_a_round, COUNT(*) AS rounds_active,
       datetime(MAX(r.end_time), 'unixepoch') AS last_seen
FROM destination_stats ds JOIN rounds r ON r.id = ds.round_id
WHERE r.end_time >= strftime('%s', 'now') - 86400
GROUP BY ds.address
ORDER BY bytes_out DESC;

-- DNS clients in the sniffer sample (last 24 h): queries are rows with a name and no rcode, the
-- client is their source; responses (rcode set) count toward the client they went to
CREATE VIEW IF NOT EXISTS v_dns_clients AS
SELECT q.client, q.queries, q.distinct_names, q.mean_name_length, q.max_name_length,
       q.txt_null_cname, COALESCE(a.responses, 0) AS responses, COALESCE(a.nxdomain, 0) AS nxdomain,
       q.last_seen
FROM (SELECT src_address AS client, COUNT(*) AS queries, COUNT(DISTINCT qry_name) AS distinct_names,
             round(AVG(length(qry_name)), 1) AS mean_name_length, MAX(length(qry_name)) AS max_name_length,
             SUM(qry_type IN (5, 10, 16)) AS txt_null_cname,
             datetime(MAX(timestamp), 'unixepoch') AS last_seen
      FROM packets
      WHERE qry_name IS NOT NULL AND rcode IS NULL AND resp_name IS NULL AND src_address IS NOT NULL
        AND timestamp >= strftime('%s', 'now') - 86400
      GROUP BY src_address) q
LEFT JOIN (SELECT dst_address AS client, COUNT(*) AS responses, SUM(rcode = 3) AS nxdomain
           FROM packets WHERE rcode IS NOT NULL AND timestamp >= strftime('%s', 'now') - 86400
           GROUP BY dst_address) a ON a.client = q.client
ORDER BY q.queries DESC;
""",
    # 7: fail closed, exact on every path (issue 10): a round that is only a baseline (its counts cover an
    #    unknown span before this database watched the interface: stored, never evaluated); the kernel id
    #    of the map each snapshot was read from (a snapshot of other maps is no baseline for these); this
    #    database's random identity (the pin directory records which database enforces it)
    7: """
ALTER TABLE rounds ADD COLUMN baseline INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counter_snapshots ADD COLUMN map_id INTEGER;
CREATE TABLE IF NOT EXISTS database_identity (
    id         TEXT NOT NULL,
    created_at REAL NOT NULL
);
""",
    # 8: issue 9: every source a finding names with its evidence class and forgery judgement
    #    (the peers table itself is migration 5, filled by the collector)
    8: """
CREATE VIEW IF NOT EXISTS v_anomaly_sources AS
SELECT a.id AS anomaly_id, a.detector, a.evaluation_id,
       json_extract(s.value, '$.address') AS address,
       json_extract(s.value, '$.evidence') AS evidence,
       COALESCE(json_extract(s.value, '$.forged'), 0) AS possibly_forged,
       json_extract(s.value, '$.note') AS note
FROM anomalies a, json_each(CASE WHEN json_valid(a.reasons) THEN a.reasons ELSE '{}' END, '$.sources') s;
""",
    # 9: issue 11: the model's error per judged round (max and median over ports) with the model version and
    #    threshold in force: the report draws error over time against the threshold history
    9: MODEL_ROUND_ERRORS_SQL,
    # 10: the blocklist's direction: 'in' (a source, dropped in XDP) or 'out' (a destination this host may
    #    not send to, dropped in TC egress: eg_block); every existing entry is inbound
    10: """
ALTER TABLE blacklist ADD COLUMN direction TEXT NOT NULL DEFAULT 'in';
""",
    # 11: verified peers (the proof a blind forger cannot give, and the fingerprint of the proving packet);
    #    answers to this host's own conversations that passed a block, per entry and round. Two-way
    #    flows an older portwatch recorded prove nothing (a forger can draw them): only sockets stay peers.
    11: """
ALTER TABLE peers ADD COLUMN proof TEXT;
ALTER TABLE peers ADD COLUMN ttl INTEGER;
ALTER TABLE peers ADD COLUMN mac TEXT;
ALTER TABLE peers ADD COLUMN last_verified REAL;
UPDATE peers SET proof = 'established', last_verified = last_two_way WHERE last_evidence LIKE '%established%';
ALTER TABLE blacklist_drops ADD COLUMN replies INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_stats ADD COLUMN mac TEXT;
""",
    # 13: a takeover is an epoch (the pin record's): each snapshot records the epoch it was read under;
    #     a snapshot's records live in buckets by key, so a round rewrites only what changed
    13: """
ALTER TABLE counter_snapshots ADD COLUMN epoch TEXT;
ALTER TABLE counter_snapshots ADD COLUMN buckets INTEGER;
CREATE TABLE IF NOT EXISTS snapshot_buckets (
    interface  TEXT NOT NULL,
    map_name   TEXT NOT NULL,
    part       INTEGER NOT NULL,
    bucket     INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (interface, map_name, part, bucket)
);
CREATE TABLE IF NOT EXISTS snapshot_log (
    interface  TEXT NOT NULL,
    map_name   TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    keys       BLOB NOT NULL,
    counters   BLOB NOT NULL,
    gone       BLOB NOT NULL,
    PRIMARY KEY (interface, map_name, seq)
);
""",
    # 15: rounds made from a capture (python -m app replay) say so and name it; listeners a replay
    #     inferred from the host's answers (no scanner saw them) are marked
    15: """
ALTER TABLE rounds ADD COLUMN replayed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rounds ADD COLUMN capture TEXT;
ALTER TABLE rounds_ports ADD COLUMN inferred INTEGER NOT NULL DEFAULT 0;
""",
}
# numbers may have gaps (numbers reserved by work not merged yet): the newest is the highest, and a database
# gets every migration numbered above its version, in ascending order
SCHEMA_VERSION = max(MIGRATIONS)
QUICK_CHECK_MAX_BYTES = 256 << 20
_checked: set[str] = set()       # databases this process has quick_check'ed (writers check once per process)


def connect(path: str | Path, readonly: bool = False, migrate: bool = True, create: bool = True) -> sqlite3.Connection:
    """Open the database at ``path`` (created with the schema when absent, if ``create`` and not ``readonly``).

    Raises DatabaseError with one sentence for a missing (``create`` False, or ``readonly``), corrupt,
    locked, unreadable or too-new database. Only the commands that make a database (collect, run,
    setup) create one: any other writer given a path that does not exist names it and stops, so a
    mistyped --db never becomes a new empty database.
    """
    path = Path(path)
    _check_access(path, readonly)
    if not readonly and not create and not path.exists():
        raise DatabaseError(f"database {path} does not exist: check --db (or general.db); only collect, run and "
                            "setup create a database")
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
        raise _explain(exc, path) from None
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


def _prepare_file(path: Path) -> None:
    """Create the database file (and its directories) with portwatch's modes, or tighten it."""
    permissions.make_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, permissions.file_mode()))
    except FileExistsError:
        pass
    permissions.tighten_db(path)


def _check_sound(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check once per process and file, before the first write; DatabaseError if not ok."""
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
        raise _explain(exc, path) from None
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
