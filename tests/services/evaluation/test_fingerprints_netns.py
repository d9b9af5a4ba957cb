"""Fingerprints of verified peers in network namespaces, real XDP and TC, real TCP clients and scapy.

- A peer on the link proves itself with a real TCP handshake; a second namespace on the same link
  (a macvlan: another MAC) sends a SYN scan under the peer's address with the peer's own TTL: the
  MAC gives it away: possibly forged, alert only, the peer is not blocked.
- A peer behind a router (off-link: every packet of it carries the router's MAC) is fingerprinted by
  its TTL only: the same scan coming through another router of the link (another MAC, the same hop
  count) is the peer's own as far as anyone can tell, and is judged like anyone's (blocked).

Lab: XDP and TC egress on the root side of a veth (this host); the peer namespace holds the peers and
routes for the off-link address; the forger namespace hangs off the peer's veth end by a macvlan.
Every packet stays between lab addresses.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from app.db import blacklist as queries
from app.db import peers
from app.db.connection import connect
from app.services import jobs
from tests.helpers import bpftool_entries, collect, loaded, pin_root  # noqa: F401
from tests.services.evaluation.test_forged_netns import CLIENT, SERVICE, EchoServer

pytestmark = pytest.mark.kernel

SCAN = r"""
import sys
from scapy.all import Ether, IP, TCP, conf, get_if_hwaddr, sendp
conf.verb = 0
iface, src, dst, dst_mac = sys.argv[1:5]
ttl, first, n = (int(x) for x in sys.argv[5:8])
l2 = Ether(src=get_if_hwaddr(iface), dst=dst_mac) / IP(src=src, dst=dst, ttl=ttl)
sendp([l2 / TCP(sport=40000 + i, dport=first + i, flags='S') for i in range(n)], iface=iface, verbose=False)
print(n)
"""


def _mac(interface: str, namespace: str | None = None) -> str:
    cmd = ["cat", f"/sys/class/net/{interface}/address"]
    return subprocess.run(["ip", "netns", "exec", namespace, *cmd] if namespace else cmd, capture_output=True,
                          text=True, check=True).stdout.strip()


@contextmanager
def second_station(lab):
    """A namespace on the same link as the lab's peer, with its own MAC (a bridge-mode macvlan on the
    peer's veth end): yields (namespace, interface, its MAC). Removed with the namespace."""
    namespace, link = f"{lab.prefix}-f", f"{lab.prefix}f0"
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
    try:
        lab.run("ip", "link", "add", "link", lab.peer_interface, "name", link, "type", "macvlan", "mode", "bridge")
        lab.run("ip", "link", "set", link, "netns", namespace)
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", link, "up"], check=True,
                       capture_output=True)
        yield namespace, link, _mac(link, namespace)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def scan_from(namespace: str, link: str, lab, src: str, ttl: int, n: int = 150) -> None:
    """A scapy SYN scan of n ports from ``namespace`` under the address ``src``, IP TTL ``ttl``."""
    out = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCAN, link, src, lab.root_v4,
                          _mac(lab.interface), str(ttl), "3000", str(n)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert int(out.stdout.strip()) == n


@contextmanager
def talking_client(lab, address: str):
    """A real TCP client at ``address`` (in the peer namespace) that completed a handshake with this
    host's echo server and exchanged 20 messages; stays connected until the block ends."""
    server = EchoServer(lab.root_v4, SERVICE)
    client = lab.popen(sys.executable, "-c", CLIENT, address, lab.root_v4, str(SERVICE), "20",
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "talked"
        yield
    finally:
        client.stdin.close()
        client.wait(timeout=10)
        server.close()


def _scan_of(job, address):
    [scan] = [f for f in job.evaluation.anomalies if f.detector == "port_scan" and f.source == address]
    return scan


def test_a_verified_peer_forged_from_another_mac_on_the_link_is_not_blocked(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    benign = lab.host_v4(1)
    with talking_client(lab, benign):
        collect(s, lab)                                     # the handshake: a verified peer, TTL 64, its MAC
        with second_station(lab) as (namespace, link, forger_mac):
            scan_from(namespace, link, lab, benign, ttl=64)     # the peer's own TTL, another MAC
        collect(s, lab)
        job = jobs.run(s)
    peer_mac = _mac(lab.peer_interface, lab.namespace)
    assert forger_mac != peer_mac
    conn = connect(s.general.db)
    try:
        row = peers.peer(conn, benign)
        assert (row["proof"], row["ttl"], row["mac"]) == ("handshake", 64, peer_mac)     # on-link: its MAC
        assert queries.count_status(conn, "active") == 0 and bpftool_entries(pdir) == 0
    finally:
        conn.close()
    scan = _scan_of(job, benign)
    assert scan.sources[0].forged is True and f"from MAC {forger_mac}" in scan.sources[0].note
    assert [(d.address, d.action) for d in job.decisions] == [(f"{benign}/32", "refused")]


def test_an_off_link_peer_is_fingerprinted_by_its_ttl_only(lab, tmp_path, pin_root):
    """198.19.<subnet>.77 sits behind the lab's peer (a router: a /32 route via it): its proof carries
    the router's MAC, which says nothing about who sent it. Its scan through another station of the
    link (another MAC, the same TTL) cannot be told from its own: judged, and blocked."""
    remote = f"198.19.{lab.subnet}.77"
    s, pdir = loaded(lab, tmp_path, pin_root)
    lab.run("ip", "addr", "add", f"{remote}/32", "dev", "lo")
    route = ["ip", "route", "add", f"{remote}/32", "via", lab.host_v4(0), "dev", lab.interface]
    subprocess.run(route, check=True, capture_output=True)
    try:
        with talking_client(lab, remote):
            collect(s, lab)
            with second_station(lab) as (namespace, link, _):
                scan_from(namespace, link, lab, remote, ttl=64)
            collect(s, lab)
            job = jobs.run(s)
    finally:
        subprocess.run(["ip", "route", "del", f"{remote}/32", "dev", lab.interface], capture_output=True)
    conn = connect(s.general.db)
    try:
        row = peers.peer(conn, remote)
        assert (row["proof"], row["ttl"], row["mac"]) == ("handshake", 64, None)      # off-link: no MAC
    finally:
        conn.close()
    scan = _scan_of(job, remote)
    assert scan.sources[0].forged is False
    assert (f"{remote}/32", "block") in [(d.address, d.action) for d in job.decisions]


def test_blind_handshakes_under_a_silent_peer_from_another_ttl_are_forged(lab, tmp_path, pin_root):
    """The peer's firewall drops SYN-ACKs it never asked for, so no RST gives the forgery away: a blind
    SYN then ACK on 30 listening ports under the verified peer's address looks like 30 completed
    handshakes of a verified address. Their TTL (40, the peer proved itself with 64) is not the peer's:
    one-way, possibly forged, not blocked."""
    from tests.services.evaluation.test_forged_netns import BLIND
    s, pdir = loaded(lab, tmp_path, pin_root)
    s.evaluator.scan_ports = 25
    benign = lab.host_v4(1)
    listeners = []
    for port in range(47000, 47030):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((lab.root_v4, port))
        sock.listen(1)
        listeners.append(sock)
    try:
        with talking_client(lab, benign):
            collect(s, lab)
            lab.run("iptables", "-A", "INPUT", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "--dport", "50000:50029",
                    "-j", "DROP")
            sent = lab.run(sys.executable, "-c", BLIND, lab.peer_interface, benign, lab.root_v4, _mac(lab.interface),
                           "47000", "30", timeout=120)
            assert int(sent.stdout.strip()) == 60
            collect(s, lab)
            job = jobs.run(s)
    finally:
        for sock in listeners:
            sock.close()
    conn = connect(s.general.db)
    try:
        # completed-looking handshakes (SYN and ACK), and no RST from the silent owner
        flows = conn.execute("SELECT COUNT(*), SUM((tcp_flags & 4) != 0) FROM flows WHERE src_address = ? AND "
                             "dst_port BETWEEN 47000 AND 47029 AND (tcp_flags & 18) = 18", (benign,)).fetchone()
        assert tuple(flows) == (30, 0)
        assert queries.count_status(conn, "active") == 0 and bpftool_entries(pdir) == 0
    finally:
        conn.close()
    scan = _scan_of(job, benign)
    assert scan.sources[0].evidence == "one-way" and scan.sources[0].forged is True
    assert "handshakes under a verified peer's address with IP TTL 40" in scan.sources[0].note
    assert [(d.address, d.action) for d in job.decisions] == [(f"{benign}/32", "refused")]
