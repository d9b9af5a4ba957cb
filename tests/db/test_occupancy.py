"""insert_occupancy writes rounds_ports rows that the console view v_listeners shows."""
from __future__ import annotations

from app.db.connection import connect
from app.db.occupancy import insert_occupancy
from app.db.ports import PortIds
from app.services.collector.scanner import Listener


def test_listeners_are_stored_with_real_ports(db_path):
    conn = connect(db_path)
    listeners = [Listener(22, "tcp", "0.0.0.0", "ipv4", "LISTEN", 812, "sshd", "root", 2),
                 Listener(45000, "udp", "::", "ipv6", "BOUND", None, None, None, 0)]
    with conn:
        round_id = conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (1, 61, 'eth0')").lastrowid
        assert insert_occupancy(conn, round_id, 61.0, listeners, PortIds(conn)) == 2
    rows = [tuple(r) for r in conn.execute("SELECT port, protocol, address, pid, process, user, established "
                                           "FROM v_listeners ORDER BY port")]
    assert rows == [(22, "tcp", "0.0.0.0", 812, "sshd", "root", 2), (45000, "udp", "::", None, None, None, 0)]
    stored = conn.execute("SELECT timestamp, family, state FROM rounds_ports ORDER BY id").fetchall()
    assert [tuple(r) for r in stored] == [(61.0, "ipv4", "LISTEN"), (61.0, "ipv6", "BOUND")]
    conn.close()
