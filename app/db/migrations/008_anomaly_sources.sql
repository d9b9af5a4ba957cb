-- Every source a finding names with its evidence class and forgery judgement
-- (the peers table itself is migration 5, filled by the collector).
CREATE VIEW IF NOT EXISTS v_anomaly_sources AS
SELECT a.id AS anomaly_id, a.detector, a.evaluation_id,
       json_extract(s.value, '$.address') AS address,
       json_extract(s.value, '$.evidence') AS evidence,
       COALESCE(json_extract(s.value, '$.forged'), 0) AS possibly_forged,
       json_extract(s.value, '$.note') AS note
FROM anomalies a, json_each(CASE WHEN json_valid(a.reasons) THEN a.reasons ELSE '{}' END, '$.sources') s;
