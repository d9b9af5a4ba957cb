"""Read-only queries behind the report's rates and its one drop count (app/services/reports/).

Rates: every per-round row carries its round's length (``seconds`` = end_time - start_time), so
the report divides by it: rounds of 2 s and 56 s are comparable. Drops: the ledger's per-round drop
counts (table ``blacklist_drops``, what reconcile added to each entry) are the report's ONE source
of drop figures: the overview, the traffic figure, the blocklist figure and the blocklist table all
sum these rows, so they agree. ``since``: Unix epoch seconds or None for everything.
"""
from __future__ import annotations

import sqlite3

_EPOCH_ZERO = -1e18


def _since(since: float | None) -> float:
    return _EPOCH_ZERO if since is None else float(since)


def round_rates(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Per round in time order: (round_id, start_time, end_time, seconds, interface, total_packets,
    unparsed_packets, drops) with drops from blacklist_drops."""
    return conn.execute(
        """SELECT r.id AS round_id, r.start_time, r.end_time, MAX(r.end_time - r.start_time, 0.001) AS seconds,
                  r.interface, r.total_packets, r.unparsed_packets,
                  COALESCE((SELECT SUM(bd.drops) FROM blacklist_drops bd WHERE bd.round_id = r.id), 0) AS drops
           FROM rounds r WHERE r.end_time >= ? ORDER BY r.end_time""", (_since(since),)).fetchall()


def port_rate_series(conn: sqlite3.Connection, port_id: int, since: float | None) -> list[sqlite3.Row]:
    """One row per round: (round_id, start_time, end_time, seconds, packets, bytes, syn); zeros where
    the port saw nothing."""
    return conn.execute(
        """SELECT r.id AS round_id, r.start_time, r.end_time, MAX(r.end_time - r.start_time, 0.001) AS seconds,
                  COALESCE(ps.packets, 0) AS packets, COALESCE(ps.bytes, 0) AS bytes, COALESCE(ps.syn, 0) AS syn
           FROM rounds r LEFT JOIN port_stats ps ON ps.round_id = r.id AND ps.port_id = ?
           WHERE r.end_time >= ? ORDER BY r.end_time""", (port_id, _since(since))).fetchall()


def busiest_ports(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """The ports with the most packets in the window: (port_id, value, protocol, packets)."""
    return conn.execute(
        """SELECT ps.port_id, p.value, p.protocol, SUM(ps.packets) AS packets
           FROM port_stats ps JOIN rounds r ON r.id = ps.round_id JOIN ports p ON p.id = ps.port_id
           WHERE r.end_time >= ?
           GROUP BY ps.port_id ORDER BY packets DESC, p.protocol, p.value LIMIT ?""",
        (_since(since), int(limit))).fetchall()


def drops_by_round_and_address(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """(round_id, end_time, seconds, address, drops, replies) for every ledger drop row in the window
    (replies: answers to this host's own conversations the entry passed)."""
    return conn.execute(
        """SELECT r.id AS round_id, r.end_time, MAX(r.end_time - r.start_time, 0.001) AS seconds, bd.address, bd.drops,
                  bd.replies
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
