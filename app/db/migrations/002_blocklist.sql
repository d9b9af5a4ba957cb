-- The blocklist tables, for a version-1 database made before init.sql had them (the same
-- statements as init.sql's blocklist section; IF NOT EXISTS: a no-op where they exist).
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
