"""Forged traffic in network namespaces, real XDP, real hping3 and scapy: a forged packet never gets an
innocent blocked, a real scanner still is, and a flood from 10,000 forged sources is one finding
for its port that adds nothing to the blocklist.

Lab: XDP on the root side of a veth; the peer namespace holds the benign host (.3, a real TCP
conversation with this host), the unknown scanner (.4) and the attacker who forges .3 with
``hping3 -a``. Replies to forged sources stay inside the lab: .3 is a lab host, and the random
flood's sources are drawn from a 198.19.0.0/15 block routed back into the lab (hping3's
--rand-source would draw from the whole IPv4 space and this host's SYN-ACKs would leave through its
default route, so the flood is sent with scapy).
"""
from __future__ import annotations

import ipaddress
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from app.config import ConfigError  # noqa: F401  (import check: config loads)
from app.db import blacklist as queries
from app.db.connection import connect
from app.services import jobs
from tests.helpers import UdpSink, bpftool_entries, collect, loaded, pin_root, send_udp  # noqa: F401

pytestmark = pytest.mark.kernel

SERVICE = 7000          # the benign host's TCP conversation
FLOODED = 8080          # the SYN flood forged from the benign host (nothing listens)
RANDOM_FLOODED = 8081   # the flood from 10,000 random forged sources


class EchoServer:
    """A TCP echo server in the root namespace (this host): the benign host's two-way conversation."""

    def __init__(self, address: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(4)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self):
        self.sock.close()


CLIENT = r"""
import socket, sys, time
src, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((dst, port), timeout=10, source_address=(src, 0))
for i in range(n):
    s.sendall(b'hello %d' % i); s.recv(100); time.sleep(0.01)
print('talked', flush=True)
sys.stdin.readline()       # stays connected until the test closes stdin
s.close()
"""


def hping(lab, *args: str) -> None:
    """hping3 in the peer namespace, bounded by -c and a timeout."""
    proc = lab.run("timeout", "30", "hping3", "-q", *args, lab.root_v4, check=False, timeout=40)
    assert proc.returncode == 0 or "packets transmitted" in proc.stdout + proc.stderr, proc.stderr


def test_forged_peer_is_never_blocked_and_the_unknown_scanner_is(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    benign, scanner = lab.host_v4(1), lab.host_v4(2)
    server = EchoServer(lab.root_v4, SERVICE)
    client = lab.popen(sys.executable, "-c", CLIENT, benign, lab.root_v4, str(SERVICE), "20",
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "talked"
        collect(s, lab)                                                  # round 2: the conversation
        # the forger is farther away than the benign host (TTL 40, not its 64): not the peer's fingerprint
        hping(lab, "-a", benign, "-t", "40", "-S", "-p", "++1000", "-c", "150", "-i", "u500")   # forged SYN scan
        hping(lab, "-a", benign, "-t", "40", "-S", "-p", str(FLOODED), "-c", "600", "-i", "u200")  # forged SYN flood
        hping(lab, "-a", scanner, "-S", "-p", "++1000", "-c", "150", "-i", "u500")  # the unknown scanner, same scan
        collect(s, lab)                                                  # round 3: the attacks
        job = jobs.run(s)
    finally:
        client.stdin.close()
        client.wait(timeout=10)
        server.close()
    found = job.evaluation.anomalies
    scans = {f.source: f for f in found if f.detector == "port_scan"}
    floods = [f for f in found if f.detector == "syn_flood"]
    assert sorted(scans) == [benign, scanner]
    assert scans[benign].sources[0].evidence == "one-way" and scans[benign].sources[0].forged is True
    assert scans[benign].forged_sources == [benign] and "possibly forged" in scans[benign].summary
    assert scans[scanner].score == 150.0 and scans[scanner].details["ports_known"] == 150
    # the forged scan's 150 ports, plus the flooded port (and the service port when the conversation's
    # last ACK fell into this round): the same address
    assert scans[benign].score == scans[benign].details["ports_known"] in (151.0, 152.0)
    assert scans[scanner].sources[0].forged is False
    assert [(f.port, f.source, f.forged_sources, f.source_count) for f in floods] == [(FLOODED, benign, [benign], 1)]
    assert floods[0].details["syn"] == 600
    # blocked: the unknown scanner only, within this one evaluation
    acts = sorted((d.address, d.action) for d in job.decisions)
    assert acts == [(f"{benign}/32", "refused"), (f"{scanner}/32", "block")]
    assert "never blocked on one-way evidence" in next(d.detail for d in job.decisions if d.action == "refused")
    conn = connect(s.general.db)
    try:
        assert [r["address"] for r in queries.entries(conn, ("active",))] == [f"{scanner}/32"]
        assert bpftool_entries(pdir) == 1
        peer = conn.execute("SELECT two_way_rounds FROM peers WHERE address = ?", (benign,)).fetchone()
        assert peer is not None and peer[0] >= 1
        shown = conn.execute("SELECT detector, address, evidence, possibly_forged FROM v_anomaly_sources "
                             "WHERE address IN (?, ?) ORDER BY detector, address", (benign, scanner)).fetchall()
        assert [tuple(r) for r in shown] == [("port_scan", benign, "one-way", 1), ("port_scan", scanner, "one-way", 0),
                                             ("syn_flood", benign, "one-way", 1)]
    finally:
        conn.close()
    # through the real XDP map: the benign host's packets pass, the scanner's are dropped
    with UdpSink(lab.root_v4, 7801) as sink:
        send_udp(lab, benign, lab.root_v4, 7801, 25)
        send_udp(lab, scanner, lab.root_v4, 7801, 15)
        assert sink.drain() == {benign: 25}


def test_a_rounds_distinct_ports_count_only_that_rounds_ports(lab, tmp_path, pin_root):
    """A source that reached 5 ports in one round and scans 30 others in the next: the second round's
    distinct ports are 30, the same as its source_ports rows (its promotion into the scanners map counts
    the new pairs of that round only, not the earlier round's 5)."""
    s, _pdir = loaded(lab, tmp_path, pin_root)
    scanner = lab.host_v4(2)
    hping(lab, "-a", scanner, "-S", "-p", "++3000", "-c", "5", "-i", "u2000")
    collect(s, lab)
    hping(lab, "-a", scanner, "-S", "-p", "++1000", "-c", "30", "-i", "u2000")
    collect(s, lab)
    conn = connect(s.general.db)
    try:
        rows = conn.execute("SELECT round_id, distinct_ports, (SELECT COUNT(*) FROM source_ports p WHERE "
                            "p.round_id = s.round_id AND p.address = s.address) FROM source_stats s "
                            "WHERE address = ? ORDER BY round_id", (scanner,)).fetchall()
    finally:
        conn.close()
    assert [tuple(r)[1:] for r in rows][-2:] == [(5, 0), (30, 30)], [tuple(r) for r in rows]


def test_udp_server_this_host_asked_is_a_peer_and_not_blocked_when_forged(lab, tmp_path, pin_root):
    """This host's datagrams answered from the same address and port prove the server (a blind forger
    never sees them); an inbound request this host answered would prove nothing."""
    s, pdir = loaded(lab, tmp_path, pin_root)
    benign = lab.host_v4(3)
    responder = lab.popen(sys.executable, "-c", r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 5353)); s.settimeout(10)
print('ready', flush=True)
for i in range(20):
    data, addr = s.recvfrom(100); s.sendto(b'a' + data, addr)
""", benign, stdout=subprocess.PIPE, text=True)
    asker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    asker.bind((lab.root_v4, 0))
    asker.settimeout(2)
    try:
        assert responder.stdout.readline().strip() == "ready"
        for i in range(20):                                  # this host asks, the server answers
            asker.sendto(b"q%d" % i, (benign, 5353))
            assert asker.recv(100) == b"aq%d" % i
        responder.wait(timeout=10)
    finally:
        asker.close()
        responder.kill()
    collect(s, lab)
    hping(lab, "-a", benign, "-t", "40", "-S", "-p", "++1000", "-c", "150", "-i", "u500")   # another TTL
    collect(s, lab)
    job = jobs.run(s)
    conn = connect(s.general.db)
    try:
        assert conn.execute("SELECT proof FROM peers WHERE address = ?", (benign,)).fetchone()[0] == "opened-udp"
    finally:
        conn.close()
    assert [d.action for d in job.decisions if d.address == f"{benign}/32"] == ["refused"]


FLOOD = r"""
import random, sys
from scapy.all import Ether, IP, TCP, conf, get_if_hwaddr, sendp
conf.verb = 0
iface, dst, dst_mac, port, block, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
base = [int(x) for x in block.split('.')]
rng = random.Random(9)
hosts = rng.sample(range(1, 16383), n)                  # n distinct addresses of a /18
src_mac = get_if_hwaddr(iface)
frames = [Ether(src=src_mac, dst=dst_mac) / IP(src=f"{base[0]}.{base[1]}.{base[2] + h // 256}.{h % 256}", dst=dst)
          / TCP(sport=1024 + h % 60000, dport=port, flags='S') for h in hosts]
sendp(frames, iface=iface, verbose=False)
print(len(frames))
"""


def test_syn_flood_from_10000_forged_sources_is_one_finding_and_no_block(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    block = f"198.19.{64 * (lab.subnet % 4)}.0"                  # a /18 of test addresses, routed back into the lab
    route = ["ip", "route", "add", f"{block}/18", "via", lab.host_v4(0), "dev", lab.interface]
    subprocess.run(route, check=True, capture_output=True)
    try:
        root_mac = open(f"/sys/class/net/{lab.interface}/address").read().strip()
        sent = lab.run(sys.executable, "-c", FLOOD, lab.peer_interface, lab.root_v4, root_mac, str(RANDOM_FLOODED),
                       block, "10000", timeout=120)
        assert int(sent.stdout.strip()) == 10000
        collect(s, lab)
        job = jobs.run(s)
    finally:
        subprocess.run(["ip", "route", "del", f"{block}/18", "dev", lab.interface], capture_output=True)
    floods = [f for f in job.evaluation.anomalies if f.detector == "syn_flood"]
    assert [(f.port, f.source, f.source_count, f.details["syn"]) for f in floods] == [(RANDOM_FLOODED, None, 10000, 10000)]
    assert floods[0].details["many_one_way_sources"] is True and "10000 one-way sources" in floods[0].summary
    assert [d for d in job.decisions if d.action == "block"] == []
    conn = connect(s.general.db)
    try:
        assert queries.count_status(conn, "active") == 0 and bpftool_entries(pdir) == 0
        assert conn.execute("SELECT COUNT(*) FROM source_stats WHERE syn = 1").fetchone()[0] == 10000
    finally:
        conn.close()


BLIND = r"""
import sys, time
from scapy.all import Ether, IP, TCP, conf, get_if_hwaddr, sendp
conf.verb = 0
iface, src, dst, dst_mac, first, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
mac = get_if_hwaddr(iface)
for i in range(n):
    l2 = Ether(src=mac, dst=dst_mac) / IP(src=src, dst=dst, ttl=40)      # a forger farther away than the peer
    sendp(l2 / TCP(sport=50000 + i, dport=first + i, flags='S', seq=1000), iface=iface, verbose=False)
    time.sleep(0.005)
    sendp(l2 / TCP(sport=50000 + i, dport=first + i, flags='A', seq=1001, ack=12345), iface=iface, verbose=False)
print(2 * n)
"""


def test_blind_forged_handshakes_under_a_peer_address_are_not_two_way(lab, tmp_path, pin_root):
    """A forger sends SYN then ACK (blind) on 30 listening ports under the peer's address: to ingress
    that looks like 30 completed handshakes, a 'scan of completed connections' that would block the
    peer. The peer's own kernel answers this host's SYN-ACKs with RSTs on the same 5-tuples, so those
    flows are history, not two-way evidence: the scan is one-way, possibly forged, not blocked."""
    s, pdir = loaded(lab, tmp_path, pin_root)
    s.evaluator.scan_ports = 25
    benign = lab.host_v4(1)
    listeners = []
    for port in range(47000, 47030):                    # open ports: this host answers each SYN with a SYN-ACK
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((lab.root_v4, port))
        sock.listen(1)
        listeners.append(sock)
    server = EchoServer(lab.root_v4, SERVICE)
    client = lab.popen(sys.executable, "-c", CLIENT, benign, lab.root_v4, str(SERVICE), "20",
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "talked"
        collect(s, lab)
        root_mac = open(f"/sys/class/net/{lab.interface}/address").read().strip()
        sent = lab.run(sys.executable, "-c", BLIND, lab.peer_interface, benign, lab.root_v4, root_mac, "47000", "30",
                       timeout=120)
        assert int(sent.stdout.strip()) == 60
        collect(s, lab)
        job = jobs.run(s)
    finally:
        client.stdin.close()
        client.wait(timeout=10)
        server.close()
        for sock in listeners:
            sock.close()
    conn = connect(s.general.db)
    try:
        # every forged flow carries SYN, ACK and the real owner's RST (0x16)
        flows = conn.execute("SELECT COUNT(*) FROM flows WHERE src_address = ? AND dst_port BETWEEN 47000 AND 47029 "
                             "AND (tcp_flags & 22) = 22", (benign,)).fetchone()[0]
        assert flows == 30
        assert queries.count_status(conn, "active") == 0 and bpftool_entries(pdir) == 0
    finally:
        conn.close()
    [scan] = [f for f in job.evaluation.anomalies if f.detector == "port_scan"]
    assert scan.source == benign and scan.sources[0].evidence == "one-way" and scan.sources[0].forged is True
    assert [(d.address, d.action) for d in job.decisions] == [(f"{benign}/32", "refused")]


def _v6_syns(dst: str, port: int, n: int):
    """n SYN frames to dst:port, each from another address of 2001:db8:ff::/48 (built by patching one
    scapy frame: 250,000 in about a second)."""
    from scapy.all import IPv6, TCP, Ether
    raw = bytearray(bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IPv6(src="2001:db8:ff::1", dst=dst)
                          / TCP(sport=40000, dport=port, flags="S")))
    base = int(ipaddress.IPv6Address("2001:db8:ff::"))
    for i in range(n):
        raw[22:38] = (base + 1 + i * 7919).to_bytes(16, "big")        # the IPv6 source address
        yield bytes(raw)


@pytest.mark.slow
def test_a_flood_of_250000_forged_sources_cannot_hide_a_scanner(lab, tmp_path, pin_root):
    """One round: a real 100-port SYN scan (hping3), then 250,000 SYNs from distinct forged sources run
    through the loaded XDP program (BPF_PROG_TEST_RUN: the same code path, nothing on the wire). The
    flood evicts the scanner from the per-source LRU maps; its promotion into the non-evicting
    scanners map keeps it: the round's port_scan names it, and the flood names only its own sources."""
    from app.lab import run_frames
    s, pdir = loaded(lab, tmp_path, pin_root)
    scanner = lab.host_v4(2)
    # the scan sent from one CPU: a promotion counts the ports that CPU saw first (the sources map is
    # per CPU), so a scan split across CPUs before its promotion is under-counted by the other CPU's ports
    proc = lab.run("timeout", "30", "taskset", "-c", "0", "hping3", "-q", "-a", scanner, "-S", "-p", "++1000",
                   "-c", "100", "-i", "u500", lab.root_v4, check=False, timeout=40)
    assert proc.returncode == 0 or "packets transmitted" in proc.stdout + proc.stderr, proc.stderr
    t0 = time.monotonic()
    seen = run_frames(pdir / "prog", _v6_syns(lab.root_v6, RANDOM_FLOODED, 250_000))
    flood_seconds = time.monotonic() - t0
    assert seen == {2: 250_000}                                       # XDP_PASS: counted, not dropped
    collect(s, lab)
    job = jobs.run(s)
    conn = connect(s.general.db)
    try:
        r = conn.execute("SELECT new_sources, source_evictions, srcport_evictions FROM rounds ORDER BY id DESC "
                         "LIMIT 1").fetchone()
        row = conn.execute("SELECT packets, syn, distinct_ports FROM source_stats WHERE address = ? ORDER BY round_id "
                           "DESC LIMIT 1", (scanner,)).fetchone()
    finally:
        conn.close()
    found = job.evaluation.anomalies
    scans = [f for f in found if f.detector == "port_scan"]
    flood_named = {a for f in found if f.detector == "syn_flood" for a in f.addresses}
    print(f"\n250,000 forged sources in {flood_seconds:.1f} s: new sources {r[0]}, source evictions {r[1]}, "
          f"srcport evictions {r[2]}; scanner row {tuple(row) if row else None}; port_scan sources "
          f"{[f.source for f in scans]} score {[f.score for f in scans]}; flood names {len(flood_named)} addresses")
    assert r[1] > 100_000                                              # the flood did evict
    assert [f.source for f in scans] == [scanner] and scans[0].score >= 100
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("2001:db8:ff::/48") for a in flood_named)
    assert (f"{scanner}/32", "block") in [(d.address, d.action) for d in job.decisions]
