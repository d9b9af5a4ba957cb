-- Fail closed, exact on every path: a round that is only a baseline (its counts cover an
-- unknown span before this database watched the interface: stored, never evaluated); the kernel id
-- of the map each snapshot was read from (a snapshot of other maps is no baseline for these); this
-- database's random identity (the pin directory records which database enforces it).
ALTER TABLE rounds ADD COLUMN baseline INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counter_snapshots ADD COLUMN map_id INTEGER;
CREATE TABLE IF NOT EXISTS database_identity (
    id         TEXT NOT NULL,
    created_at REAL NOT NULL
);
