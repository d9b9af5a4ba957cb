"""Scanner: listeners of a child process appear with its pid, name and user (IPv4 and IPv6),
established connections are counted, and a scan inside a fresh namespace matches `ss`."""
from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time

import pytest

from app.services.collector.scanner import Listener, Scanner, listening_ports, merge_scans

CHILD_NAME = "pwsn-listener"      # the child's /proc/<pid>/comm, set with prctl(PR_SET_NAME)

# Binds TCP and UDP on IPv4 and IPv6 loopback (kernel-chosen ports), prints them as JSON,
# accepts connections (keeping them open) until its stdin closes.
CHILD = r"""
import ctypes, json, socket, sys, threading
ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)          # PR_SET_NAME
socks = {}
for key, family, kind, host in (("tcp4", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                                ("tcp6", socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                                ("udp4", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                                ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, "::1")):
    s = socket.socket(family, kind)
    s.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        s.listen(16)
    socks[key] = s
accepted = []
def accept(s):
    while True:
        accepted.append(s.accept()[0])
for key in ("tcp4", "tcp6"):
    threading.Thread(target=accept, args=(socks[key],), daemon=True).start()
print(json.dumps({k: s.getsockname()[1] for k, s in socks.items()}), flush=True)
sys.stdin.read()
""".replace("NAME", repr(CHILD_NAME))


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        yield proc, ports
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def _find(listeners: list[Listener], port: int, protocol: str, address: str) -> Listener:
    found = [x for x in listeners if (x.port, x.protocol, x.address) == (port, protocol, address)]
    assert len(found) == 1, f"{protocol} {address}:{port} not listed once: {found}"
    return found[0]


def test_child_listeners_appear_with_pid_name_and_user(child):
    proc, ports = child
    listeners = Scanner().scan()
    user = pwd.getpwuid(os.getuid()).pw_name
    expected = {"tcp4": ("tcp", "127.0.0.1", "ipv4", "LISTEN"), "tcp6": ("tcp", "::1", "ipv6", "LISTEN"),
                "udp4": ("udp", "127.0.0.1", "ipv4", "BOUND"), "udp6": ("udp", "::1", "ipv6", "BOUND")}
    for key, (protocol, address, family, state) in expected.items():
        listener = _find(listeners, ports[key], protocol, address)
        assert listener == Listener(ports[key], protocol, address, family, state, proc.pid, CHILD_NAME, user, 0)
    assert {(ports["tcp4"], "tcp"), (ports["udp6"], "udp")} <= listening_ports(listeners)


def test_established_count_goes_up_when_clients_connect(child):
    proc, ports = child
    scanner = Scanner()
    assert _find(scanner.scan(), ports["tcp4"], "tcp", "127.0.0.1").established == 0
    clients = [socket.create_connection(("127.0.0.1", ports["tcp4"]), timeout=5) for _ in range(2)]
    clients.append(socket.create_connection(("::1", ports["tcp6"]), timeout=5))
    try:
        deadline = time.monotonic() + 5
        while True:
            listeners = scanner.scan()
            v4 = _find(listeners, ports["tcp4"], "tcp", "127.0.0.1")
            v6 = _find(listeners, ports["tcp6"], "tcp", "::1")
            if (v4.established, v6.established) == (2, 1) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (v4.established, v6.established) == (2, 1)
        assert v4.pid == proc.pid          # the count does not change who holds the port
    finally:
        for c in clients:
            c.close()


def test_merge_keeps_every_socket_once_with_the_highest_count():
    a = Listener(22, "tcp", "0.0.0.0", "ipv4", "LISTEN", 10, "sshd", "root", 1)
    b = Listener(53, "udp", "::", "ipv6", "BOUND", 11, "dnsmasq", "nobody", 0)
    merged = merge_scans([a], [a._replace(established=3), b])
    assert merged == [a._replace(established=3), b]


def test_vanished_process_is_described_as_unknown():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert Scanner()._describe(proc.pid) == (None, None)
    assert Scanner()._describe(None) == (None, None)


SS_CROSS_CHECK = r"""
import json, socket, subprocess, sys
sys.path.insert(0, REPO)
from app.services.collector.scanner import Scanner
socks = []
for family, kind, host, port in ((socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 2222),
                                 (socket.AF_INET6, socket.SOCK_STREAM, "::", 8443),
                                 (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 5353),
                                 (socket.AF_INET6, socket.SOCK_DGRAM, "::1", 5354)):
    s = socket.socket(family, kind)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    socks.append(s)
ss = subprocess.run(["ss", "-H", "-l", "-n", "-t", "-u"], capture_output=True, text=True, check=True).stdout
theirs = sorted([line.split()[0], line.split()[4].rsplit(":", 1)[1]] for line in ss.splitlines())
ours = sorted([x.protocol, str(x.port)] for x in Scanner().scan())
print(json.dumps({"ss": theirs, "scanner": ours}))
""".replace("REPO", repr(str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))))


@pytest.mark.kernel
def test_scan_matches_ss_in_a_fresh_namespace(lab):
    """Inside the lab's peer namespace only our sockets exist, so the two views must agree exactly."""
    out = lab.run(sys.executable, "-c", SS_CROSS_CHECK, timeout=60).stdout
    views = json.loads(out)
    assert views["scanner"] == views["ss"]
    assert views["scanner"] == [["tcp", "2222"], ["tcp", "8443"], ["udp", "5353"], ["udp", "5354"]]
