"""Read queries about stored findings (``anomalies``) for `anomalies list|show` and app/services/evaluation/explain.py:
the finding rows, their rounds' times, who held their port, and what was done about them (blocklist
rows and events naming the finding, alerts sent). Writes of anomalies live in app/db/evaluations.py.
"""
from __future__ import annotations

import sqlite3

# the columns Finding.from_row reads: anomalies joined with ports (value AS port, protocol)
_FINDING = "SELECT a.*, p.value AS port, p.protocol FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id"


def anomaly(conn: sqlite3.Connection, anomaly_id: int) -> sqlite3.Row | None:
    return conn.execute(f"{_FINDING} WHERE a.id = ?", (anomaly_id,)).fetchone()


def anomalies(conn: sqlite3.Connection, since: float | None = None, detector: str | None = None,
              limit: int = 1000) -> list[sqlite3.Row]:
    """Findings newest first: created (or grown, see ``updated_at``) at or after ``since``, of ``detector``
    (a database opened read-only before migration 4 has no ``updated_at``: NULL)."""
    where, args = [], []
    grown = any(r[1] == "updated_at" for r in conn.execute("PRAGMA table_info(anomalies)"))
    sql = _FINDING if grown else _FINDING.replace("SELECT a.*,", "SELECT a.*, NULL AS updated_at,")
    if since is not None:
        where.append("COALESCE(a.updated_at, a.created_at) >= ?" if grown else "a.created_at >= ?")
        args.append(since)
    if detector:
        where.append("a.detector = ?")
        args.append(detector)
    sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id DESC LIMIT ?"
    return conn.execute(sql, (*args, limit)).fetchall()


def detectors(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT detector FROM anomalies ORDER BY detector")]


def created_at(conn: sqlite3.Connection, anomaly_id: int) -> float | None:
    row = conn.execute("SELECT created_at FROM anomalies WHERE id = ?", (anomaly_id,)).fetchone()
    return None if row is None else row[0]


def round_span(conn: sqlite3.Connection, first: int, last: int) -> tuple[float, float] | None:
    """(start of round ``first``'s counters, end of round ``last``), or None when the rounds are gone."""
    row = conn.execute("SELECT MIN(COALESCE(counts_since, start_time)), MAX(end_time) FROM rounds "
                       "WHERE id BETWEEN ? AND ?", (first, last)).fetchone()
    return None if row is None or row[1] is None else (row[0], row[1])


def port_holders(conn: sqlite3.Connection, port_id: int, first: int, last: int) -> list[sqlite3.Row]:
    """Distinct (pid, process, user, address) holding ``port_id`` in rounds first..last."""
    return conn.execute("SELECT DISTINCT pid, process, user, address FROM rounds_ports "
                        "WHERE port_id = ? AND round_id BETWEEN ? AND ? ORDER BY process, pid LIMIT 10",
                        (port_id, first, last)).fetchall()


def blocks_of(conn: sqlite3.Connection, anomaly_id: int) -> list[sqlite3.Row]:
    """Ledger rows whose block this finding caused."""
    return conn.execute("SELECT * FROM blacklist WHERE anomaly_id = ? ORDER BY address", (anomaly_id,)).fetchall()


def block_events_of(conn: sqlite3.Connection, anomaly_id: int) -> list[sqlite3.Row]:
    """blacklist_events whose detail names this finding ('... (anomaly N): ...')."""
    return conn.execute("SELECT * FROM blacklist_events WHERE instr(detail, ?) > 0 ORDER BY id",
                        (f"(anomaly {anomaly_id})",)).fetchall()


def alerts_sent(conn: sqlite3.Connection, key: str) -> list[sqlite3.Row]:
    """Channels an alert key last went out on: (channel, sent_at)."""
    return conn.execute("SELECT channel, sent_at FROM alerts_sent WHERE key = ? ORDER BY channel", (key,)).fetchall()


def summaries(conn: sqlite3.Connection, anomaly_ids) -> dict[int, str]:
    """id -> the finding's stored summary line (reasons ``$.summary``), for the ids that have one."""
    ids = sorted({int(i) for i in anomaly_ids if i is not None})
    out: dict[int, str] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
                "SELECT id, json_extract(CASE WHEN json_valid(reasons) THEN reasons END, '$.summary') FROM anomalies "
                f"WHERE id IN ({marks})", chunk):
            if row[1]:
                out[row[0]] = row[1]
    return out
