"""Two-way peers: remote addresses that talked WITH this host (the evidence class that decides
whether a source may be blocked on one-way evidence, issue 9/12).

Each round the collector records the addresses with a two-way exchange in it (app/services/
egress_rounds.py: both directions of one TCP/UDP conversation on matching ports, TCP only with
the remote's ACK) and the remote addresses of the ESTABLISHED sockets the scanner saw. One row per
address; :func:`two_way_since` answers "has this address talked with us since T" in one indexed
lookup. Keep its signature stable: the blocking decisions use it.
"""
from __future__ import annotations

import sqlite3
from typing import Iterable


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
