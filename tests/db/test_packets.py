"""insert_packets: port_id folded like port_stats, real ports kept, metadata only."""
from __future__ import annotations

import functools

from app.db.connection import connect
from app.db.packets import insert_packets
from app.db.ports import PortIds
from app.services.ports import fold_port
from app.services.collector.sniffer import PacketRecord


def record(**changes) -> PacketRecord:
    base = PacketRecord(100.5, "eth:ethertype:ip:udp:dns", "udp", "198.18.0.2", "198.18.0.1", 53, 40000, 40000,
                        "a.test", "a.test", None, 54, 96)
    return base._replace(**changes)


def test_rows_fold_the_local_port_and_keep_the_real_ones(db_path):
    conn = connect(db_path)
    fold = functools.partial(fold_port, listening={(40001, "udp")}, low=32768, high=60999, fold=True)
    records = [record(),                                                     # ephemeral, unlistened: folded
               record(dst_port=40001, local_port=40001),                     # ephemeral but listened on: kept
               record(protocols="eth:ethertype:ip:icmp", transport="icmp", src_port=None, dst_port=None,
                      local_port=3, qry_name=None, resp_name=None, payload=None),
               record(protocols="eth:ethertype:arp", transport=None, src_address=None, dst_address=None,
                      src_port=None, dst_port=None, local_port=None, qry_name=None, resp_name=None, payload=None)]
    with conn:
        round_id = conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (1, 61, 'eth0')").lastrowid
        assert insert_packets(conn, round_id, records, PortIds(conn), fold) == 4
    rows = conn.execute("SELECT p.dest_port, p.src_port, ports.value, ports.protocol, ports.label, p.transport, "
                        "p.payload, p.length, p.qry_name, p.resp_name FROM packets p "
                        "LEFT JOIN ports ON ports.id = p.port_id WHERE p.round_id = ? ORDER BY p.id",
                        (round_id,)).fetchall()
    assert [tuple(r) for r in rows] == [
        (40000, 53, -1, "udp", "ephemeral", "udp", 54, 96, "a.test", "a.test"),
        (40001, 53, 40001, "udp", None, "udp", 54, 96, "a.test", "a.test"),
        (None, None, 3, "icmp", None, "icmp", None, 96, None, None),
        (None, None, None, None, None, None, None, 96, None, None),
    ]
    conn.close()
