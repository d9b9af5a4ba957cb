"""Read queries for `score`: every finding with its addresses and round times, every block, the rounds' span."""
from __future__ import annotations

import sqlite3


def findings(conn: sqlite3.Connection) -> list[dict]:
    """Every finding: id, detector, created_at, start (its first round's start), first_end (its first round's
    end), end (its last round's end), addresses (the sources its reasons name, else its ``source``)."""
    rows = conn.execute(
        "SELECT a.id, a.detector, a.created_at, a.source, f.start_time AS start, f.end_time AS first_end, "
        "COALESCE(l.end_time, f.end_time) AS end FROM anomalies a "
        "LEFT JOIN rounds f ON f.id = a.first_round_id LEFT JOIN rounds l ON l.id = a.last_round_id "
        "ORDER BY a.id").fetchall()
    named: dict[int, list[str]] = {}
    for anomaly_id, address in conn.execute("SELECT anomaly_id, address FROM v_anomaly_sources WHERE address IS NOT NULL"):
        named.setdefault(anomaly_id, []).append(address)
    return [dict(row, addresses=named.get(row["id"]) or ([row["source"]] if row["source"] else [])) for row in rows]


def blocks(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every blocklist entry ever made (any status): address (CIDR), created_at, origin, status, drops, direction."""
    return conn.execute("SELECT address, created_at, origin, status, drops, direction FROM blacklist "
                        "WHERE status != 'dry-run' ORDER BY created_at").fetchall()


def round_span(conn: sqlite3.Connection) -> tuple[float | None, float | None]:
    """(first start, last end) of the stored rounds that are traffic (not baselines)."""
    row = conn.execute("SELECT min(start_time), max(end_time) FROM rounds WHERE baseline = 0").fetchone()
    return row[0], row[1]
