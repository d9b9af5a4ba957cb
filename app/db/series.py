"""Read-only queries the evaluator runs on the collector's tables.

rounds, ports, port_stats, rounds_ports, packets, source_stats, source_ports and flows. Every
function takes an open connection and returns plain tuples or sqlite3.Row objects; nothing here
writes. Round ranges are inclusive: ``first <= round_id <= last``.
"""
from __future__ import annotations

import sqlite3
from typing import Iterable, Sequence

# A round's length in seconds: the counters cover (counts_since, end_time].
_ROUND_SECONDS = "(r.end_time - COALESCE(r.counts_since, r.start_time))"


def rounds_after(conn: sqlite3.Connection, after_id: int, limit: int) -> list[sqlite3.Row]:
    """Up to ``limit`` rounds with id > after_id, ascending: id, start_time, end_time, seconds, scanner_status."""
    return conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.id > ? ORDER BY r.id LIMIT ?", (after_id, limit)).fetchall()


def rounds_before(conn: sqlite3.Connection, before_id: int, count: int) -> list[sqlite3.Row]:
    """The ``count`` rounds just before ``before_id``, ascending (same columns as rounds_after)."""
    rows = conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.id < ? ORDER BY r.id DESC LIMIT ?", (before_id, count)).fetchall()
    return rows[::-1]


def rounds_since(conn: sqlite3.Connection, since_time: float, before_id: int) -> list[sqlite3.Row]:
    """Rounds that ended at or after ``since_time`` with id < before_id, ascending."""
    return conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.end_time >= ? AND r.id < ? ORDER BY r.id", (since_time, before_id)).fetchall()


def count_rounds(conn: sqlite3.Connection, upto_id: int) -> int:
    """Rounds with id <= upto_id (how much history exists at the end of a batch)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id <= ?", (upto_id,)).fetchone()[0]


def count_rounds_after(conn: sqlite3.Connection, after_id: int) -> int:
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id > ?", (after_id,)).fetchone()[0]


def median_round_seconds(conn: sqlite3.Connection, upto_id: int, last: int = 500) -> float | None:
    """Median length (s) of the last ``last`` rounds up to ``upto_id``; None without rounds."""
    rows = conn.execute(
        f"SELECT {_ROUND_SECONDS} FROM rounds r WHERE r.id <= ? ORDER BY r.id DESC LIMIT ?",
        (upto_id, last)).fetchall()
    values = sorted(v[0] for v in rows if v[0] is not None and v[0] > 0)
    return values[len(values) // 2] if values else None


def ports_by_id(conn: sqlite3.Connection, port_ids: Iterable[int]) -> dict[int, tuple[int, str]]:
    """port_id -> (value, protocol)."""
    ids = sorted(set(port_ids))
    out: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(ids, 500):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT id, value, protocol FROM ports WHERE id IN ({marks})", chunk):
            out[row[0]] = (row[1], row[2])
    return out


def port_activity(conn: sqlite3.Connection, first: int, last: int) -> list[tuple[int, int, str, int, int]]:
    """Ports with traffic in the range, busiest first: (port_id, value, protocol, packets, active rounds)."""
    return [tuple(r) for r in conn.execute(
        "SELECT ps.port_id, p.value, p.protocol, SUM(ps.packets) AS packets, COUNT(*) "
        "FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
        "WHERE ps.round_id BETWEEN ? AND ? GROUP BY ps.port_id ORDER BY packets DESC, ps.port_id",
        (first, last))]


def port_stats(conn: sqlite3.Connection, first: int, last: int) -> list[tuple]:
    """(round_id, port_id, packets, bytes, payload_bytes, max_payload, syn, synack, rst) per row."""
    return conn.execute(
        "SELECT round_id, port_id, packets, bytes, payload_bytes, COALESCE(max_payload, 0), syn, synack, rst "
        "FROM port_stats WHERE round_id BETWEEN ? AND ?", (first, last)).fetchall()


def occupancy(conn: sqlite3.Connection, first: int, last: int) -> list[tuple]:
    """(round_id, port_id, pid, process, established) per socket holder."""
    return conn.execute(
        "SELECT round_id, port_id, pid, process, established FROM rounds_ports "
        "WHERE round_id BETWEEN ? AND ?", (first, last)).fetchall()


def held_ports(conn: sqlite3.Connection, first: int, last: int) -> set[int]:
    """port_ids something held (rounds_ports) in any round of the range."""
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT port_id FROM rounds_ports WHERE round_id BETWEEN ? AND ?", (first, last))}


def occupancy_detail(conn: sqlite3.Connection, first: int, last: int) -> list[sqlite3.Row]:
    """Holders with their port: round_id, port_id, value, protocol, pid, process, user, address."""
    return conn.execute(
        "SELECT rp.round_id, rp.port_id, p.value, p.protocol, rp.pid, rp.process, rp.user, rp.address "
        "FROM rounds_ports rp JOIN ports p ON p.id = rp.port_id "
        "WHERE rp.round_id BETWEEN ? AND ? ORDER BY rp.round_id", (first, last)).fetchall()


def first_occupancy_round(conn: sqlite3.Connection) -> int | None:
    """The first round with any scanner data (the baseline for 'new listener')."""
    return conn.execute("SELECT MIN(round_id) FROM rounds_ports").fetchone()[0]


def previous_holders(conn: sqlite3.Connection, port_ids: Sequence[int], before_id: int) -> dict[int, tuple[int, list[tuple]]]:
    """For each port, its most recent holders before ``before_id``: port_id -> (round_id, [(pid, process, user)])."""
    out: dict[int, tuple[int, list[tuple]]] = {}
    for chunk in _chunks(sorted(set(port_ids)), 500):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT rp.port_id, rp.round_id, rp.pid, rp.process, rp.user FROM rounds_ports rp "
            "JOIN (SELECT port_id, MAX(round_id) AS round_id FROM rounds_ports "
            f"      WHERE round_id < ? AND port_id IN ({marks}) GROUP BY port_id) last "
            "  ON last.port_id = rp.port_id AND last.round_id = rp.round_id",
            (before_id, *chunk)).fetchall()
        for port_id, round_id, pid, process, user in rows:
            out.setdefault(port_id, (round_id, []))[1].append((pid, process, user))
    return out


def dns_counts(conn: sqlite3.Connection, first: int, last: int) -> list[tuple]:
    """(round_id, port_id, dns_packets) from the sniffer sample."""
    return conn.execute(
        "SELECT round_id, port_id, COUNT(*) FROM packets "
        "WHERE round_id BETWEEN ? AND ? AND port_id IS NOT NULL "
        "  AND (qry_name IS NOT NULL OR protocols LIKE '%dns%') GROUP BY round_id, port_id",
        (first, last)).fetchall()


def source_counts(conn: sqlite3.Connection, first: int, last: int) -> list[tuple]:
    """(round_id, port_id, distinct sources) from flows and source_ports (real ports only)."""
    return conn.execute(
        "SELECT e.round_id, p.id, COUNT(DISTINCT e.address) FROM ("
        "  SELECT round_id, src_address AS address, dst_port AS port, protocol FROM flows "
        "  WHERE round_id BETWEEN ?1 AND ?2"
        "  UNION SELECT round_id, address, port, protocol FROM source_ports WHERE round_id BETWEEN ?1 AND ?2"
        ") e JOIN ports p ON p.value = e.port AND p.protocol = e.protocol "
        "GROUP BY e.round_id, p.id", (first, last)).fetchall()


def source_stats(conn: sqlite3.Connection, first: int, last: int) -> list[sqlite3.Row]:
    """round_id, address, packets, bytes, syn, distinct_ports."""
    return conn.execute(
        "SELECT round_id, address, packets, bytes, syn, distinct_ports FROM source_stats "
        "WHERE round_id BETWEEN ? AND ?", (first, last)).fetchall()


def source_port_pairs(conn: sqlite3.Connection, first: int, last: int,
                      addresses: Sequence[str] | None = None) -> list[tuple]:
    """(round_id, address, port, protocol, packets): which local ports each source reached.

    From source_ports (kept for sources reaching many ports) united with flows. ``addresses``
    limits the sources.
    """
    where_src, where_flow, params = "", "", [first, last]
    if addresses is not None:
        if not addresses:
            return []
        marks = ",".join("?" * len(addresses))
        where_src, where_flow = f" AND address IN ({marks})", f" AND src_address IN ({marks})"
    rows = conn.execute(
        "SELECT round_id, address, port, protocol, MAX(packets) FROM ("
        f"  SELECT round_id, address, port, protocol, packets FROM source_ports WHERE round_id BETWEEN ? AND ?{where_src}"
        f"  UNION ALL SELECT round_id, src_address, dst_port, protocol, SUM(packets) FROM flows"
        f"  WHERE round_id BETWEEN ? AND ?{where_flow} GROUP BY round_id, src_address, dst_port, protocol"
        ") GROUP BY round_id, address, port, protocol",
        (*params, *(addresses or ()), *params, *(addresses or ()))).fetchall()
    return rows


def top_sources(conn: sqlite3.Connection, value: int, protocol: str, first: int, last: int,
                limit: int = 5) -> list[tuple[str, int, int]]:
    """The sources that sent most to local port (value, protocol) in the range: (address, packets, bytes).

    Per round, the larger of the source_ports and flows evidence counts (flows also give bytes).
    """
    return [tuple(r) for r in conn.execute(
        "SELECT address, SUM(packets) AS packets, SUM(bytes) AS bytes FROM ("
        "  SELECT round_id, address, MAX(packets) AS packets, MAX(bytes) AS bytes FROM ("
        "    SELECT round_id, address, packets, 0 AS bytes FROM source_ports"
        "    WHERE port = ?1 AND protocol = ?2 AND round_id BETWEEN ?3 AND ?4"
        "    UNION ALL SELECT round_id, src_address, SUM(packets), SUM(bytes) FROM flows"
        "    WHERE dst_port = ?1 AND protocol = ?2 AND round_id BETWEEN ?3 AND ?4 GROUP BY round_id, src_address"
        "  ) GROUP BY round_id, address"
        ") GROUP BY address ORDER BY packets DESC, address LIMIT ?5",
        (value, protocol, first, last, limit))]


def port_totals(conn: sqlite3.Connection, port_id: int, first: int, last: int) -> tuple[int, int, int]:
    """(packets, bytes, syn) of one port over the range."""
    row = conn.execute(
        "SELECT COALESCE(SUM(packets), 0), COALESCE(SUM(bytes), 0), COALESCE(SUM(syn), 0) FROM port_stats "
        "WHERE port_id = ? AND round_id BETWEEN ? AND ?", (port_id, first, last)).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def ports_by_value(conn: sqlite3.Connection, values: Iterable[int]) -> dict[int, tuple[int, str]]:
    """port_id -> (value, protocol) for every protocol's row of the given port values."""
    out: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(sorted(set(values)), 500):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT id, value, protocol FROM ports WHERE value IN ({marks})", chunk):
            out[row[0]] = (row[1], row[2])
    return out
