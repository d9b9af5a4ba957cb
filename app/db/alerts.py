"""Queries for ``alerts_sent``: which alert key went out on which channel, and when (cooldown)."""
from __future__ import annotations

import sqlite3


def last_sent(conn: sqlite3.Connection, key: str, channel: str) -> float | None:
    """Unix time ``key`` was last delivered on ``channel``, or None."""
    row = conn.execute("SELECT sent_at FROM alerts_sent WHERE key = ? AND channel = ?", (key, channel)).fetchone()
    return None if row is None else row[0]


def mark_sent(conn: sqlite3.Connection, keys: list[str], channel: str, at: float) -> None:
    """Record delivery of ``keys`` on ``channel`` (one transaction)."""
    with conn:
        conn.executemany("INSERT INTO alerts_sent (key, channel, sent_at) VALUES (?, ?, ?)"
                         " ON CONFLICT (key, channel) DO UPDATE SET sent_at = excluded.sent_at",
                         [(key, channel, at) for key in keys])

