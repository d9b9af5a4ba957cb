"""Queries for the ``allowlist`` table: addresses and prefixes never blocked automatically, kept in the
database by `python -m app allow add|remove|list` (beside the config's ``blocklist.allowlist``).
Writers call these inside ``blacklist.immediate`` (the same write transaction lifts the blocks)."""
from __future__ import annotations

import sqlite3


def entries(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every allowlist row (address, reason, created_at), oldest first; [] on a database made before
    the table existed (read-only opens do not migrate)."""
    try:
        return conn.execute("SELECT address, reason, created_at FROM allowlist ORDER BY created_at, address").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def get(conn: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    return conn.execute("SELECT address, reason, created_at FROM allowlist WHERE address = ?", (address,)).fetchone()


def add(conn: sqlite3.Connection, address: str, reason: str | None, at: float) -> None:
    conn.execute("INSERT INTO allowlist (address, reason, created_at) VALUES (?, ?, ?) ON CONFLICT(address) "
                 "DO UPDATE SET reason = excluded.reason", (address, reason, at))


def remove(conn: sqlite3.Connection, address: str) -> int:
    """Delete ``address``; returns the rows deleted (0 or 1)."""
    return conn.execute("DELETE FROM allowlist WHERE address = ?", (address,)).rowcount
