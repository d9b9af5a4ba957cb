"""Retention queries (``python -m app cleanup``): delete old rounds (their rows in port_stats,
source_stats, source_ports, flows, global_stats, rounds_ports, packets and blacklist_drops go with
them through ON DELETE CASCADE), sniffer packets without a round, old alert bookkeeping; then
give the freed pages back to the file system.

Deletes run in batches, one transaction each, so the minute collector is never kept waiting for
long by the write lock.
"""
from __future__ import annotations

import sqlite3

BATCH_ROUNDS = 500


def count_old(conn: sqlite3.Connection, cutoff: float) -> dict:
    """What a cleanup with this cutoff (epoch seconds) would delete."""
    rounds = conn.execute("SELECT COUNT(*) FROM rounds WHERE end_time < ?", (cutoff,)).fetchone()[0]
    packets = conn.execute(
        "SELECT COUNT(*) FROM packets WHERE round_id IN (SELECT id FROM rounds WHERE end_time < ?)"
        " OR (round_id IS NULL AND timestamp < ?)", (cutoff, cutoff)).fetchone()[0]
    return {"rounds": rounds, "packets": packets}


def delete_old_rounds(conn: sqlite3.Connection, cutoff: float, batch: int = BATCH_ROUNDS) -> tuple[int, int]:
    """Delete rounds that ended before ``cutoff`` and everything hanging off them; (rounds, packets)."""
    if not conn.execute("PRAGMA foreign_keys").fetchone()[0]:
        raise RuntimeError("foreign keys are off: deleting rounds would orphan their rows")
    rounds = packets = 0
    while True:
        with conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM rounds WHERE end_time < ? ORDER BY id LIMIT ?",
                                              (cutoff, batch))]
            if not ids:
                break
            marks = ",".join("?" * len(ids))
            # count the packets before the cascade takes them, for the report to the user
            packets += conn.execute(f"SELECT COUNT(*) FROM packets WHERE round_id IN ({marks})", ids).fetchone()[0]
            rounds += conn.execute(f"DELETE FROM rounds WHERE id IN ({marks})", ids).rowcount
    return rounds, packets


def delete_old_packets(conn: sqlite3.Connection, cutoff: float) -> int:
    """Sniffer packets without a round (or whose round is kept but the packet is old)."""
    with conn:
        return conn.execute("DELETE FROM packets WHERE timestamp < ?", (cutoff,)).rowcount


def delete_old_alerts(conn: sqlite3.Connection, cutoff: float) -> int:
    with conn:
        return conn.execute("DELETE FROM alerts_sent WHERE sent_at < ?", (cutoff,)).rowcount


def page_counts(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(page_size, page_count, freelist_count)."""
    return (conn.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_count").fetchone()[0],
            conn.execute("PRAGMA freelist_count").fetchone()[0])


def reclaim(conn: sqlite3.Connection) -> str:
    """Give free pages back: ``incremental_vacuum`` when the file is in incremental auto-vacuum
    mode; otherwise one full VACUUM that also switches it to incremental mode, so later cleanups
    are incremental (cheap, no long exclusive lock). Returns 'incremental' or 'full'."""
    mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    if mode == 2:
        conn.execute("PRAGMA incremental_vacuum").fetchall()   # runs one page per step: drain it
        how = "incremental"
    else:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        how = "full"
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return how
