-- Kernel counting: family-aware sources with fragments and TTL ranges, evictions and new sources per
-- round, SYN-limit drops, the TC egress program's tables (egress_port_stats, destination_stats,
-- outbound flows as flows.direction = 'out') and two-way peers (completed handshakes).
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

CREATE TABLE IF NOT EXISTS peers (
    address        TEXT PRIMARY KEY,
    first_seen     REAL NOT NULL,            -- first two-way exchange (epoch seconds)
    last_two_way   REAL NOT NULL,            -- latest one
    two_way_rounds INTEGER NOT NULL DEFAULT 0,  -- rounds with a two-way exchange
    last_round_id  INTEGER,
    last_evidence  TEXT                      -- 'flows', 'established' or 'flows+established'
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peers_last ON peers(last_two_way);
