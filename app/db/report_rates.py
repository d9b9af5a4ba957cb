"""Read-only queries behind the report's rates and its one drop count (app/services/ops/reports/).

Rates are counts over the span a round's counters cover (:func:`round_rates`), not over the round's
length; the one drop count is the rounds' XDP counter (:func:`drop_total`). ``since`` everywhere: Unix
epoch seconds, or None for everything.
"""
from __future__ import annotations

import sqlite3

_EPOCH_ZERO = -1e18
# the span a round's counts cover, in seconds (never 0: a division follows)
_COVERED_FROM = "COALESCE(r.counts_since, r.start_time)"
_SECONDS = f"MAX(r.end_time - {_COVERED_FROM}, 0.001)"


def _since(since: float | None) -> float:
    return _EPOCH_ZERO if since is None else float(since)


def round_rates(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Per round in time order: (round_id, covered_from, end_time, seconds, interface, total_packets,
    unparsed_packets, drops: rounds.dropped_packets, attributed: the blacklist_drops rows' sum).

    A round's counters are the difference since the previous snapshot, so they cover
    ``counts_since .. end_time`` (``counts_since`` NULL: the round's own start), not the round's length:
    the first round after a 80 s gap between two collector runs holds the gap's packets too. Every
    per-round row here carries that covered span as ``covered_from`` and ``seconds`` (what the
    evaluator's series use too, app/db/series.py); rates are counts / seconds. Baseline rounds (counts
    from before this database watched the interface, stored as zero traffic) are no rate at all and are
    left out."""
    return conn.execute(
        f"""SELECT r.id AS round_id, {_COVERED_FROM} AS covered_from, r.end_time, {_SECONDS} AS seconds,
                  r.interface, r.total_packets, r.unparsed_packets, r.dropped_packets AS drops,
                  COALESCE((SELECT SUM(bd.drops) FROM blacklist_drops bd WHERE bd.round_id = r.id), 0) AS attributed
           FROM rounds r WHERE r.end_time >= ? AND r.baseline = 0 ORDER BY r.end_time""",
        (_since(since),)).fetchall()


def drop_total(conn: sqlite3.Connection, since: float | None = None) -> int:
    """Packets the XDP blocklist dropped (blocked sources, ingress) in the rounds that ended at or
    after ``since`` (every interface).

    The rounds' XDP counter (``rounds.dropped_packets``, the kernel's global drop counter differenced
    per round) is the report's and ``blacklist list``'s ONE drop total: it holds every drop, including
    those of an entry removed or expired between two rounds (its last drops reach the ledger but never
    a per-round ``blacklist_drops`` row, because the entry has left the map when the next round reads
    it). ``blacklist_drops`` gives the per-address split (:func:`drops_by_round_and_address`); what it
    misses is shown as "entries gone before the round closed"."""
    return int(conn.execute("SELECT COALESCE(SUM(dropped_packets), 0) FROM rounds WHERE end_time >= ?",
                            (_since(since),)).fetchone()[0])


def egress_drop_total(conn: sqlite3.Connection, since: float | None = None) -> int:
    """Packets to blocked destinations the TC egress program dropped in those rounds (0 while egress
    blocking is off, or on a database older than the egress program)."""
    return int(conn.execute("SELECT COALESCE(SUM(egress_dropped_packets), 0) FROM rounds WHERE end_time >= ?",
                            (_since(since),)).fetchone()[0])


def port_rate_series(conn: sqlite3.Connection, port_ids: list[int], since: float | None) -> list[sqlite3.Row]:
    """One row per round, summed over ``port_ids``: (round_id, covered_from, end_time, seconds,
    packets, bytes, syn); zeros where those ports saw nothing."""
    marks = ",".join("?" * len(port_ids)) or "NULL"
    return conn.execute(
        f"""SELECT r.id AS round_id, {_COVERED_FROM} AS covered_from, r.end_time, {_SECONDS} AS seconds,
                  COALESCE(SUM(ps.packets), 0) AS packets, COALESCE(SUM(ps.bytes), 0) AS bytes,
                  COALESCE(SUM(ps.syn), 0) AS syn
           FROM rounds r LEFT JOIN port_stats ps ON ps.round_id = r.id AND ps.port_id IN ({marks})
           WHERE r.end_time >= ? AND r.baseline = 0 GROUP BY r.id ORDER BY r.end_time""",
        (*[int(p) for p in port_ids], _since(since))).fetchall()


def busiest_ports(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """The ports with the most packets in the window: (port_id, value, protocol, packets)."""
    return conn.execute(
        """SELECT ps.port_id, p.value, p.protocol, SUM(ps.packets) AS packets
           FROM port_stats ps JOIN rounds r ON r.id = ps.round_id JOIN ports p ON p.id = ps.port_id
           WHERE r.end_time >= ?
           GROUP BY ps.port_id ORDER BY packets DESC, p.protocol, p.value LIMIT ?""",
        (_since(since), int(limit))).fetchall()


def port_totals(conn: sqlite3.Connection, since: float | None) -> tuple[int, int]:
    """(ports with traffic, their packets) in the window: what 'other ports' is a share of."""
    row = conn.execute(
        """SELECT COUNT(DISTINCT ps.port_id), COALESCE(SUM(ps.packets), 0)
           FROM port_stats ps JOIN rounds r ON r.id = ps.round_id WHERE r.end_time >= ?""",
        (_since(since),)).fetchone()
    return int(row[0]), int(row[1])


def drops_by_round_and_address(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """(round_id, end_time, seconds, address, drops, replies) for every per-round drop row in the window
    (replies: answers to this host's own conversations the entry passed)."""
    return conn.execute(
        f"""SELECT r.id AS round_id, r.end_time, {_SECONDS} AS seconds, bd.address, bd.drops, bd.replies
           FROM blacklist_drops bd JOIN rounds r ON r.id = bd.round_id
           WHERE r.end_time >= ? ORDER BY r.end_time, bd.address""", (_since(since),)).fetchall()


def table_anomalies(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """The newest anomalies of every detector with what Finding.from_row reads (reasons, rounds,
    port AS value and protocol) plus created_at."""
    return conn.execute(
        """SELECT a.id, a.evaluation_id, a.port_id, a.detector, a.created_at, a.score, a.threshold, a.reasons,
                  a.source, a.first_round_id, a.last_round_id, p.value AS port, p.protocol
           FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
           WHERE a.created_at >= ? ORDER BY a.created_at DESC, a.id DESC LIMIT ?""",
        (_since(since), int(limit))).fetchall()
