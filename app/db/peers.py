"""Two-way peers: remote addresses that talked WITH this host (the evidence class that decides
whether a source may be blocked on one-way evidence: a forged source cannot complete a handshake), hop counts per source and
per-round source counts.

Each round the collector records the addresses with a two-way exchange in it (app/services/
egress_rounds.py: both directions of one TCP/UDP conversation on matching ports, TCP only with
the remote's ACK) and the remote addresses of the ESTABLISHED sockets the scanner saw
(:func:`record_two_way`). The evaluation adds the addresses whose ingress flows show a completed
handshake (:func:`handshake_flows`, :func:`record_handshakes`). One row per address;
:func:`two_way_since` answers "has this address talked with us since T" in one indexed lookup.
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
        f"WHERE round_id BETWEEN ? AND ? AND direction = 'in' AND {_TWO_WAY_FLOW} GROUP BY round_id, src_address, dst_port, protocol",
        (lo, last))]


def record_handshakes(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, float]]) -> int:
    """Upsert peers from ingress handshakes: (address, round_id, round end time) rows (one per address and round).
    The caller owns the transaction. Returns the number of addresses touched."""
    per: dict[str, list] = {}
    for address, round_id, at in rows:
        seen = per.setdefault(address, [at, at, set()])
        seen[0], seen[1] = min(seen[0], at), max(seen[1], at)
        seen[2].add(round_id)
    conn.executemany(
        "INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds, last_evidence) VALUES (?, ?, ?, ?, 'handshake') "
        "ON CONFLICT(address) DO UPDATE SET first_seen = MIN(first_seen, excluded.first_seen), "
        "last_two_way = MAX(last_two_way, excluded.last_two_way), "
        "two_way_rounds = two_way_rounds + excluded.two_way_rounds",
        [(a, first, last, len(ids)) for a, (first, last, ids) in per.items()])
    return len(per)




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



def record_two_way(conn, round_id: int | None, at: float, flow_peers: Iterable[str],
                   established: Iterable[str] = ()) -> int:
    """Upsert the peers of one round (addresses as text, e.g. '198.18.0.2', '2001:db8::2').

    Returns the number of distinct addresses recorded."""
    flows, est = set(flow_peers), set(established)
    rows = []
    for address in sorted(flows | est):
        evidence = "flows+established" if address in flows and address in est else (
            "flows" if address in flows else "established")
        rows.append((address, at, at, round_id, evidence))
    conn.executemany(
        "INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds, last_round_id, last_evidence) "
        "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(address) DO UPDATE SET "
        "last_two_way = MAX(last_two_way, excluded.last_two_way), two_way_rounds = two_way_rounds + 1, "
        "last_round_id = excluded.last_round_id, last_evidence = excluded.last_evidence", rows)
    return len(rows)


def two_way_since(conn: sqlite3.Connection, address: str, since: float) -> bool:
    """True when ``address`` (text as stored: '198.18.0.2', '2001:db8::2', '::ffff:198.18.0.2' is an
    IPv6 peer, not the IPv4 one) had a two-way exchange with this host at or after ``since``
    (epoch seconds)."""
    row = conn.execute("SELECT 1 FROM peers WHERE address = ? AND last_two_way >= ?", (address, since)).fetchone()
    return row is not None


def peer(conn: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    """The peers row of ``address`` (None: never two-way)."""
    return conn.execute("SELECT * FROM peers WHERE address = ?", (address,)).fetchone()
