"""Queries for the TC egress program's per-round rows: egress_port_stats and destination_stats
(outbound flows go into flows with direction 'out', app/db/rounds.py insert_flows)."""
from __future__ import annotations

from typing import Iterable


def insert_egress_port_stats(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (port_id, packets, bytes, payload_bytes, syn) — port_id of the LOCAL (source) port."""
    conn.executemany("INSERT INTO egress_port_stats (round_id, port_id, packets, bytes, payload_bytes, syn) "
                     "VALUES (?, ?, ?, ?, ?, ?)", ((round_id, *r) for r in rows))


def insert_destination_stats(conn, round_id: int, rows: Iterable[tuple]) -> None:
    """rows: (address, packets, bytes, syn, distinct_ports)."""
    conn.executemany("INSERT INTO destination_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                     "VALUES (?, ?, ?, ?, ?, ?)", ((round_id, *r) for r in rows))
