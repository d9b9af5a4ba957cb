"""Read-only queries the evaluator runs on the collector's tables (the evaluation wing assembles
them into its batch: app/services/evaluation/batch.py).

rounds, ports, port_stats, rounds_ports, packets, source_stats, source_ports, flows, and what leaves
the host: egress_port_stats, destination_stats and outbound flows (``flows.direction = 'out'``). Every
function takes an open connection and returns plain tuples, dicts or sqlite3.Row objects; nothing
here writes. Round ranges are inclusive: ``first <= round_id <= last``. Baseline rounds
(rounds.baseline = 1: counts from before this database watched the interface) are never read as traffic.
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
        "FROM rounds r WHERE r.id > ? AND r.baseline = 0 ORDER BY r.id LIMIT ?", (after_id, limit)).fetchall()


def rounds_before(conn: sqlite3.Connection, before_id: int, count: int) -> list[sqlite3.Row]:
    """The ``count`` rounds just before ``before_id``, ascending (same columns as rounds_after)."""
    rows = conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.id < ? AND r.baseline = 0 ORDER BY r.id DESC LIMIT ?", (before_id, count)).fetchall()
    return rows[::-1]


def rounds_since(conn: sqlite3.Connection, since_time: float, before_id: int) -> list[sqlite3.Row]:
    """Rounds that ended at or after ``since_time`` with id < before_id, ascending."""
    return conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.end_time >= ? AND r.id < ? AND r.baseline = 0 ORDER BY r.id", (since_time, before_id)).fetchall()


def count_rounds(conn: sqlite3.Connection, upto_id: int) -> int:
    """Rounds with id <= upto_id (how much history exists at the end of a batch)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id <= ? AND baseline = 0", (upto_id,)).fetchone()[0]


def count_rounds_since(conn: sqlite3.Connection, since_time: float, before_id: int) -> int:
    """Rounds that ended at or after ``since_time`` with id < before_id (a detector's look-back)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE end_time >= ? AND id < ? AND baseline = 0",
                        (since_time, before_id)).fetchone()[0]


def count_rounds_after(conn: sqlite3.Connection, after_id: int) -> int:
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id > ? AND baseline = 0", (after_id,)).fetchone()[0]


def median_round_seconds(conn: sqlite3.Connection, upto_id: int, last: int = 500) -> float | None:
    """Median length (s) of the last ``last`` rounds up to ``upto_id``; None without rounds."""
    rows = conn.execute(
        f"SELECT {_ROUND_SECONDS} FROM rounds r WHERE r.id <= ? AND r.baseline = 0 ORDER BY r.id DESC LIMIT ?",
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


# --- the rows one evaluation reads (each table once; app/services/evaluation/batch.py) -------------

def _tuples(cursor, text_columns: Sequence[int] = ()) -> list[tuple]:
    """Rows as plain tuples, the text of ``text_columns`` shared (one str per distinct address,
    protocol or process: a batch holds hundreds of thousands of rows naming a few thousand)."""
    if not text_columns:
        return [tuple(r) for r in cursor]
    shared: dict = {}
    out = []
    for row in cursor:
        row = list(row)
        for i in text_columns:
            row[i] = shared.setdefault(row[i], row[i])
        out.append(tuple(row))
    return out


def port_stats_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, port_id, packets, bytes, payload_bytes, max_payload, syn, synack, rst), rounds lo..last."""
    return _tuples(conn.execute(
        "SELECT round_id, port_id, packets, bytes, payload_bytes, COALESCE(max_payload, 0), syn, synack, rst "
        "FROM port_stats WHERE round_id BETWEEN ? AND ?", (lo, last)))


def occupancy_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, port_id, pid, process, established, user, address) per holder, lo..last, by round."""
    return _tuples(conn.execute(
        "SELECT round_id, port_id, pid, process, established, user, address FROM rounds_ports "
        "WHERE round_id BETWEEN ? AND ? ORDER BY round_id, id", (lo, last)), (3, 5, 6))


def dns_counts(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, port_id, dns_packets) from the sniffer sample, lo..last."""
    return _tuples(conn.execute(
        "SELECT round_id, port_id, COUNT(*) FROM packets "
        "WHERE round_id BETWEEN ? AND ? AND port_id IS NOT NULL "
        "  AND (qry_name IS NOT NULL OR protocols LIKE '%dns%') GROUP BY round_id, port_id", (lo, last)))


def source_stats_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, address, packets, bytes, syn, distinct_ports), lo..last."""
    return _tuples(conn.execute(
        "SELECT round_id, address, packets, bytes, syn, distinct_ports FROM source_stats "
        "WHERE round_id BETWEEN ? AND ?", (lo, last)), (1,))


def source_port_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, address, port, protocol, packets, bytes), lo..last: which local port each source
    reached, per round the larger of the source_ports and inbound flows evidence (packets; answers
    to this host's own connections left out); bytes from flows (0 where only source_ports knew it)."""
    return _tuples(conn.execute(
        "SELECT round_id, address, port, protocol, MAX(packets), MAX(bytes) FROM ("
        "  SELECT round_id, address, port, protocol, packets, 0 AS bytes FROM source_ports"
        "  WHERE round_id BETWEEN ?1 AND ?2"
        "  UNION ALL SELECT round_id, src_address, dst_port, protocol, SUM(packets), SUM(bytes) FROM flows"
        "  WHERE round_id BETWEEN ?1 AND ?2 AND direction = 'in' AND (tcp_flags & 256) = 0"   # 256: an answer
        "  GROUP BY round_id, src_address, dst_port, protocol"
        ") GROUP BY round_id, address, port, protocol", (lo, last)), (1, 3))


def first_occupancy_round(conn: sqlite3.Connection) -> int | None:
    """The first round with any scanner data (None: none yet)."""
    return conn.execute("SELECT MIN(round_id) FROM rounds_ports").fetchone()[0]


def open_scans(conn: sqlite3.Connection, lo: int, before_id: int) -> list[sqlite3.Row]:
    """Stored port_scan anomalies rows (with port, protocol) whose last round is in lo..before_id-1."""
    return conn.execute(
        "SELECT a.*, p.value AS port, p.protocol FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id "
        "WHERE a.detector = 'port_scan' AND a.last_round_id >= ? AND a.last_round_id < ? ORDER BY a.id",
        (lo, before_id)).fetchall()


# --- what left the host ------------------------------------------------------------------------------

def egress_port_stats_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, port_id, packets, bytes) outbound per local port, lo..last."""
    return _tuples(conn.execute(
        "SELECT round_id, port_id, packets, bytes FROM egress_port_stats WHERE round_id BETWEEN ? AND ?", (lo, last)))


def destination_stats_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, address, packets, bytes, syn, distinct_ports) per remote address, lo..last."""
    return _tuples(conn.execute(
        "SELECT round_id, address, packets, bytes, syn, distinct_ports FROM destination_stats "
        "WHERE round_id BETWEEN ? AND ?", (lo, last)), (1,))


def outbound_flow_rows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple]:
    """(round_id, dst_address, dst_port, protocol, src_port, packets, bytes, first_seen, last_seen,
    tcp_flags) of the flows with direction 'out', lo..last, by round."""
    return _tuples(conn.execute(
        "SELECT round_id, dst_address, dst_port, protocol, src_port, packets, bytes, first_seen, last_seen, tcp_flags "
        "FROM flows WHERE direction = 'out' AND round_id BETWEEN ? AND ? ORDER BY round_id", (lo, last)), (1, 3))


def baseline_span(conn: sqlite3.Connection, since_time: float, before_id: int) -> tuple[int | None, int]:
    """(first id, count) of the rounds that ended at or after ``since_time`` with id < before_id."""
    row = conn.execute("SELECT MIN(id), COUNT(*) FROM rounds WHERE end_time >= ? AND id < ? AND baseline = 0",
                       (since_time, before_id)).fetchone()
    return row[0], row[1]


def destination_totals(conn: sqlite3.Connection, lo: int, last: int) -> dict[str, tuple[int, int, int]]:
    """address -> (rounds, bytes, max_round_bytes) sent to it in rounds lo..last."""
    return {row[0]: (row[1], row[2], row[3]) for row in conn.execute(
        "SELECT address, COUNT(*), SUM(bytes), MAX(bytes) FROM destination_stats "
        "WHERE round_id BETWEEN ? AND ? GROUP BY address", (lo, last))}


def host_out_bytes(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple[int, int]]:
    """[(round_id, bytes)] the host sent out (all destinations) per round lo..last that sent anything."""
    return [tuple(r) for r in conn.execute(
        "SELECT round_id, SUM(bytes) FROM destination_stats WHERE round_id BETWEEN ? AND ? "
        "GROUP BY round_id ORDER BY round_id", (lo, last))]


def dns_query_rows(conn: sqlite3.Connection, first: int, last: int) -> list[tuple]:
    """(round_id, timestamp, src_address, dst_address, qry_name, qry_type, rcode, response) of the
    sniffer rows with a DNS name, rounds first..last, by time; response: 1 for a response."""
    return _tuples(conn.execute(
        "SELECT round_id, timestamp, src_address, dst_address, qry_name, qry_type, rcode, "
        "       (rcode IS NOT NULL OR resp_name IS NOT NULL) FROM packets "
        "WHERE round_id BETWEEN ? AND ? AND qry_name IS NOT NULL ORDER BY timestamp", (first, last)), (2, 3))
