-- The DNS question's type and a response's code in packets; the views v_top_destinations
-- and v_dns_clients (the egress tables themselves are migration 5).
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
