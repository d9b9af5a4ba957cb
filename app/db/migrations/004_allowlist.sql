-- The allowlist kept in the database (`allow add|remove|list`), beside the config one;
-- anomalies.updated_at: when a finding last grew (a scan that lasts is one finding, updated);
-- v_recent_anomalies shows each finding's summary line and when it last grew.
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
