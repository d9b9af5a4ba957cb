-- The fleet: models.origin ('local' or 'fleet'); a CrowdSec LAPI's decisions mirrored here,
-- and the pushes of this host's own decisions queued.
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
