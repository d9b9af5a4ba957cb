-- A takeover is an epoch (the pin record's): each snapshot records the epoch it was read under;
-- a snapshot's records live in buckets by key, so a round rewrites only what changed.
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
