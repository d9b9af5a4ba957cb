"""Queries for the `ports` table: (value, protocol) -> id."""
from __future__ import annotations

import sqlite3


class PortIds:
    """Cached lookup/creation of ports rows for one connection (use inside a transaction)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self._cache: dict[tuple[int, str], int] = {}

    def __call__(self, value: int, protocol: str) -> int:
        key = (value, protocol)
        port_id = self._cache.get(key)
        if port_id is None:
            row = self.conn.execute("SELECT id FROM ports WHERE value = ? AND protocol = ?", key).fetchone()
            if row is None:
                label = "ephemeral" if value == -1 else None
                port_id = self.conn.execute("INSERT INTO ports (value, protocol, label) VALUES (?, ?, ?)",
                                            (value, protocol, label)).lastrowid
            else:
                port_id = row[0]
            self._cache[key] = port_id
        return port_id
