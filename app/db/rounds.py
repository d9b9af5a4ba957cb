"""Queries for rounds and their kernel counters (rounds, port_stats, source_stats, source_ports,
flows, global_stats, counter_snapshots, xdp_loads, blacklist_drops, database_identity; the egress tables
are in app/db/egress.py, two-way peers in app/db/peers.py).

The collector writes one round with :func:`insert_round` and friends inside ONE transaction
(``with conn:``), snapshot included, so a run killed mid-write leaves the previous snapshot in
place and the next round counts everything since then. A snapshot is a header row
(counter_snapshots) and its records split into buckets by key (snapshot_buckets): a round rewrites only
the buckets whose keys changed, so its cost follows the round's traffic, not the maps' fill.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Iterable


@dataclass
class StoredSnapshot:
    """The last stored snapshot of one map: its header and, when ``buckets`` is set, its (keys, counters)
    parts by bucket; a snapshot stored before buckets existed is one BLOB in ``blob``."""
    taken_at: float
    program_id: int | None
    map_id: int | None
    epoch: str | None
    entries: int
    buckets: int | None
    parts: list[tuple[bytes, bytes]]
    blob: bytes | None = None


KEYS_PART, COUNTERS_PART = 0, 1


def load_snapshot(conn: sqlite3.Connection, interface: str, map_name: str) -> StoredSnapshot | None:
    """The last snapshot of one map, or None."""
    row = conn.execute("SELECT taken_at, program_id, map_id, epoch, entries, buckets, data FROM counter_snapshots "
                       "WHERE interface = ? AND map_name = ?", (interface, map_name)).fetchone()
    if row is None:
        return None
    if row[5] is None:
        return StoredSnapshot(row[0], row[1], row[2], row[3], row[4], None, [], row[6])
    found: dict[int, list] = {}
    for part, bucket, data in conn.execute("SELECT part, bucket, data FROM snapshot_buckets WHERE interface = ? AND "
                                           "map_name = ?", (interface, map_name)):
        found.setdefault(bucket, [b"", b""])[part] = data
    return StoredSnapshot(row[0], row[1], row[2], row[3], row[4], row[5],
                          [tuple(found[b]) for b in sorted(found)])


def snapshot_heads(conn, interface: str) -> dict[str, tuple[int | None, str | None]]:
    """map name -> (kernel id of the map its last snapshot was read from, the takeover epoch it was read
    under) — None for either: stored before ids / epochs were — without reading the snapshots themselves."""
    rows = conn.execute("SELECT map_name, map_id, epoch FROM counter_snapshots WHERE interface = ?", (interface,))
    return {r[0]: (r[1], r[2]) for r in rows}


def save_snapshot(conn, interface: str, map_name: str, taken_at: float, round_id: int | None,
                  program_id: int | None, entries: int, map_id: int | None, epoch: str | None, buckets: int,
                  parts: dict[int, dict[int, bytes]], whole: bool) -> None:
    """Store one map's snapshot: the header, and ``parts`` {KEYS_PART or COUNTERS_PART: {bucket: data}} (empty
    data removes that part of the bucket). ``whole``: ``parts`` is the whole snapshot (every other row goes);
    else the parts not named are unchanged since the last snapshot and stay as they are."""
    conn.execute("INSERT INTO counter_snapshots (interface, map_name, taken_at, round_id, program_id, entries, data, "
                 "map_id, epoch, buckets) VALUES (?, ?, ?, ?, ?, ?, x'', ?, ?, ?) ON CONFLICT(interface, map_name) "
                 "DO UPDATE SET taken_at = excluded.taken_at, round_id = excluded.round_id, "
                 "program_id = excluded.program_id, entries = excluded.entries, data = x'', map_id = excluded.map_id, "
                 "epoch = excluded.epoch, buckets = excluded.buckets",
                 (interface, map_name, taken_at, round_id, program_id, entries, map_id, epoch, buckets))
    if whole:
        conn.execute("DELETE FROM snapshot_buckets WHERE interface = ? AND map_name = ?", (interface, map_name))
    for part, blobs in parts.items():
        conn.executemany("DELETE FROM snapshot_buckets WHERE interface = ? AND map_name = ? AND part = ? AND bucket = ?",
                         ((interface, map_name, part, b) for b, data in blobs.items() if not data and not whole))
        conn.executemany("INSERT INTO snapshot_buckets (interface, map_name, part, bucket, data) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(interface, map_name, part, bucket) DO UPDATE SET data = excluded.data",
                         ((interface, map_name, part, b, data) for b, data in blobs.items() if data))


def load_snapshot_log(conn, interface: str, map_name: str) -> list[tuple[bytes, bytes, bytes]]:
    """(keys, counters, gone) of each log record of one map's snapshot, oldest first."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT keys, counters, gone FROM snapshot_log WHERE interface = ? AND map_name = ? ORDER BY seq",
        (interface, map_name))]


def append_snapshot_log(conn, interface: str, map_name: str, keys: bytes, counters: bytes, gone: bytes) -> None:
    conn.execute("INSERT INTO snapshot_log (interface, map_name, seq, keys, counters, gone) VALUES (?, ?, "
                 "(SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshot_log WHERE interface = ? AND map_name = ?), ?, ?, ?)",
                 (interface, map_name, interface, map_name, keys, counters, gone))


def clear_snapshot_log(conn, interface: str, map_name: str) -> None:
    conn.execute("DELETE FROM snapshot_log WHERE interface = ? AND map_name = ?", (interface, map_name))


def insert_round(conn, values: dict) -> int:
    """Insert a rounds row from a column -> value dict; returns its id."""
    cols = ", ".join(values)
    marks = ", ".join("?" * len(values))
    return conn.execute(f"INSERT INTO rounds ({cols}) VALUES ({marks})", tuple(values.values())).lastrowid


def update_round(conn, round_id: int, values: dict) -> None:
    sets = ", ".join(f"{k} = ?" for k in values)
    conn.execute(f"UPDATE rounds SET {sets} WHERE id = ?", (*values.values(), round_id))


def insert_port_stats(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (port_id, packets, bytes, payload_bytes, min_payload, max_payload, syn, synack, rst, fin)."""
    conn.executemany("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes, min_payload, "
                     "max_payload, syn, synack, rst, fin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     ((round_id, *r) for r in rows))


def insert_source_stats(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (address, packets, bytes, syn, distinct_ports, fragments, ttl_min, ttl_max, mac)."""
    conn.executemany("INSERT INTO source_stats (round_id, address, packets, bytes, syn, distinct_ports, fragments, "
                     "ttl_min, ttl_max, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ((round_id, *r) for r in rows))


def insert_source_ports(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (address, port, protocol, packets)."""
    conn.executemany("INSERT INTO source_ports (round_id, address, port, protocol, packets) VALUES (?, ?, ?, ?, ?)",
                     ((round_id, *r) for r in rows))


def insert_flows(conn, round_id: int, rows: Iterable[tuple], direction: str = "in") -> None:
    """rows: (src_address, src_port, dst_address, dst_port, protocol, packets, bytes, first_seen, last_seen,
    tcp_flags, reason); direction 'in' (XDP ingress) or 'out' (TC egress)."""
    conn.executemany("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                     "bytes, first_seen, last_seen, tcp_flags, reason, direction) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     ((round_id, *r, direction) for r in rows))


def insert_global_stats(conn, round_id: int, values: dict[str, int]) -> None:
    conn.executemany("INSERT INTO global_stats (round_id, name, value) VALUES (?, ?, ?)",
                     ((round_id, k, v) for k, v in values.items()))


def insert_blacklist_drops(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (address CIDR, drops in this round, answers to this host's conversations passed in it)."""
    conn.executemany("INSERT INTO blacklist_drops (round_id, address, drops, replies) VALUES (?, ?, ?, ?)",
                     ((round_id, *r) for r in rows))


def insert_xdp_load(conn, interface: str, loaded_at: float, mode: str, program_id: int, source_hash: str,
                    reason: str, compile_seconds: float) -> int:
    return conn.execute("INSERT INTO xdp_loads (interface, loaded_at, mode, program_id, source_hash, reason, "
                        "compile_seconds) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (interface, loaded_at, mode, program_id, source_hash, reason, compile_seconds)).lastrowid


def last_round(conn, interface: str | None = None) -> sqlite3.Row | None:
    if interface:
        return conn.execute("SELECT * FROM rounds WHERE interface = ? ORDER BY id DESC LIMIT 1", (interface,)).fetchone()
    return conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()


def database_id(conn) -> str:
    """This database's random identity (made on first use, in its own transaction)."""
    row = conn.execute("SELECT id FROM database_identity LIMIT 1").fetchone()
    if row:
        return row[0]
    import time
    import uuid
    with conn:
        row = conn.execute("SELECT id FROM database_identity LIMIT 1").fetchone()
        if row:
            return row[0]
        new_id = uuid.uuid4().hex
        conn.execute("INSERT INTO database_identity (id, created_at) VALUES (?, ?)", (new_id, time.time()))
    return new_id


def read_database_id(conn) -> str | None:
    """The identity, or None when it was never made (read-only)."""
    try:
        row = conn.execute("SELECT id FROM database_identity LIMIT 1").fetchone()
    except sqlite3.OperationalError:        # a database older than the table
        return None
    return row[0] if row else None
