"""The TC egress program through real veth traffic from THIS host (root namespace) to lab hosts, and
two-way peers (root + kernel). Exact counts read back from a real SQLite file, across a kill -9 of
the collector mid-round."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.db.peers import two_way_since
from app.services.collector.scanner import Scanner
from tests.helpers import collect, make_settings

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]

TCP_SINK = r'''
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1); srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(30); n = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    n += len(data)
conn.close(); print(n, flush=True)
'''

PEER_CLIENT = r'''
import socket, sys
kind, src, dst, port, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
answered = 0
if kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0)); s.settimeout(2)
    for i in range(count):
        s.sendto(b"ping %d" % i, (dst, port))
        try:
            s.recvfrom(100); answered += 1
        except socket.timeout:
            pass
else:
    s = socket.create_connection((dst, port), timeout=5, source_address=(src, 0))
    for i in range(count):
        s.sendall(b"hello %d\n" % i); answered += len(s.recv(100)) > 0
    s.close()
print(answered)
'''


def db(settings):
    conn = sqlite3.connect(settings.general.db)
    conn.row_factory = sqlite3.Row
    return conn


def peer_snmp(lab) -> dict[str, int]:
    """The peer namespace's own /proc/net/snmp counters ('Tcp.InSegs', 'Udp.NoPorts', ...)."""
    lines = lab.run("cat", "/proc/net/snmp").stdout.splitlines()
    out = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        proto = head.split(":")[0]
        for k, v in zip(head.split()[1:], vals.split()[1:]):
            out[f"{proto}.{k}"] = int(v)
    return out


def destination(conn, address):
    return conn.execute("SELECT COALESCE(SUM(packets), 0) AS packets, COALESCE(SUM(bytes), 0) AS bytes, "
                        "COALESCE(SUM(syn), 0) AS syn, MAX(distinct_ports) AS ports FROM destination_stats "
                        "WHERE address = ?", (address,)).fetchone()


def test_exact_egress_counts_across_a_kill_9(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"), PORTWATCH_STATE_DIR=s.general.state_dir,
               PORTWATCH_RUN_DIR=s.general.run_dir)
    proc = subprocess.Popen([sys.executable, str(REPO / "app" / "port_collector.py"), "--interface", lab.interface,
                             "--round-seconds", "30", "--no-sniffer", "--no-scanner", "--db", s.general.db],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sink = None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((lab.root_v4, 0))
    size = 200_000
    try:
        time.sleep(1.0)
        before = peer_snmp(lab)
        for _ in range(40):                                   # N UDP datagrams of 100 payload bytes
            udp.sendto(b"u" * 100, (lab.host_v4(1), 6001))
        sink = lab.popen(sys.executable, "-c", TCP_SINK, lab.host_v4(0), "6002", stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        with socket.create_connection((lab.host_v4(0), 6002), timeout=10, source_address=(lab.root_v4, 0)) as c:
            c.sendall(b"t" * size)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""                           # the sink read everything and closed
            time.sleep(0.1)                                   # our ACK of its FIN has left
            # segments this socket sent (tcpi_segs_out counts each segment of a GSO super-packet)
            segs_out = struct.unpack_from("I", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), 136)[0]
        assert int(sink.stdout.readline()) == size
        sink.wait(timeout=10)
        time.sleep(0.2)
        after = peer_snmp(lab)
        proc.send_signal(signal.SIGKILL)                      # mid-round: its round never lands
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if sink is not None and sink.poll() is None:
            sink.kill()
    for _ in range(5):
        udp.sendto(b"u" * 100, (lab.host_v4(1), 6001))
    udp.close()
    time.sleep(0.1)
    collect(s, lab)
    conn = db(s)
    assert conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2
    u = destination(conn, lab.host_v4(1))
    assert (u["packets"], u["bytes"], u["ports"]) == (45, 45 * (14 + 20 + 8 + 100), 1)
    assert after["Udp.NoPorts"] - before["Udp.NoPorts"] == 40          # what the peer received, to the datagram
    t = destination(conn, lab.host_v4(0))
    # every TCP segment this host sent to the lab host: veth carries GSO super-packets whole (the peer's
    # InSegs counts those), the program counts their segments, as a NIC would put them on the wire
    assert t["packets"] == segs_out and t["syn"] == 1
    assert after["Tcp.InSegs"] - before["Tcp.InSegs"] <= segs_out
    # and the wire bytes: each segment repeats the 66-byte headers (Ethernet 14 + IP 20 + TCP 20 + timestamps
    # 12); the SYN's carry 8 more option bytes
    assert t["bytes"] == 66 * t["packets"] + 8 + size
    payload = conn.execute("SELECT SUM(e.payload_bytes), SUM(e.syn) FROM egress_port_stats e JOIN ports p "
                           "ON p.id = e.port_id WHERE p.protocol = 'tcp'").fetchone()
    assert tuple(payload) == (size, 1)
    r = conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    assert r["egress_packets"] >= 45 + t["packets"] and r["egress_unparsed"] == 0
    out = conn.execute("SELECT src_address, dst_address, dst_port, protocol, packets FROM flows "
                       "WHERE direction = 'out' AND dst_port IN (6001, 6002) ORDER BY dst_port").fetchall()
    assert [(x[0], x[1], x[2], x[3], x[4]) for x in out] == [
        (lab.root_v4, lab.host_v4(1), 6001, "udp", 45), (lab.root_v4, lab.host_v4(0), 6002, "tcp", t["packets"])]


def test_verified_peer_is_the_tcp_client_not_an_answered_udp_request_nor_a_host_that_only_sent(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    stop = threading.Event()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((lab.root_v4, 6100))
    echo.settimeout(0.2)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lab.root_v4, 6200))
    srv.listen(8)
    srv.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                data, addr = echo.recvfrom(100)
                echo.sendto(data, addr)
            except socket.timeout:
                pass
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            with c:
                c.settimeout(2)
                while (data := c.recv(100)):
                    c.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        udp_host, tcp_host, one_way = lab.host_v4(2), lab.host_v4(1), lab.host_v4(3)
        assert lab.run(sys.executable, "-c", PEER_CLIENT, "udp", udp_host, lab.root_v4, "6100", "3").stdout.strip() == "3"
        assert lab.run(sys.executable, "-c", PEER_CLIENT, "tcp", tcp_host, lab.root_v4, "6200", "2").stdout.strip() == "2"
        # one_way: UDP to a closed port, and a forged SYN to the open one (this host answers SYN-ACK, the
        # real owner of the address answers RST): neither is a conversation
        assert int(lab.send("--src", one_way, "--dst", lab.root_v4, "--ports", "6300", "--count", "4")) == 4
        assert int(lab.send("--kind", "syn", "--src", one_way, "--dst", lab.root_v4, "--ports", "6200",
                            "--count", "1", "--iface", lab.peer_interface)) == 1
        time.sleep(0.3)
        collect(s, lab)
    finally:
        stop.set()
        t.join(timeout=5)
        echo.close()
        srv.close()
    conn = db(s)
    r = conn.execute("SELECT id, two_way_peers FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    rows = {x["address"]: x for x in conn.execute("SELECT * FROM peers")}
    # the TCP client's ACK acknowledged this host's SYN-ACK ISN + 1: verified, with its fingerprint; the UDP
    # client's requests were answered, which a blind forger gets too: no peer
    assert set(rows) == {tcp_host} and r["two_way_peers"] == 1
    peer_mac = lab.run("cat", f"/sys/class/net/{lab.peer_interface}/address").stdout.strip()
    x = rows[tcp_host]
    assert (x["two_way_rounds"], x["last_round_id"], x["proof"], x["ttl"], x["mac"]) == (1, r["id"], "handshake",
                                                                                        64, peer_mac)
    day_ago = time.time() - 86400
    assert two_way_since(conn, tcp_host, day_ago) and not two_way_since(conn, udp_host, day_ago)
    assert not two_way_since(conn, one_way, day_ago)
    assert not two_way_since(conn, tcp_host, time.time() + 1)
    # this host did answer the forged SYN: an outbound flow exists, yet no peer
    assert destination(conn, one_way)["packets"] >= 1


def test_scanner_reports_established_remote_addresses(lab):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lab.root_v4, 6400))
    srv.listen(1)
    client = lab.popen(sys.executable, "-c", "import socket,sys,time; s=socket.create_connection((sys.argv[1], 6400), "
                       "source_address=(sys.argv[2], 0)); time.sleep(3)", lab.root_v4, lab.host_v4(2))
    try:
        conn, _ = srv.accept()
        scanner = Scanner()
        scanner.scan()
        assert lab.host_v4(2) in scanner.peers
        conn.close()
    finally:
        client.kill()
        srv.close()


def test_a_round_with_the_scanner_records_established_peers(lab, tmp_path):
    from app.threads.collection import run_collection
    s = make_settings(tmp_path)
    s.scanner.enabled = True
    collect(s, lab)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lab.root_v4, 6500))
    srv.listen(1)
    client = lab.popen(sys.executable, "-c", "import socket,sys,time; s=socket.create_connection((sys.argv[1], 6500), "
                       "source_address=(sys.argv[2], 0)); time.sleep(20)", lab.root_v4, lab.host_v4(3))
    try:
        conn_sock, _ = srv.accept()
        collect(s, lab)                                   # the handshake: a two-way exchange in the flows
        run_collection(s, lab.interface, 1, 1)            # a quiet round, scanner on: the ESTABLISHED socket
        conn_sock.close()
    finally:
        client.kill()
        srv.close()
    conn = db(s)
    row = conn.execute("SELECT * FROM peers WHERE address = ?", (lab.host_v4(3),)).fetchone()
    assert (row["two_way_rounds"], row["last_evidence"]) == (2, "established")
    last = conn.execute("SELECT id, two_way_peers, scanner_status FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    assert row["last_round_id"] == last["id"] and last["scanner_status"] == "ok" and last["two_way_peers"] == 0


def test_egress_block_is_off_by_default_and_drops_exactly_when_switched_on(lab, tmp_path):
    """A ledger 'out' row is enforced in eg_block only while blocklist.egress_block_enabled is on."""
    from app.db import blacklist as ledger
    from app.db.connection import connect
    from app.services.kernel import enforcement
    s = make_settings(tmp_path)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    eg_block = pdir / enforcement.EGRESS_MAP
    cidr = f"{lab.host_v4(1)}/32"
    conn = connect(s.general.db)
    try:
        with ledger.immediate(conn):
            ledger.upsert_entry(conn, cidr, "test", None, None, "manual", time.time(), None, "active", 1, "out")
        assert enforcement.reconcile(conn, s, pdir).egress.entries == 0     # off by default: nothing enforced
        assert enforcement.map_drops(eg_block) == {}
        s.blocklist.egress_block_enabled = True
        assert enforcement.reconcile(conn, s, pdir).egress.added == [cidr]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((lab.root_v4, 0))
        before = peer_snmp(lab)
        for _ in range(12):
            udp.sendto(b"b" * 50, (lab.host_v4(1), 6600))     # blocked
        for _ in range(3):
            udp.sendto(b"b" * 50, (lab.host_v4(2), 6600))     # another destination: passes
        time.sleep(0.2)
        mid = peer_snmp(lab)
        assert mid["Udp.NoPorts"] - before["Udp.NoPorts"] == 3
        assert enforcement.map_drops(eg_block) == {cidr: 12}
        with ledger.immediate(conn):
            ledger.mark_removed(conn, cidr, time.time())
        assert enforcement.reconcile(conn, s, pdir).egress.removed == [cidr]
        assert enforcement.map_drops(eg_block) == {}
        for _ in range(4):
            udp.sendto(b"b" * 50, (lab.host_v4(1), 6600))     # unblocked again
        udp.close()
        time.sleep(0.2)
        assert peer_snmp(lab)["Udp.NoPorts"] - mid["Udp.NoPorts"] == 4
    finally:
        conn.close()
    collect(s, lab)
    conn = db(s)
    r = conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    assert r["egress_dropped_packets"] == 12
    # dropped packets are counted as dropped only, not as sent to that destination
    assert (destination(conn, lab.host_v4(1))["packets"], destination(conn, lab.host_v4(2))["packets"]) == (4, 3)


def test_an_outbound_finding_blocks_its_destination_in_tc_only_when_switched_on(lab, tmp_path):
    """The decisions path end to end: an exfiltration finding to lab host 1, after_evaluation (real
    interlocks), the collector's reconcile writing eg_block; exactly the packets to host 1 are dropped
    while host 2 passes. With the switch off the same finding only alerts: nothing is dropped."""
    from app.db import blacklist as ledger
    from app.db.connection import connect
    from app.services.kernel import enforcement
    from app.services.blocklist.decisions import after_evaluation
    from tests.helpers import add_evaluation, finding
    s = make_settings(tmp_path)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    blocked, other = lab.host_v4(1), lab.host_v4(2)
    cidr = f"{blocked}/32"

    def send(n_blocked, n_other):
        before = peer_snmp(lab)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((lab.root_v4, 0))
        for _ in range(n_blocked):
            udp.sendto(b"x" * 40, (blocked, 6601))
        for _ in range(n_other):
            udp.sendto(b"x" * 40, (other, 6601))
        udp.close()
        time.sleep(0.2)
        return peer_snmp(lab)["Udp.NoPorts"] - before["Udp.NoPorts"]     # what reached the peer namespace

    def evaluate(conn):
        f = finding("exfiltration", destination=blocked, bytes=50 << 20, rule="exfiltration")
        return after_evaluation(conn, s, add_evaluation(conn, [f]))

    conn = connect(s.general.db)
    try:
        decisions, _ = evaluate(conn)                                    # switch off: alert only
        assert decisions == [] and ledger.entries(conn, None) == [] and enforcement.map_drops(pdir / enforcement.EGRESS_MAP) == {}
        assert send(5, 2) == 7
        s.blocklist.egress_block_enabled = True
        decisions, results = evaluate(conn)
        assert [(d.address, d.action, d.direction) for d in decisions] == [(cidr, "block", "out")]
        assert [r.egress.added for r in results] == [[cidr]] and [r.added for r in results] == [[]]
        assert enforcement.map_drops(pdir / enforcement.EGRESS_MAP) == {cidr: 0}
        assert send(9, 3) == 3                                           # 9 dropped in TC, 3 to host 2 passed
        assert enforcement.map_drops(pdir / enforcement.EGRESS_MAP) == {cidr: 9}
        assert enforcement.pending_drops(conn, s) == {cidr: 9}          # what `blacklist list` adds before a round
    finally:
        conn.close()
    collect(s, lab)                                                      # the round and its reconcile
    c = db(s)
    r = c.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    assert r["egress_dropped_packets"] == 9
    row = c.execute("SELECT direction, status, drops FROM blacklist WHERE address = ?", (cidr,)).fetchone()
    assert tuple(row) == ("out", "active", 9)
    # switched off again: the next reconcile empties eg_block and host 1 is reachable
    s.blocklist.egress_block_enabled = False
    collect(s, lab)
    assert enforcement.map_drops(pdir / enforcement.EGRESS_MAP) == {} and send(4, 0) == 4
    c.close()
