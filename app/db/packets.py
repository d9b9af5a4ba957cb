"""Queries for the ``packets`` table: the sniffer's per-round packet-metadata sample.

Writes only; the caller owns the transaction (the collector's one ``with conn:`` per round).
"""
from __future__ import annotations

import sqlite3
from typing import Callable, Iterable

from app.db.ports import PortIds


def insert_packets(conn: sqlite3.Connection, round_id: int, records: Iterable, port_ids: PortIds,
                   fold: Callable[[int, str], int]) -> int:
    """Insert one ``packets`` row per record; returns the number of rows.

    records: app.services.collector.sniffer.PacketRecord tuples. ``port_id`` is the record's local port
    (TCP/UDP port, or ICMP type) passed through ``fold(port, protocol) -> stored value`` - the
    collector's ``functools.partial(fold_port, listening=..., low=..., high=..., fold=...)`` - so it
    matches port_stats; NULL when the packet has no such port (ARP, a non-first fragment).
    ``dest_port``/``src_port`` keep the real ports; qry_type/rcode the DNS question's record type and
    a response's code (NULL for a query). No payload content is stored, only lengths.
    """
    rows = []
    for r in records:
        port_id = None
        if r.local_port is not None and r.transport is not None:
            port_id = port_ids(fold(r.local_port, r.transport), r.transport)
        rows.append((r.timestamp, r.protocols, r.qry_name, r.resp_name, r.server_name, port_id, r.dst_port,
                     r.src_port, r.src_address, r.dst_address, r.transport, r.payload, r.length, round_id,
                     r.qry_type, r.rcode))
    conn.executemany("INSERT INTO packets (timestamp, protocols, qry_name, resp_name, server_name, port_id, dest_port, "
                     "src_port, src_address, dst_address, transport, payload, length, round_id, qry_type, rcode) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)
