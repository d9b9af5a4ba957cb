"""Queries for the ``rounds_ports`` table: port occupancy (who holds which local port) per round.

Writes only; the caller owns the transaction (the collector's one ``with conn:`` per round).
"""
from __future__ import annotations

import sqlite3
from typing import Iterable

from app.db.ports import PortIds


def insert_occupancy(conn: sqlite3.Connection, round_id: int, timestamp: float, listeners: Iterable,
                     port_ids: PortIds) -> int:
    """Insert one ``rounds_ports`` row per listener; returns the number of rows.

    listeners: app.services.collector.scanner.Listener tuples (port, protocol, address, family, state, pid,
    process, user, established, inferred); ports are stored as they are, never folded.
    timestamp: epoch seconds of the scan (the round's end).
    """
    rows = [(round_id, port_ids(listener.port, listener.protocol), timestamp, listener.pid, listener.process,
             listener.user, listener.address, listener.family, listener.state, listener.established,
             int(listener.inferred))
            for listener in listeners]
    conn.executemany("INSERT INTO rounds_ports (round_id, port_id, timestamp, pid, process, user, address, family, "
                     "state, established, inferred) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)
