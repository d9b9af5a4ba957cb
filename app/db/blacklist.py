"""Queries for the blocklist: the ledger (blacklist), its events, the per-interface map counters,
and a source's packet rate history (what decisions check before blocking for a model finding).

Writers call these inside :func:`immediate` (``BEGIN IMMEDIATE``): a reconcile reads the pinned
map and advances the ledger under SQLite's write lock, so two runs (a collector round and a
``blacklist add``) never count the same drops twice.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterable, Iterator

LISTED = ("active", "dry-run")           # statuses that are on the blocklist (enforced or simulated)


# --- transactions -------------------------------------------------------------------

@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction taken at once (BEGIN IMMEDIATE); committed on success, rolled back on error."""
    if conn.in_transaction:
        conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


# --- the ledger ----------------------------------------------------------------------------------

def get_entry(conn, address: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM blacklist WHERE address = ?", (address,)).fetchone()


def entries(conn, statuses: Iterable[str] | None = LISTED, direction: str | None = None) -> list[sqlite3.Row]:
    """Ledger rows with one of ``statuses`` (None: all) and ``direction`` ('in' | 'out'; None: both), newest first."""
    where, args = [], []
    if statuses is not None:
        statuses = tuple(statuses)
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        args.extend(statuses)
    if direction is not None:
        where.append("direction = ?")
        args.append(direction)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return conn.execute(f"SELECT * FROM blacklist{clause} ORDER BY created_at DESC, address", args).fetchall()


def replies_passed(conn) -> dict[str, int]:
    """address -> answers to this host's own conversations the entry let through (XDP passes them even
    from a blocked source), summed over the collector rounds since the entry was created."""
    rows = conn.execute("SELECT d.address, SUM(d.replies) FROM blacklist_drops d JOIN rounds r ON r.id = d.round_id "
                        "JOIN blacklist b ON b.address = d.address WHERE r.end_time >= b.created_at "
                        "GROUP BY d.address HAVING SUM(d.replies) > 0").fetchall()
    return {address: int(n) for address, n in rows}


def count_status(conn, status: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM blacklist WHERE status = ?", (status,)).fetchone()[0]


def upsert_entry(conn, address: str, reason: str, evidence: str | None, anomaly_id: int | None, origin: str,
                 created_at: float, expires_at: float | None, status: str, offences: int, direction: str = "in") -> None:
    """Insert or replace the ledger row of ``address``, keeping its all-time ``drops``. ``direction``:
    'in' (a source: the XDP blacklist) or 'out' (a destination: the TC egress block)."""
    conn.execute(
        "INSERT INTO blacklist (address, reason, evidence, anomaly_id, origin, created_at, expires_at, status, "
        "offences, removed_at, direction) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT(address) DO UPDATE "
        "SET reason = excluded.reason, evidence = excluded.evidence, anomaly_id = excluded.anomaly_id, "
        "origin = excluded.origin, created_at = excluded.created_at, expires_at = excluded.expires_at, "
        "status = excluded.status, offences = excluded.offences, removed_at = NULL, direction = excluded.direction",
        (address, reason, evidence, anomaly_id, origin, created_at, expires_at, status, offences, direction))


def mark_removed(conn, address: str, at: float) -> None:
    conn.execute("UPDATE blacklist SET status = 'removed', removed_at = ? WHERE address = ?", (at, address))


def expire_due(conn, now: float) -> list[sqlite3.Row]:
    """Listed rows whose expiry has passed become 'expired'; returns them (as they were)."""
    due = conn.execute("SELECT * FROM blacklist WHERE status IN ('active', 'dry-run') AND expires_at IS NOT NULL "
                       "AND expires_at <= ?", (now,)).fetchall()
    conn.executemany("UPDATE blacklist SET status = 'expired' WHERE address = ?", ((r["address"],) for r in due))
    return due


def add_drops(conn, address: str, drops: int) -> None:
    conn.execute("UPDATE blacklist SET drops = drops + ? WHERE address = ?", (drops, address))


# --- events --------------------------------------------------------------------------------------

def insert_event(conn, at: float, address: str, action: str, detail: str | None = None) -> None:
    conn.execute("INSERT INTO blacklist_events (at, address, action, detail) VALUES (?, ?, ?, ?)",
                 (at, address, action, detail))


def events(conn, address: str | None = None) -> list[sqlite3.Row]:
    if address is None:
        return conn.execute("SELECT * FROM blacklist_events ORDER BY id").fetchall()
    return conn.execute("SELECT * FROM blacklist_events WHERE address = ? ORDER BY id", (address,)).fetchall()


# --- per-interface map counters (the reconcile baseline) -----------------------------------------

def map_counters(conn, interface: str) -> dict[str, tuple[int, int]]:
    """address -> (drops, drop_bytes) last read from ``interface``'s map."""
    rows = conn.execute("SELECT address, drops, drop_bytes FROM blacklist_map_counters WHERE interface = ?",
                        (interface,))
    return {r[0]: (r[1], r[2]) for r in rows}


def set_map_counter(conn, interface: str, address: str, drops: int, drop_bytes: int, at: float) -> None:
    conn.execute("INSERT INTO blacklist_map_counters (interface, address, drops, drop_bytes, read_at) "
                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT(interface, address) DO UPDATE SET drops = excluded.drops, "
                 "drop_bytes = excluded.drop_bytes, read_at = excluded.read_at",
                 (interface, address, drops, drop_bytes, at))


def delete_map_counter(conn, interface: str, address: str) -> None:
    conn.execute("DELETE FROM blacklist_map_counters WHERE interface = ? AND address = ?", (interface, address))


# --- a source's history, for decisions ------------------------------------------------------------------------

def source_rates(conn, address: str, first: int, last: int, baseline_rounds: int) -> tuple[float, float | None]:
    """(packets per round of ``address`` in rounds first..last, its packets per round over the
    ``baseline_rounds`` rounds before ``first`` — None when there are no earlier rounds).

    From source_stats (every source, every round); a round the source was silent in counts as 0.
    """
    inside = conn.execute(
        "SELECT COALESCE(SUM(packets), 0) FROM source_stats WHERE address = ? AND round_id BETWEEN ? AND ?",
        (address, first, last)).fetchone()[0]
    n_inside = conn.execute("SELECT COUNT(*) FROM rounds WHERE id BETWEEN ? AND ?", (first, last)).fetchone()[0]
    before = conn.execute("SELECT id FROM rounds WHERE id < ? ORDER BY id DESC LIMIT ?",
                          (first, baseline_rounds)).fetchall()
    if not before:
        return inside / max(n_inside, 1), None
    lo = before[-1][0]
    earlier = conn.execute(
        "SELECT COALESCE(SUM(packets), 0) FROM source_stats WHERE address = ? AND round_id BETWEEN ? AND ?",
        (address, lo, first - 1)).fetchone()[0]
    return inside / max(n_inside, 1), earlier / len(before)
