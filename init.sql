-- portwatch schema, version 15 (PRAGMA user_version): the newest schema, for a fresh database; older
-- databases are upgraded by the numbered MIGRATIONS in app/db/connection.py.
-- Usable on its own:  sqlite3 -init init.sql ports.db ""
-- The application applies this file itself on first run and upgrades older databases with the
-- numbered MIGRATIONS of app/db/connection.py (a change here needs one there too).
--
-- Conventions for console users:
--   * times are Unix epoch seconds (REAL, UTC); every view also shows them as text;
--   * per-round counters are DIFFERENCES: what happened in that round, never running totals;
--   * ports.value = -1 is the folded ephemeral bucket of a protocol (ports.label = 'ephemeral');
--     for ICMP/ICMPv6 the "port" is the ICMP type;
--   * addresses are text: '198.18.0.2', '2001:db8::1', blacklist entries in CIDR form.

-- incremental vacuum lets `cleanup` return freed pages without rewriting the whole file;
-- it only takes effect before the first table is created
PRAGMA auto_vacuum = INCREMENTAL;
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;

CREATE TABLE IF NOT EXISTS rounds (
    id               INTEGER PRIMARY KEY,
    start_time       REAL NOT NULL,          -- when this round's collection started
    end_time         REAL NOT NULL,          -- when the counters were read
    counts_since     REAL,                   -- time of the previous snapshot: the counters cover (counts_since, end_time]
    interface        TEXT NOT NULL,
    xdp_mode         TEXT,                   -- 'native', 'generic' (with why under auto: 'generic (auto: veth)'), NULL: not attached
    program_id       INTEGER,                -- kernel id of the XDP program read
    source_hash      TEXT,                   -- hash of bpf/port_flow.c + build flags of that program
    compiled         INTEGER NOT NULL DEFAULT 0,  -- 1 when this run compiled (BCC) the program
    reloaded         INTEGER NOT NULL DEFAULT 0,  -- 1 when this run replaced a running program
    total_packets    INTEGER NOT NULL DEFAULT 0,
    total_bytes      INTEGER NOT NULL DEFAULT 0,
    parsed_packets   INTEGER NOT NULL DEFAULT 0,
    unparsed_packets INTEGER NOT NULL DEFAULT 0,
    dropped_packets  INTEGER NOT NULL DEFAULT 0,
    -- self-monitoring: what this collector run cost and how full the maps are
    cpu_seconds      REAL,
    peak_rss_kb      INTEGER,
    port_entries     INTEGER,
    source_entries   INTEGER,
    srcport_entries  INTEGER,
    flow_entries     INTEGER,
    blacklist_entries INTEGER,
    srcport_evictions INTEGER,               -- LRU evictions during this round (inserts - growth)
    flow_evictions   INTEGER,
    scanner_status   TEXT,                   -- 'ok', 'disabled', 'error: ...'
    sniffer_status   TEXT,                   -- 'ok', 'disabled', 'no-tshark', 'error: ...'
    sniffer_packets  INTEGER,
    note             TEXT,
    source_evictions INTEGER, -- LRU evictions of the sources map in the round
    new_sources      INTEGER, -- source keys inserted into the sources map in the round (new to it)
    per_source_incomplete INTEGER NOT NULL DEFAULT 0, -- 1: sources/srcports evictions: per-source data incomplete
    short_fragments  INTEGER, -- first fragments with a short L4 header (counted per source)
    syn_limited_packets INTEGER, -- SYNs dropped by a per-port SYN limit (not in dropped_packets)
    egress_packets   INTEGER, -- TC egress: packets sent (GSO segments counted)
    egress_bytes     INTEGER,
    egress_unparsed  INTEGER,
    egress_dropped_packets INTEGER, -- TC egress: dropped by the off-by-default egress block
    destination_entries INTEGER,
    destination_evictions INTEGER,
    egress_flow_evictions INTEGER,
    egress_program_id INTEGER,
    two_way_peers    INTEGER, -- remote addresses with a two-way exchange in the round
    baseline         INTEGER NOT NULL DEFAULT 0,  -- 1: the counts before this database watched the interface,
                                                  -- only stored as the snapshot: no traffic rows, never evaluated
    replayed         INTEGER NOT NULL DEFAULT 0,  -- 1: a capture fed through the programs (python -m app replay),
                                                  -- times are capture times
    capture          TEXT                         -- the replayed capture's file name (NULL: live)
);
CREATE INDEX IF NOT EXISTS rounds_interface_end ON rounds(interface, end_time);

CREATE TABLE IF NOT EXISTS ports (
    id       INTEGER PRIMARY KEY,
    value    INTEGER NOT NULL,               -- port number; ICMP type for icmp/icmpv6; -1 = ephemeral bucket
    protocol TEXT NOT NULL,                  -- 'tcp', 'udp', 'icmp', 'icmpv6', 'other'
    label    TEXT,                           -- 'ephemeral' for the folded bucket
    UNIQUE (value, protocol)
);

-- occupancy, from the scanner thread: who holds which local port
CREATE TABLE IF NOT EXISTS rounds_ports (
    id          INTEGER PRIMARY KEY,
    round_id    INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    port_id     INTEGER NOT NULL REFERENCES ports(id),
    timestamp   REAL NOT NULL,
    pid         INTEGER,                     -- NULL when the socket's owner is not visible
    process     TEXT,
    user        TEXT,
    address     TEXT,                        -- bound address ('0.0.0.0', '::', '127.0.0.1', ...)
    family      TEXT,                        -- 'ipv4' or 'ipv6'
    state       TEXT,                        -- 'LISTEN' (tcp) or 'BOUND' (udp)
    established INTEGER NOT NULL DEFAULT 0,  -- established connections on that local port
    inferred    INTEGER NOT NULL DEFAULT 0   -- 1: no scanner saw it; a replay inferred it from what the host
                                             -- answered (a SYN-ACK or a UDP reply sent from that port)
);
CREATE INDEX IF NOT EXISTS rounds_ports_round ON rounds_ports(round_id);
CREATE INDEX IF NOT EXISTS rounds_ports_port ON rounds_ports(port_id, round_id);

-- kernel counters per (local port, protocol), differences for the round
CREATE TABLE IF NOT EXISTS port_stats (
    round_id      INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    port_id       INTEGER NOT NULL REFERENCES ports(id),
    packets       INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,          -- frame bytes
    payload_bytes INTEGER NOT NULL,          -- L4 payload bytes
    min_payload   INTEGER,                   -- smallest/largest L4 payload seen in this round
    max_payload   INTEGER,
    syn           INTEGER NOT NULL DEFAULT 0,  -- TCP SYN without ACK
    synack        INTEGER NOT NULL DEFAULT 0,
    rst           INTEGER NOT NULL DEFAULT 0,
    fin           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round_id, port_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS port_stats_port ON port_stats(port_id, round_id);

-- kernel counters per source address, differences for the round
CREATE TABLE IF NOT EXISTS source_stats (
    round_id       INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    address        TEXT NOT NULL,
    packets        INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    syn            INTEGER NOT NULL DEFAULT 0,
    distinct_ports INTEGER NOT NULL DEFAULT 0,  -- local (port, protocol) pairs this source reached in the round
    fragments      INTEGER NOT NULL DEFAULT 0,  -- IP fragments from this source (nmap -f shows here)
    ttl_min        INTEGER,                  -- IPv4 TTL / IPv6 hop limit range of the round's packets
    ttl_max        INTEGER,
    mac            TEXT,                     -- Ethernet source of the round's packets; 'mixed': several
    PRIMARY KEY (round_id, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS source_stats_address ON source_stats(address, round_id);

-- which local ports a source reached, kept for sources that reached many (scan evidence)
CREATE TABLE IF NOT EXISTS source_ports (
    round_id INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    address  TEXT NOT NULL,
    port     INTEGER NOT NULL,               -- real port (never folded)
    protocol TEXT NOT NULL,
    packets  INTEGER NOT NULL,
    PRIMARY KEY (round_id, address, protocol, port)
) WITHOUT ROWID;

-- bounded per-round flow detail: top flows by bytes + every flow of a many-ports source
CREATE TABLE IF NOT EXISTS flows (
    round_id    INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    src_address TEXT NOT NULL,
    src_port    INTEGER NOT NULL,
    dst_address TEXT NOT NULL,
    dst_port    INTEGER NOT NULL,
    protocol    TEXT NOT NULL,
    packets     INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    first_seen  REAL,                        -- epoch seconds
    last_seen   REAL,
    tcp_flags   INTEGER NOT NULL DEFAULT 0,  -- OR of the TCP flags seen (FIN=1 SYN=2 RST=4 PSH=8 ACK=16 URG=32)
    reason      TEXT NOT NULL,               -- 'top' or 'many-ports'
    direction   TEXT NOT NULL DEFAULT 'in'   -- 'in' (XDP: src = remote) or 'out' (TC egress: src = this host)
);
CREATE INDEX IF NOT EXISTS flows_round ON flows(round_id);
CREATE INDEX IF NOT EXISTS flows_dst_port ON flows(dst_port, round_id);

-- TC egress (bpf/egress.c), differences for the round like port_stats/source_stats
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

-- verified peers: remote addresses that did what a blind forger cannot (app/db/peers.py): completed a
-- handshake acknowledging this host's ISN, answered a conversation this host opened, or held an
-- ESTABLISHED socket the scanner saw
CREATE TABLE IF NOT EXISTS peers (
    address        TEXT PRIMARY KEY,
    first_seen     REAL NOT NULL,            -- first proof (epoch seconds)
    last_two_way   REAL NOT NULL,            -- latest one
    two_way_rounds INTEGER NOT NULL DEFAULT 0,  -- rounds with a proof
    last_round_id  INTEGER,
    last_evidence  TEXT,                     -- the latest proof (as proof)
    proof          TEXT,                     -- 'handshake', 'opened-tcp', 'opened-udp' or 'established'
    ttl            INTEGER,                  -- IP TTL / hop limit of the latest proving packet
    mac            TEXT,                     -- its source MAC ('02:00:00:00:00:02')
    last_verified  REAL                      -- when (epoch seconds); NULL: no proof (older rows)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peers_last ON peers(last_two_way);

-- global kernel counters (total, parsed, unparsed, dropped, per protocol), differences for the round
CREATE TABLE IF NOT EXISTS global_stats (
    round_id INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    INTEGER NOT NULL,
    PRIMARY KEY (round_id, name)
) WITHOUT ROWID;

-- sniffer sample (pyshark/tshark): metadata only, no payload bytes
CREATE TABLE IF NOT EXISTS packets (
    id          INTEGER PRIMARY KEY,
    timestamp   REAL NOT NULL,
    protocols   TEXT,                        -- tshark's frame.protocols, e.g. 'eth:ethertype:ip:udp:dns'
    qry_name    TEXT,                        -- DNS query name
    resp_name   TEXT,                        -- DNS answer names, comma separated
    server_name TEXT,                        -- TLS SNI / QUIC server name
    port_id     INTEGER REFERENCES ports(id),-- the local port of the packet (folded like port_stats)
    dest_port   INTEGER,
    src_port    INTEGER,
    src_address TEXT,
    dst_address TEXT,
    transport   TEXT,                        -- 'tcp', 'udp', 'icmp', ...
    payload     INTEGER,                     -- L4 payload length in bytes (no payload content is stored)
    length      INTEGER,                     -- frame length
    round_id    INTEGER REFERENCES rounds(id) ON DELETE CASCADE,
    qry_type    INTEGER,                     -- DNS question's record type (1 A, 5 CNAME, 10 NULL, 16 TXT, 28 AAAA)
    rcode       INTEGER                      -- a DNS response's code (0 NOERROR, 3 NXDOMAIN); NULL for a query
);
CREATE INDEX IF NOT EXISTS packets_round ON packets(round_id);
CREATE INDEX IF NOT EXISTS packets_qry ON packets(qry_name);

-- last cumulative kernel snapshot per interface and map; rounds are differences against it
CREATE TABLE IF NOT EXISTS counter_snapshots (
    interface  TEXT NOT NULL,
    map_name   TEXT NOT NULL,
    taken_at   REAL NOT NULL,
    round_id   INTEGER,
    program_id INTEGER,
    entries    INTEGER NOT NULL,
    data       BLOB NOT NULL,                -- packed key/value records (app/services/collector/rounds.py) when buckets IS NULL
    map_id     INTEGER,                      -- kernel id of the map read: a snapshot of another map is no baseline
    epoch      TEXT,                         -- the takeover epoch (pin record) it was read under: another is no baseline
    buckets    INTEGER,                      -- the records are in snapshot_buckets, split by key into this many buckets
    PRIMARY KEY (interface, map_name)
) WITHOUT ROWID;

-- a snapshot's records by bucket of their key, keys and counters apart (part 0: the bucket's keys, 1: their
-- counters, as little-endian u64): a round rewrites only the parts that changed
CREATE TABLE IF NOT EXISTS snapshot_buckets (
    interface  TEXT NOT NULL,
    map_name   TEXT NOT NULL,
    part       INTEGER NOT NULL,
    bucket     INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (interface, map_name, part, bucket)
);
-- what changed in a snapshot since its base, one record per round (app/services/snapshots.py): the keys that
-- counted or appeared with their counters then, and the keys that went away; folded into the base when it grows
CREATE TABLE IF NOT EXISTS snapshot_log (
    interface  TEXT NOT NULL,
    map_name   TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    keys       BLOB NOT NULL,
    counters   BLOB NOT NULL,                -- little-endian u64, the map's counters per key
    gone       BLOB NOT NULL,
    PRIMARY KEY (interface, map_name, seq)
);

-- this database's random identity: the pin directory of an interface records which database enforces it
CREATE TABLE IF NOT EXISTS database_identity (
    id         TEXT NOT NULL,
    created_at REAL NOT NULL
);

-- every compile/attach of the XDP program
CREATE TABLE IF NOT EXISTS xdp_loads (
    id              INTEGER PRIMARY KEY,
    interface       TEXT NOT NULL,
    loaded_at       REAL NOT NULL,
    mode            TEXT NOT NULL,
    program_id      INTEGER,
    source_hash     TEXT NOT NULL,
    reason          TEXT NOT NULL,           -- 'first-load', 'source-changed', 'not-attached', 'maps-recreated'
    compile_seconds REAL
);

-- evaluator ------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS models (
    version        INTEGER PRIMARY KEY,
    created_at     REAL NOT NULL,
    parent_version INTEGER,
    path           TEXT NOT NULL,            -- directory holding model + scaler + config.json
    threshold      REAL,
    train_windows  INTEGER,
    status         TEXT NOT NULL DEFAULT 'active',  -- 'active', 'retired', 'rolled-back', 'pruned' (files removed)
    metadata       TEXT,                     -- JSON: calibration, hyper-parameters, rounds trained on
    budget_per_day REAL,                     -- alert budget the threshold was calibrated to (whole host)
    held_out_rate_per_day REAL,              -- false alerts/day the threshold gives on held-out normal windows
    origin         TEXT NOT NULL DEFAULT 'local'   -- 'local' (trained here) or 'fleet' (federated, issue 13)
);

CREATE TABLE IF NOT EXISTS evaluations (
    id             INTEGER PRIMARY KEY,
    started_at     REAL NOT NULL,
    finished_at    REAL,
    first_round_id INTEGER,
    last_round_id  INTEGER,
    model_version  INTEGER,
    threshold      REAL,
    windows        INTEGER,
    anomalies      INTEGER,
    duration_s     REAL,
    status         TEXT,                     -- 'ok', 'warm-up', 'no-rounds', 'error: ...'
    note           TEXT,
    rounds         INTEGER,                  -- rounds judged (first_round_id..last_round_id)
    ports          INTEGER,                  -- port series scored
    observed_rate_per_day REAL               -- model anomalies per day of judged rounds in this batch
);

CREATE TABLE IF NOT EXISTS anomalies (
    id             INTEGER PRIMARY KEY,
    evaluation_id  INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    port_id        INTEGER REFERENCES ports(id),
    detector       TEXT NOT NULL,            -- 'model', 'port_scan', 'syn_flood', 'new_listener', ...
    score          REAL,
    threshold      REAL,
    reasons        TEXT,                     -- JSON: features, observed vs reconstructed, sources
    first_round_id INTEGER,
    last_round_id  INTEGER,
    source         TEXT,                     -- the main source address, where one is responsible
    created_at     REAL NOT NULL,
    updated_at     REAL                      -- when the finding last grew (a scan that lasts is one finding)
);
CREATE INDEX IF NOT EXISTS anomalies_eval ON anomalies(evaluation_id);
CREATE INDEX IF NOT EXISTS anomalies_port ON anomalies(port_id);

-- the model's judged error per round (max and median over ports) and the threshold in force (issue 11)
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

-- blocklist -------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS blacklist (
    address      TEXT PRIMARY KEY,           -- CIDR ('198.18.0.9/32', '2001:db8::/64')
    reason       TEXT NOT NULL,
    evidence     TEXT,                       -- JSON
    anomaly_id   INTEGER,
    origin       TEXT NOT NULL DEFAULT 'manual',  -- 'manual', 'auto', or 'crowdsec' (pulled from a CrowdSec LAPI)
    created_at   REAL NOT NULL,
    expires_at   REAL,                       -- NULL = never
    status       TEXT NOT NULL,              -- 'active', 'expired', 'removed', 'dry-run'
    drops        INTEGER NOT NULL DEFAULT 0, -- packets dropped for this entry, all time
    offences     INTEGER NOT NULL DEFAULT 1,
    removed_at   REAL,
    direction    TEXT NOT NULL DEFAULT 'in'  -- 'in': a source (XDP blacklist), 'out': a destination (TC eg_block)
);

CREATE TABLE IF NOT EXISTS blacklist_drops (
    round_id INTEGER NOT NULL REFERENCES rounds(id) ON DELETE CASCADE,
    address  TEXT NOT NULL,
    drops    INTEGER NOT NULL,
    replies  INTEGER NOT NULL DEFAULT 0,     -- answers to this host's own conversations passed in the round
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

-- operations ------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS alerts_sent (
    key     TEXT NOT NULL,
    channel TEXT NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (key, channel)
) WITHOUT ROWID;

-- views for console users -------------------------------------------------------

CREATE VIEW IF NOT EXISTS v_round_summary AS
SELECT r.id AS round_id,
       datetime(r.end_time, 'unixepoch') AS ended,
       round(r.end_time - COALESCE(r.counts_since, r.start_time), 1) AS seconds,
       r.interface, r.xdp_mode,
       r.total_packets, r.total_bytes, r.unparsed_packets, r.dropped_packets,
       (SELECT COUNT(*) FROM port_stats ps WHERE ps.round_id = r.id) AS active_ports,
       (SELECT COUNT(*) FROM source_stats ss WHERE ss.round_id = r.id) AS sources,
       (SELECT COUNT(*) FROM rounds_ports rp WHERE rp.round_id = r.id) AS listeners,
       r.sniffer_packets, r.cpu_seconds, r.peak_rss_kb
FROM rounds r;

CREATE VIEW IF NOT EXISTS v_top_ports AS
SELECT CASE WHEN p.value = -1 THEN 'ephemeral' ELSE CAST(p.value AS TEXT) END AS port,
       p.protocol,
       SUM(ps.packets) AS packets, SUM(ps.bytes) AS bytes, SUM(ps.syn) AS syn,
       COUNT(*) AS rounds_active,
       datetime(MAX(r.end_time), 'unixepoch') AS last_seen
FROM port_stats ps JOIN ports p ON p.id = ps.port_id JOIN rounds r ON r.id = ps.round_id
WHERE r.end_time >= strftime('%s', 'now') - 86400
GROUP BY ps.port_id
ORDER BY bytes DESC;

CREATE VIEW IF NOT EXISTS v_top_sources AS
SELECT ss.address, SUM(ss.packets) AS packets, SUM(ss.bytes) AS bytes, SUM(ss.syn) AS syn,
       MAX(ss.distinct_ports) AS max_ports_in_a_round,
       datetime(MAX(r.end_time), 'unixepoch') AS last_seen
FROM source_stats ss JOIN rounds r ON r.id = ss.round_id
WHERE r.end_time >= strftime('%s', 'now') - 86400
GROUP BY ss.address
ORDER BY packets DESC;

CREATE VIEW IF NOT EXISTS v_listeners AS
SELECT rp.round_id, p.value AS port, p.protocol, rp.address, rp.pid, rp.process, rp.user, rp.established
FROM rounds_ports rp JOIN ports p ON p.id = rp.port_id
WHERE rp.round_id = (SELECT MAX(id) FROM rounds);

CREATE VIEW IF NOT EXISTS v_dns_names AS
SELECT qry_name, COUNT(*) AS queries, datetime(MAX(timestamp), 'unixepoch') AS last_seen
FROM packets WHERE qry_name IS NOT NULL
GROUP BY qry_name ORDER BY queries DESC;

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

CREATE VIEW IF NOT EXISTS v_recent_anomalies AS
SELECT a.id, datetime(a.created_at, 'unixepoch') AS at, a.detector,
       CASE WHEN p.value = -1 THEN 'ephemeral' ELSE CAST(p.value AS TEXT) END AS port, p.protocol,
       round(a.score, 3) AS score, round(a.threshold, 3) AS threshold, a.source,
       a.first_round_id, a.last_round_id,
       json_extract(CASE WHEN json_valid(a.reasons) THEN a.reasons END, '$.summary') AS summary,
       datetime(a.updated_at, 'unixepoch') AS grown, a.reasons
FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
WHERE COALESCE(a.updated_at, a.created_at) >= strftime('%s', 'now') - 7 * 86400
ORDER BY a.id DESC;

CREATE VIEW IF NOT EXISTS v_active_blacklist AS
SELECT address, reason, origin, status, drops, offences,
       datetime(created_at, 'unixepoch') AS created,
       CASE WHEN expires_at IS NULL THEN 'never' ELSE datetime(expires_at, 'unixepoch') END AS expires
FROM blacklist WHERE status IN ('active', 'dry-run')
ORDER BY created_at DESC;

-- the fleet (issue 13): a CrowdSec LAPI's decisions mirrored here, pushes queued
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

-- the allowlist kept in the database (`python -m app allow add|remove|list`), beside the config's
-- blocklist.allowlist: never blocked automatically; adding an entry lifts its active blocks
CREATE TABLE IF NOT EXISTS allowlist (
    address    TEXT PRIMARY KEY,             -- CIDR, as in blacklist.address
    reason     TEXT,
    created_at REAL NOT NULL
);

-- every source a finding names, with its evidence class ('two-way'/'one-way') and whether it is
-- possibly forged (one-way evidence naming a two-way peer, or a hop count that does not match)
CREATE VIEW IF NOT EXISTS v_anomaly_sources AS
SELECT a.id AS anomaly_id, a.detector, a.evaluation_id,
       json_extract(s.value, '$.address') AS address,
       json_extract(s.value, '$.evidence') AS evidence,
       COALESCE(json_extract(s.value, '$.forged'), 0) AS possibly_forged,
       json_extract(s.value, '$.note') AS note
FROM anomalies a, json_each(CASE WHEN json_valid(a.reasons) THEN a.reasons ELSE '{}' END, '$.sources') s;

PRAGMA user_version = 15;
