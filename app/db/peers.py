"""Verified peers: remote addresses that proved they talked WITH this host (the evidence class that
decides whether a source may be blocked on one-way evidence), their fingerprints, hop counts per
source and per-round source counts. The collector records the proofs each round
(:func:`record_two_way` says which count); :func:`two_way_since` answers "has this address proved
itself since T" in one indexed lookup.
"""
from __future__ import annotations

import sqlite3
from typing import Iterable

# TCP flags (flows.tcp_flags is the OR of the flags seen)
SYN, RST, PSH, ACK = 0x02, 0x04, 0x08, 0x10
REPLY = 0x100      # PW_FLOW_REPLY: the flow answered a conversation this host opened (never evidence)
# a flow shows a completed handshake from ingress when it carries SYN and ACK (the client's SYN
# then its ACK, or a server's SYN-ACK to this host's own SYN), or data with ACK (a conversation
# whose SYN was counted in an earlier flow entry), and at least 2 packets
_TWO_WAY_FLOW = (f"protocol = 'tcp' AND packets >= 2 AND (tcp_flags & {REPLY}) = 0 AND "
                 f"((tcp_flags & {SYN | ACK}) = {SYN | ACK} OR (tcp_flags & {PSH | ACK}) = {PSH | ACK})")

ROUND_COUNT_COLUMNS = ("new_sources", "source_evictions", "srcport_evictions")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


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


def verified_peers(conn: sqlite3.Connection, since: float) -> list[sqlite3.Row]:
    """The peers rows (address, last_verified, last_two_way, ttl, mac) of the addresses with a proof
    (``peers.proof``) at or after ``since`` (epoch seconds): what an evaluation loads once."""
    return conn.execute("SELECT address, last_verified, last_two_way, ttl, mac FROM peers "
                        "WHERE proof IS NOT NULL AND last_verified >= ?", (since,)).fetchall()


def fingerprints(conn: sqlite3.Connection, addresses: Iterable[str], first: int,
                 last: int) -> dict[str, list[tuple[int, int | None, int | None, str | None]]]:
    """address -> [(round_id, ttl_min, ttl_max, mac)] of its source_stats rows in rounds first..last
    (IP TTL range and source MAC per round: 'mixed' when several came in one round), for the given
    addresses only; {} when those columns do not exist (yet)."""
    if not {"ttl_min", "ttl_max", "mac"} <= _columns(conn, "source_stats"):
        return {}
    out: dict[str, list] = {}
    for chunk in _chunks(sorted(set(addresses))):
        marks = ", ".join("?" * len(chunk))
        for row in conn.execute(f"SELECT address, round_id, ttl_min, ttl_max, mac FROM source_stats WHERE address IN "
                                f"({marks}) AND round_id BETWEEN ? AND ?", (*chunk, first, last)):
            out.setdefault(row[0], []).append((row[1], row[2], row[3], row[4]))
    return out


def ttl_before(conn: sqlite3.Connection, addresses: Iterable[str], before: int) -> dict[str, tuple[int, int]]:
    """address -> (lowest, highest) IP TTL it was seen with in rounds before ``before``, for the given
    addresses that have any (each one an indexed range of source_stats (address, round_id))."""
    if not {"ttl_min", "ttl_max"} <= _columns(conn, "source_stats"):
        return {}
    out = {}
    for chunk in _chunks(sorted(set(addresses))):
        marks = ", ".join("?" * len(chunk))
        for address, low, high in conn.execute(
                f"SELECT address, MIN(ttl_min), MAX(ttl_max) FROM source_stats WHERE address IN ({marks}) "
                "AND round_id < ? AND ttl_min IS NOT NULL AND ttl_max IS NOT NULL GROUP BY address", (*chunk, before)):
            if low is not None and high is not None:
                out[address] = (int(low), int(high))
    return out


def _chunks(values: list, size: int = 500):
    """``values`` in slices of ``size``: SQLite bounds the number of ? in one statement."""
    for i in range(0, len(values), size):
        yield values[i:i + size]


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



def record_two_way(conn, round_id: int | None, at: float, verified: dict[str, tuple[str, int | None, str | None]],
                   established: Iterable[str] = ()) -> int:
    """Upsert the verified peers of one round: ``verified`` maps an address (text, e.g. '198.18.0.2',
    '2001:db8::2') to (proof, TTL, MAC text or None) of its latest proof in the round; ``established``
    holds the remote addresses of ESTABLISHED sockets (proof 'established', no fingerprint). A proof
    with a TTL replaces the stored fingerprint whole: its MAC None (an off-link sender) clears an older
    MAC; an 'established' proof keeps the stored fingerprint.

    A proof is something a blind forger cannot do: 'handshake' (its ACK acknowledged this host's
    SYN-ACK ISN + 1), 'opened-tcp' (its SYN-ACK acknowledged this host's SYN), 'opened-udp' (it
    answered this host's datagram from the same address and port) — all three seen by the XDP program
    (bpf/port_flow.c, map ``verified``) — or 'established' (an ESTABLISHED socket the scanner saw). An
    inbound UDP request this host answered, or a segment that does not acknowledge this host's
    sequence number, makes no peer.

    Returns the number of distinct addresses recorded."""
    rows = []
    for address in sorted(set(verified) | set(established)):
        proof, ttl, mac = verified.get(address, ("established", None, None))
        rows.append((address, at, at, round_id, proof, proof, ttl, mac, at))
    conn.executemany(
        "INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds, last_round_id, last_evidence, proof, "
        "ttl, mac, last_verified) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET "
        "last_two_way = MAX(last_two_way, excluded.last_two_way), two_way_rounds = two_way_rounds + 1, "
        "last_round_id = excluded.last_round_id, last_evidence = excluded.last_evidence, proof = excluded.proof, "
        "ttl = COALESCE(excluded.ttl, ttl), mac = CASE WHEN excluded.ttl IS NULL THEN mac ELSE excluded.mac END, "
        "last_verified = MAX(COALESCE(last_verified, 0), excluded.last_verified)", rows)
    return len(rows)


def two_way_since(conn: sqlite3.Connection, address: str, since: float) -> bool:
    """True when ``address`` (text as stored: '198.18.0.2', '2001:db8::2', '::ffff:198.18.0.2' is an
    IPv6 peer, not the IPv4 one) proved itself a peer (see :func:`record_two_way`) at or after ``since``
    (epoch seconds). Rows without a proof (an older portwatch's unverified two-way flows) do not count."""
    row = conn.execute("SELECT 1 FROM peers WHERE address = ? AND proof IS NOT NULL AND last_verified >= ?",
                       (address, since)).fetchone()
    return row is not None


def peer(conn: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    """The peers row of ``address`` (None: never two-way)."""
    return conn.execute("SELECT * FROM peers WHERE address = ?", (address,)).fetchone()
