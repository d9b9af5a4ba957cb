"""Answers and verified peers in network namespaces, real XDP and TC, real curl, hping3 and scapy.

- A forged scan under the address of a server this host never contacted gets that address blocked
  (it is unknown), yet `curl` from this host to the server still works: the answers to a connection
  this host opened pass XDP and are counted apart (``blacklist_drops.replies``, ``blacklist list``),
  and the server becomes a verified peer ('opened-tcp').
- A real scanner cannot make itself a peer: two blind PSH|ACK segments (this host answers RST) and a
  UDP probe that an open UDP service answered prove nothing, so its scan is blocked.
- The answers to this host's own outbound sweep (RSTs from closed ports to its ephemeral ports) are
  no inbound scan by the swept address.

Lab: XDP and TC egress on the root side of a veth (this host); the peer namespace holds the server,
the scanner and the swept address. Every packet stays between lab addresses.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from app.db import blacklist as queries
from app.db import peers
from app.db.connection import connect
from app.services import jobs
from tests.helpers import REPO, collect, loaded, pin_root  # noqa: F401
from tests.services.evaluation.test_forged_netns import hping

pytestmark = pytest.mark.kernel

HTTP_PORT = 8077

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4); s.settimeout(60)
print('ready', flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    c.recv(1000)
    c.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello')
    c.close()
"""


def _cli(s, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PORTWATCH_DB=s.general.db, PORTWATCH_PIN_ROOT=str(s.general.pin_root),
               PORTWATCH_STATE_DIR=s.general.state_dir, PORTWATCH_CONFIG=str(tmp_path / "none.toml"))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=60)


def _curl(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "--max-time", "5", url], capture_output=True, text=True, timeout=20)


def test_forged_scan_under_a_server_address_never_cuts_this_host_off(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    server = lab.host_v4(1)
    srv = lab.popen(sys.executable, "-c", SERVER, server, str(HTTP_PORT), "2", stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        hping(lab, "-a", server, "-S", "-p", "++1000", "-c", "100", "-i", "u500")    # forged: 100 ports
        collect(s, lab)
        job = jobs.run(s)
        assert [(d.address, d.action) for d in job.decisions] == [(f"{server}/32", "block")]   # an unknown address
        first = _curl(f"http://{server}:{HTTP_PORT}/")
        second = _curl(f"http://{server}:{HTTP_PORT}/")
        collect(s, lab)
    finally:
        srv.kill()
        srv.wait(timeout=10)
    assert (first.returncode, first.stdout, second.returncode, second.stdout) == (0, "hello", 0, "hello")
    conn = connect(s.general.db)
    try:
        passed = queries.replies_passed(conn)
        drops = conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?", (f"{server}/32",)).fetchone()[0]
        row = peers.peer(conn, server)
        print(f"\ncurl through a block: replies passed {passed}, drops {drops}, peer proof {row['proof']}")
        assert passed.get(f"{server}/32", 0) >= 4          # two SYN-ACKs and two answers at least
        assert not drops                                   # nothing of the server's was dropped
        assert row["proof"] == "opened-tcp" and row["ttl"] == 64 and row["mac"]
    finally:
        conn.close()
    listed = _cli(s, tmp_path, "blacklist", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["address"] == f"{server}/32" and entry["replies_passed"] == passed[f"{server}/32"]


PSH_ACK = r"""
import sys
from scapy.all import Ether, IP, TCP, conf, get_if_hwaddr, sendp
conf.verb = 0
iface, src, dst, dst_mac, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
l2 = Ether(src=get_if_hwaddr(iface), dst=dst_mac) / IP(src=src, dst=dst)
sendp([l2 / TCP(sport=51000 + i, dport=port, flags='PA', seq=1000, ack=777) / b'x' for i in range(2)], iface=iface)
print(2)
"""


def test_blind_psh_ack_then_a_scan_is_blocked(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    scanner = lab.host_v4(2)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((lab.root_v4, 47100))
    listener.listen(1)
    try:
        root_mac = open(f"/sys/class/net/{lab.interface}/address").read().strip()
        sent = lab.run(sys.executable, "-c", PSH_ACK, lab.peer_interface, scanner, lab.root_v4, root_mac, "47100")
        assert sent.stdout.strip() == "2"                   # this host answers each with an RST
        collect(s, lab)
        hping(lab, "-a", scanner, "-S", "-p", "++1000", "-c", "100", "-i", "u500")   # its own address
        collect(s, lab)
        job = jobs.run(s)
    finally:
        listener.close()
    conn = connect(s.general.db)
    try:
        assert peers.peer(conn, scanner) is None
    finally:
        conn.close()
    [scan] = [f for f in job.evaluation.anomalies if f.detector == "port_scan"]
    assert scan.source == scanner and scan.sources[0].forged is False
    assert [(d.address, d.action) for d in job.decisions] == [(f"{scanner}/32", "block")]


def test_udp_scan_that_an_open_service_answers_is_blocked(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    scanner = lab.host_v4(2)
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind((lab.root_v4, 5353))
    responder.settimeout(0.2)
    answered, stop = [], threading.Event()

    def answer():
        while not stop.is_set():
            try:
                data, addr = responder.recvfrom(100)
            except socket.timeout:
                continue
            responder.sendto(b"a" + data, addr)
            answered.append(addr[0])

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert int(lab.send("--src", scanner, "--dst", lab.root_v4, "--ports", "5300-5399", "--count", "1")) == 100
        collect(s, lab)
        job = jobs.run(s)
    finally:
        stop.set()
        t.join(timeout=5)
        responder.close()
    assert answered == [scanner]                           # the open service answered the probe
    conn = connect(s.general.db)
    try:
        assert peers.peer(conn, scanner) is None           # an answered inbound request proves nothing
    finally:
        conn.close()
    [scan] = [f for f in job.evaluation.anomalies if f.detector == "port_scan"]
    print(f"\nUDP scan: {scan.details['port_ranges']}, {scan.summary}")
    assert scan.source == scanner and scan.details["ports_known"] >= 100 and [5300, 5399] in scan.details["port_ranges"]["udp"]
    assert [(d.address, d.action) for d in job.decisions] == [(f"{scanner}/32", "block")]


SWEEP = r"""
import socket, sys
dst, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
refused = 0
for port in range(first, first + n):
    s = socket.socket(); s.settimeout(2)
    refused += s.connect_ex((dst, port)) != 0
    s.close()
print(refused)
"""


def test_outbound_sweep_answers_are_no_inbound_scan(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    target = lab.host_v4(2)
    out = subprocess.run([sys.executable, "-c", SWEEP, target, "2000", "300"], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "300"                      # every port closed: 300 RSTs to 300 ephemeral ports
    collect(s, lab)
    job = jobs.run(s)
    inbound = [f for f in job.evaluation.anomalies if target in f.addresses and f.detector != "outbound_scan"]
    assert inbound == [] and job.decisions == []
    conn = connect(s.general.db)
    try:
        replies = conn.execute("SELECT COUNT(*), SUM(packets) FROM flows WHERE src_address = ? AND direction = 'in' "
                               "AND (tcp_flags & 256) != 0", (target,)).fetchone()
        print(f"\noutbound sweep: {replies[0]} stored answer flows ({replies[1]} packets) from {target}")
        assert replies[0] >= 150 and conn.execute("SELECT COUNT(*) FROM source_ports WHERE address = ?",
                                                  (target,)).fetchone()[0] == 0
        assert peers.peer(conn, target) is None             # an RST answers, but proves no handshake
    finally:
        conn.close()
    assert [f.detector for f in job.evaluation.anomalies if target in f.addresses] in ([], ["outbound_scan"])


def test_icmp_unreachable_answering_this_host_passes_a_block_and_is_counted(lab, tmp_path, pin_root):
    """This host sends UDP to a closed port of a blocked address (IPv4 and IPv6): the ICMP port
    unreachable quoting its datagram answers its own traffic, so XDP passes it (the connected socket
    gets ECONNREFUSED) and counts it as passed as replies; the block still drops what the address starts."""
    s, pdir = loaded(lab, tmp_path, pin_root)
    targets = (lab.host_v4(2), lab.host_v6(2))
    for target in targets:
        added = _cli(s, tmp_path, "blacklist", "add", target, "--ttl", "1h", "--force")
        assert added.returncode == 0, added.stderr
    outcomes = {}
    for target, family, local in ((targets[0], socket.AF_INET, lab.root_v4), (targets[1], socket.AF_INET6, lab.root_v6)):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((local, 0))
        sock.connect((target, 47999))                   # nothing listens there
        sock.settimeout(2)
        for i in range(3):
            sock.send(b"ping %d" % i)
            try:
                sock.recv(100)
                outcomes.setdefault(target, []).append("answered")
            except ConnectionRefusedError:
                outcomes.setdefault(target, []).append("refused")
            except socket.timeout:
                outcomes.setdefault(target, []).append("timeout")
        sock.close()
    hping(lab, "-a", targets[0], "-S", "-p", "++1000", "-c", "20", "-i", "u500")     # what it starts: dropped
    collect(s, lab)
    assert outcomes == {t: ["refused"] * 3 for t in targets}
    conn = connect(s.general.db)
    try:
        passed = queries.replies_passed(conn)
        drops = dict(conn.execute("SELECT address, SUM(drops) FROM blacklist_drops GROUP BY address").fetchall())
        icmp = conn.execute("SELECT src_address, protocol, packets, tcp_flags FROM flows WHERE direction = 'in' AND "
                            "protocol IN ('icmp', 'icmpv6') ORDER BY src_address").fetchall()
        print(f"\nICMP errors through a block: replies passed {passed}, drops {drops}, flows {[tuple(r) for r in icmp]}")
        assert passed == {f"{targets[0]}/32": 3, f"{targets[1]}/128": 3}
        assert drops.get(f"{targets[0]}/32") == 20                      # the SYNs it started
        assert {r["src_address"] for r in icmp} == set(targets) and all(r["tcp_flags"] & 256 for r in icmp)
        assert conn.execute("SELECT COUNT(*) FROM source_ports WHERE address IN (?, ?)", targets).fetchone()[0] == 0
    finally:
        conn.close()
