"""Two-way history per address (the ``peers`` table), hop counts per source, per-round source counts.

``peers``: one row per address that had a two-way conversation with this host (completed a TCP
handshake, or a conversation this host answered): first_seen, last_two_way (epoch seconds),
two_way_rounds. Until the egress program fills it (issue 9, kernel half), the evaluation fills it
from the ingress flows that show a completed handshake (:func:`handshake_flows`).

The hop-count and per-round count columns (``source_stats.ttl_min``/``ttl_max``,
``rounds.new_sources``/``source_evictions``) come with the kernel half of issue 9: every reader
here checks they exist and answers None/{} when they do not.
"""
from __future__ import annotations

import sqlite3
from typing import Iterable

# TCP flags (flows.tcp_flags is the OR of the flags seen)
SYN, RST, PSH, ACK = 0x02, 0x04, 0x08, 0x10
# a flow shows a completed handshake from ingress when it carries SYN and ACK (the client's SYN
# then its ACK, or a server's SYN-ACK to this host's own SYN), or data with ACK (a conversation
# whose SYN was counted in an earlier flow entry), and at least 2 packets
_TWO_WAY_FLOW = (f"protocol = 'tcp' AND packets >= 2 AND ((tcp_flags & {SYN | ACK}) = {SYN | ACK} "
                 f"OR (tcp_flags & {PSH | ACK}) = {PSH | ACK})")

ROUND_COUNT_COLUMNS = ("new_sources", "source_evictions", "srcport_evictions")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def has_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'peers'").fetchone() is not None


def handshake_flows(conn: sqlite3.Connection, lo: int, last: int) -> list[tuple[int, str, int, str, int]]:
    """(round_id, source address, local port, protocol, reset) of the stored flows in rounds lo..last
    that show a completed TCP handshake seen from ingress (see ``_TWO_WAY_FLOW``), one row per
    (round, address, port, protocol); reset 1 when one of them also carried an RST. A blind forger's
    SYN then ACK under an address whose owner is online draws that owner's RST on the same 5-tuple
    (it answers this host's SYN-ACK it never asked for): such flows are history, not evidence."""
    return [tuple(r) for r in conn.execute(
        f"SELECT round_id, src_address, dst_port, protocol, MAX((tcp_flags & {RST}) != 0) FROM flows "
        f"WHERE round_id BETWEEN ? AND ? AND {_TWO_WAY_FLOW} GROUP BY round_id, src_address, dst_port, protocol",
        (lo, last))]


def record_two_way(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, float]]) -> int:
    """Upsert peers from (address, round_id, round end time) rows (one per address and round).
    The caller owns the transaction. Returns the number of addresses touched."""
    per: dict[str, list] = {}
    for address, round_id, at in rows:
        seen = per.setdefault(address, [at, at, set()])
        seen[0], seen[1] = min(seen[0], at), max(seen[1], at)
        seen[2].add(round_id)
    conn.executemany(
        "INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(address) DO UPDATE SET first_seen = MIN(first_seen, excluded.first_seen), "
        "last_two_way = MAX(last_two_way, excluded.last_two_way), "
        "two_way_rounds = two_way_rounds + excluded.two_way_rounds",
        [(a, first, last, len(ids)) for a, (first, last, ids) in per.items()])
    return len(per)


def two_way_since(conn: sqlite3.Connection, address: str, since: float) -> bool:
    """True when ``address`` had a two-way conversation with this host at or after ``since`` (epoch s)."""
    row = conn.execute("SELECT 1 FROM peers WHERE address = ? AND last_two_way >= ?", (address, since)).fetchone()
    return row is not None


def peer(conn: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM peers WHERE address = ?", (address,)).fetchone()


def ttl_range(conn: sqlite3.Connection, address: str, first: int, last: int) -> tuple[int, int] | None:
    """(lowest, highest) IP TTL ``address`` was seen with in rounds first..last (source_stats
    ttl_min/ttl_max), or None when those columns do not exist (yet) or hold nothing for it."""
    if not {"ttl_min", "ttl_max"} <= _columns(conn, "source_stats"):
        return None
    row = conn.execute("SELECT MIN(ttl_min), MAX(ttl_max) FROM source_stats "
                       "WHERE address = ? AND round_id BETWEEN ? AND ? AND ttl_min IS NOT NULL AND ttl_max IS NOT NULL",
                       (address, first, last)).fetchone()
    return None if row is None or row[0] is None or row[1] is None else (int(row[0]), int(row[1]))


def round_counts(conn: sqlite3.Connection, lo: int, last: int) -> dict[int, dict[str, int]]:
    """round_id -> {new_sources, source_evictions, srcport_evictions} for rounds lo..last, each
    column only where it exists and is not NULL ({} when none exists)."""
    present = [c for c in ROUND_COUNT_COLUMNS if c in _columns(conn, "rounds")]
    if not present:
        return {}
    out: dict[int, dict[str, int]] = {}
    for row in conn.execute(f"SELECT id, {', '.join(present)} FROM rounds WHERE id BETWEEN ? AND ?", (lo, last)):
        counts = {name: int(row[i + 1]) for i, name in enumerate(present) if row[i + 1] is not None}
        if counts:
            out[row[0]] = counts
    return out
