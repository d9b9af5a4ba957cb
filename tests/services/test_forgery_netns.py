"""Issue 9 as an attacker would try it: real XDP on a lab veth, real hping3, the real evaluator and
blocklist. Forged one-way evidence naming a host that talks to this one never blocks it; an unknown
address doing the same is blocked within one evaluation; a SYN flood from 10,000 random sources adds
nothing to the blocklist and is one finding for the port with its source count.

Every forged packet is sent from the lab's peer namespace to the lab's root address only. The
random-source flood would make this host answer random addresses through its default route: a
private nftables table drops, on the lab link only, every packet whose source is outside
198.18.0.0/15 before the stack sees it (XDP counts it first), and strict rp_filter on the link
drops it too. Both go with the test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from app.db import blacklist as queries
from app.db.connection import connect
from app.services import enforcement, evaluation
from app.services.decisions import after_evaluation
from tests.helpers import UdpSink, collect, loaded, pin_root, send_udp  # noqa: F401 (pin_root: a fixture)

pytestmark = pytest.mark.kernel

SERVICE_PORT = 8080
SCAN = ("-S", "-p", "++1000", "-c", "150", "-i", "u2000")       # 150 SYNs to ports 1000..1149
FLOOD = ("-S", "-p", str(SERVICE_PORT), "-c", "1000", "-i", "u500")   # 1,000 SYNs to the service

# a TCP conversation from the lab host: connect, then 64 bytes every 50 ms, each echoed back
TCP_CLIENT = r"""
import socket, sys, time
src, dst, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((dst, port), timeout=5, source_address=(src, 0))
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end and n < 2000:
    s.sendall(b'c' * 64); got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    n += 1
    time.sleep(0.05)
print(n, flush=True)
"""

# UDP request/response from the lab host: a request every 50 ms, each answered by this host
UDP_CLIENT = r"""
import socket, sys, time
src, dst, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0)); s.settimeout(1)
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end and n < 2000:
    s.sendto(b'q' * 40, (dst, port)); s.recvfrom(100); n += 1
    time.sleep(0.05)
print(n, flush=True)
"""


class EchoServer:
    """TCP (or UDP) echo service in the ROOT namespace on ``address``:``port``, in a thread."""

    def __init__(self, address: str, port: int, udp: bool = False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.settimeout(0.2)
        if not udp:
            self.sock.listen(512)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._udp if udp else self._tcp, daemon=True)
        self.thread.start()

    def _udp(self):
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            self.sock.sendto(data, peer)

    def _tcp(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        conn.settimeout(0.5)
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def hping(lab, *args: str, timeout: float = 60) -> None:
    """hping3 in the lab's peer namespace toward the lab's root address (bounded by -c)."""
    proc = lab.run("hping3", "-q", *args, lab.root_v4, check=False, timeout=timeout)
    assert proc.returncode in (0, 1), proc.stderr     # 1: no replies (forged sources never see them)


def findings_of(result, detector):
    return [a for a in result.anomalies if a.detector == detector]


def stored_sources(conn, anomaly_id):
    """(address, evidence, possibly_forged) per source of one stored finding, read back with SQL."""
    return [tuple(r) for r in conn.execute(
        "SELECT json_extract(s.value, '$.address'), json_extract(s.value, '$.evidence'), "
        "COALESCE(json_extract(s.value, '$.forged'), 0) FROM anomalies a, json_each(a.reasons, '$.sources') s "
        "WHERE a.id = ?", (anomaly_id,))]


def _conversation_then_forgery(lab, tmp_path, pin_root, client_code, udp):
    """A benign lab host converses with this host (TCP or UDP), then the same lab namespace forges a
    150-port SYN scan and a 1,000-SYN flood with the benign host's address, and an unknown address
    scans the same way. Returns (settings, pin dir, benign, scanner, evaluation result, decisions, conn)."""
    s, pdir = loaded(lab, tmp_path, pin_root)
    benign, scanner = lab.host_v4(1), lab.host_v4(2)
    server = EchoServer(lab.root_v4, SERVICE_PORT, udp=udp)
    client = lab.popen(sys.executable, "-c", client_code, benign, lab.root_v4, str(SERVICE_PORT), "30",
                       stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        collect(s, lab, seconds=0.8)                    # the benign conversation alone
        hping(lab, "-a", benign, *SCAN)                 # forged: the benign host's address
        hping(lab, "-a", benign, *FLOOD)
        hping(lab, "-a", scanner, *SCAN)                # an unknown address, same scan
        collect(s, lab, seconds=0.8)
        result = evaluation.run(s)
        conn = connect(s.general.db)
        decisions, _ = after_evaluation(conn, s, result.anomalies)
    finally:
        client.kill()
        client.wait()
        server.close()
    return s, pdir, benign, scanner, result, decisions, conn


def test_forged_scan_and_flood_never_block_a_tcp_peer_but_an_unknown_scanner_is_blocked(lab, tmp_path, pin_root):
    s, pdir, benign, scanner, result, decisions, conn = _conversation_then_forgery(
        lab, tmp_path, pin_root, TCP_CLIENT, udp=False)
    try:
        scans = {f.source: f for f in findings_of(result, "port_scan")}
        assert sorted(scans) == sorted([benign, scanner])
        forged_scan, real_scan = scans[benign], scans[scanner]
        assert forged_scan.details["distinct_ports"] >= 150 and real_scan.details["distinct_ports"] == 150
        assert [(x.address, x.evidence, x.forged) for x in forged_scan.sources] == [(benign, "one-way", True)]
        assert [(x.address, x.evidence, x.forged) for x in real_scan.sources] == [(scanner, "one-way", False)]
        assert forged_scan.forged_sources == [benign] and "possibly forged" in forged_scan.summary

        floods = findings_of(result, "syn_flood")
        assert [(f.port, f.source) for f in floods] == [(SERVICE_PORT, benign)]
        syn = conn.execute("SELECT SUM(ps.syn) FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                           "WHERE ps.round_id = ? AND p.value = ? AND p.protocol = 'tcp'",
                           (result.last_round_id, SERVICE_PORT)).fetchone()[0]
        assert floods[0].details["syn"] == syn and syn >= 950     # hping3's 1,000 (a few may be lost on the veth)
        assert floods[0].forged_sources == [benign]

        # what sqlite3 shows: the evidence class and the forgery judgement of every source
        assert stored_sources(conn, forged_scan.id) == [(benign, "one-way", 1)]
        assert stored_sources(conn, real_scan.id) == [(scanner, "one-way", 0)]
        assert (benign, "one-way", 1) in stored_sources(conn, floods[0].id)
        peer = conn.execute("SELECT two_way_rounds FROM peers WHERE address = ?", (benign,)).fetchone()
        assert peer is not None and peer[0] >= 1
        assert conn.execute("SELECT COUNT(*) FROM peers WHERE address = ?", (scanner,)).fetchone()[0] == 0

        # decisions: the unknown scanner blocked within this one evaluation, the forged peer never
        blocked = [d.address for d in decisions if d.action == "block"]
        assert blocked == [f"{scanner}/32"]
        [refused] = [d for d in decisions if d.address == f"{benign}/32"]     # one decision per address
        assert refused.action == "refused" and "possibly forged" in refused.detail
        assert refused.anomaly_id in (forged_scan.id, floods[0].id)
        assert [r["address"] for r in queries.entries(conn, ("active",))] == [f"{scanner}/32"]

        # enforcement: the scanner's packets are dropped, the benign host's pass
        with UdpSink(lab.root_v4, 7800) as sink:
            send_udp(lab, scanner, lab.root_v4, 7800, 15)
            send_udp(lab, benign, lab.root_v4, 7800, 10)
            assert sink.drain() == {benign: 10}
        assert enforcement.apply(conn, s)[0].drops == 15
        print(json.dumps({"case": "tcp peer", "forged_peer_blocked": False, "unknown_scanner_blocked": True,
                          "entries": 1, "scanner_drops": 15}))
    finally:
        conn.close()


@pytest.mark.xfail(strict=True, reason="needs helper ik's egress program and its peers table (UDP "
                   "request/response answered by this host = two-way), not on main yet: ingress flows alone "
                   "cannot see this host's answers, so the UDP peer has no two-way history and is blocked")
def test_forged_scan_never_blocks_a_udp_request_response_peer(lab, tmp_path, pin_root):
    s, pdir, benign, scanner, result, decisions, conn = _conversation_then_forgery(
        lab, tmp_path, pin_root, UDP_CLIENT, udp=True)
    try:
        scans = {f.source: f for f in findings_of(result, "port_scan")}
        assert [(x.address, x.forged) for x in scans[benign].sources] == [(benign, True)]
        assert [d.address for d in decisions if d.action == "block"] == [f"{scanner}/32"]
    finally:
        conn.close()


@pytest.mark.xfail(strict=True, reason="ingress-only two-way evidence is forgeable: two PSH|ACK packets on one "
                   "5-tuple make the sender a 'peer' without any answer from this host; needs helper ik's egress "
                   "peers (this host answered that address) before a peer is protected")
def test_a_scanner_cannot_make_itself_a_peer_with_blind_acks(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    scanner = lab.host_v4(2)
    server = EchoServer(lab.root_v4, SERVICE_PORT)
    try:
        # two blind PSH|ACK segments on one 5-tuple (no handshake: this host answers them with RSTs)
        hping(lab, "-a", scanner, "-k", "-s", "40000", "-P", "-A", "-d", "64", "-p", str(SERVICE_PORT), "-c", "2")
        hping(lab, "-a", scanner, *SCAN)
        collect(s, lab, seconds=0.5)
        result = evaluation.run(s)
        conn = connect(s.general.db)
        decisions, _ = after_evaluation(conn, s, result.anomalies)
    finally:
        server.close()
    try:
        scans = {f.source: f for f in findings_of(result, "port_scan")}
        assert [(x.address, x.forged) for x in scans[scanner].sources] == [(scanner, False)]
        assert [d.address for d in decisions if d.action == "block"] == [f"{scanner}/32"]
    finally:
        conn.close()


@pytest.fixture
def only_lab_sources(lab):
    """Drop, on the lab link only, every packet whose source is outside 198.18.0.0/15 before the
    stack sees it (XDP sees and counts it first): this host never answers the flood's random
    addresses. A private nftables table plus strict rp_filter on the link; both removed after."""
    table = f"{os.environ.get('PW_TEST_PREFIX', 'pwt')[:4]}_{lab.interface}"
    subprocess.run(["sysctl", "-qw", f"net.ipv4.conf.{lab.interface}.rp_filter=1"], check=True)
    subprocess.run(["nft", "add", "table", "inet", table], check=True)
    try:
        subprocess.run(["nft", "add", "chain", "inet", table, "pre",
                        "{ type filter hook prerouting priority -300; policy accept; }"], check=True)
        subprocess.run(["nft", "add", "rule", "inet", table, "pre", "iifname", lab.interface,
                        "ip", "saddr", "!=", "198.18.0.0/15", "drop"], check=True)
        subprocess.run(["nft", "add", "rule", "inet", table, "pre", "iifname", lab.interface,
                        "meta", "nfproto", "ipv6", "drop"], check=True)
        yield table
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def test_random_source_syn_flood_is_one_finding_per_port_and_blocks_nobody(lab, tmp_path, pin_root, only_lab_sources):
    s, pdir = loaded(lab, tmp_path, pin_root)
    server = EchoServer(lab.root_v4, SERVICE_PORT)
    try:
        hping(lab, "--rand-source", "-S", "-p", str(SERVICE_PORT), "-c", "10000", "-i", "u100", timeout=120)
        collect(s, lab, seconds=0.5)
        result = evaluation.run(s)
        conn = connect(s.general.db)
        decisions, _ = after_evaluation(conn, s, result.anomalies)
    finally:
        server.close()
    try:
        round_id = result.last_round_id
        syn = conn.execute("SELECT ps.syn FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                           "WHERE ps.round_id = ? AND p.value = ? AND p.protocol = 'tcp'",
                           (round_id, SERVICE_PORT)).fetchone()[0]
        senders = conn.execute("SELECT COUNT(*) FROM source_stats WHERE round_id = ? AND syn > 0",
                               (round_id,)).fetchone()[0]
        assert syn == 10000
        assert senders >= 9900               # 32-bit random addresses: a handful may repeat
        floods = findings_of(result, "syn_flood")
        assert len(floods) == 1
        flood = floods[0]
        assert (flood.port, flood.protocol, flood.source, flood.source_count) == (SERVICE_PORT, "tcp", None, senders)
        assert flood.details["many_one_way_sources"] is True and flood.details["syn"] == 10000
        assert findings_of(result, "port_scan") == []
        stored = conn.execute("SELECT json_extract(reasons, '$.source_count'), json_extract(reasons, '$.port') "
                              "FROM anomalies WHERE id = ?", (flood.id,)).fetchone()
        assert tuple(stored) == (senders, SERVICE_PORT)
        assert s.blocklist.max_new_per_forged_flood == 0
        assert [d for d in decisions if d.action == "block"] == []
        assert queries.entries(conn, ("active",)) == []
        print(json.dumps({"case": "random-source flood", "syn": syn, "sources": senders, "findings": len(floods),
                          "entries": 0}))
    finally:
        conn.close()
