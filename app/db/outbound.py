"""Read-only queries on what left the host (destination_stats) and the outbound findings, for the
report (app/services/ops/reports/outbound.py). ``since``: Unix epoch seconds (UTC) or None for all."""
from __future__ import annotations

import sqlite3

OUTBOUND_DETECTORS = ("outbound_scan", "exfiltration", "beaconing", "dns_tunnel")


def top_destinations(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """Remote addresses by bytes this host sent them: address, packets, bytes, syn,
    max_ports_in_a_round, rounds, last_time; most bytes first. Empty on a database older than the
    egress tables (a read-only reader does not migrate)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'destination_stats'").fetchone() is None:
        return []
    return conn.execute(
        "SELECT ds.address, SUM(ds.packets) AS packets, SUM(ds.bytes) AS bytes, SUM(ds.syn) AS syn, "
        "       MAX(ds.distinct_ports) AS max_ports_in_a_round, COUNT(*) AS rounds, MAX(r.end_time) AS last_time "
        "FROM destination_stats ds JOIN rounds r ON r.id = ds.round_id WHERE r.end_time >= ? "
        "GROUP BY ds.address ORDER BY bytes DESC, ds.address LIMIT ?",
        (-1e18 if since is None else float(since), int(limit))).fetchall()


def outbound_anomalies(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """Anomalies of the outbound detectors (and dns_tunnel), newest first, joined with their port:
    the columns Finding.from_row reads."""
    marks = ",".join("?" * len(OUTBOUND_DETECTORS))
    return conn.execute(
        "SELECT a.*, p.value AS port, p.protocol FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id "
        f"WHERE a.detector IN ({marks}) AND a.created_at >= ? ORDER BY a.created_at DESC, a.id DESC LIMIT ?",
        (*OUTBOUND_DETECTORS, -1e18 if since is None else float(since), int(limit))).fetchall()
