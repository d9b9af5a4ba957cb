"""Helpers shared by kernel tests: settings for a tmp database, one collection on a lab, and the
blocklist tests' fixtures (tests/services/test_blocklist.py, tests/commands/test_blacklist.py).

Blocklist tests pin under their OWN root (``pin_root`` fixture) rather than /sys/fs/bpf/portwatch:
reconciling "every interface under pin_root" must never touch the maps of another test run's
labs that share this machine.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from app import config
from app.threads import collection

def make_settings(tmp_path, **collector):
    env = {"PORTWATCH_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    s = config.load(environ=env)
    s.general.db = str(tmp_path / "ports.db")
    s.general.state_dir = str(tmp_path / "state")
    s.general.run_dir = str(tmp_path / "run")
    s.scanner.enabled = False
    s.sniffer.enabled = False
    for k, v in collector.items():
        setattr(s.collector, k, v)
    return s


def collect(settings, lab, seconds=0.2, rounds=1):
    return collection.run_collection(settings, lab.interface, seconds, rounds, with_threads=False)



_pins = [0]


@pytest.fixture
def pin_root():
    """A private pin root under /sys/fs/bpf, removed (with every pin in it) after the test."""
    _pins[0] += 1
    root = Path(f"/sys/fs/bpf/{os.environ.get('PW_TEST_PREFIX', 'pwt')[:4]}-{os.getpid()}-{_pins[0]}")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def blocklist_settings(tmp_path, pin_root=None, **blocklist):
    """Test settings (tmp db/state, no scanner/sniffer) with ``blocklist.<key>`` overrides.

    Without ``pin_root`` the pin root is an empty tmp directory: nothing is enforced anywhere.
    """
    s = make_settings(tmp_path)
    s.general.pin_root = str(pin_root if pin_root is not None else tmp_path / "no-pins")
    for key, value in blocklist.items():
        setattr(s.blocklist, key, value)
    return s


def add_evaluation(conn, anomalies: list[dict], at: float | None = None) -> int:
    """An evaluations row with the given anomalies; each dict may hold detector, source, reasons (dict),
    port/protocol (a ports row is made), first_round_id, last_round_id, score. Returns the evaluation id."""
    at = time.time() if at is None else at
    with conn:
        eid = conn.execute("INSERT INTO evaluations (started_at, finished_at, status) VALUES (?, ?, 'ok')",
                           (at, at)).lastrowid
        for a in anomalies:
            port_id = None
            if a.get("port") is not None:
                port_id = port_row(conn, a["port"], a.get("protocol", "tcp"))
            conn.execute("INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, "
                         "first_round_id, last_round_id, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (eid, port_id, a.get("detector", "port_scan"), a.get("score", 1.0), a.get("threshold", 0.5),
                          json.dumps(a.get("reasons", {})), a.get("first_round_id"), a.get("last_round_id"),
                          a.get("source"), at))
    return eid


def port_row(conn, value: int, protocol: str) -> int:
    conn.execute("INSERT OR IGNORE INTO ports (value, protocol) VALUES (?, ?)", (value, protocol))
    return conn.execute("SELECT id FROM ports WHERE value = ? AND protocol = ?", (value, protocol)).fetchone()[0]


class UdpSink:
    """A UDP socket bound in the ROOT namespace: what it receives got past XDP and through the stack."""

    def __init__(self, address: str, port: int):
        self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((address, port))
        self.sock.settimeout(0.3)

    def drain(self, seconds: float = 3.0) -> dict[str, int]:
        """Datagrams received per source address until 0.3 s pass with nothing new (or ``seconds``)."""
        seen: dict[str, int] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                _, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                break
            seen[addr[0]] = seen.get(addr[0], 0) + 1
        return seen

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def send_udp(lab, src: str, dst: str, port: int, count: int) -> int:
    """``count`` UDP datagrams from lab host ``src`` to ``dst``:``port``; returns how many were sent."""
    return int(lab.send("--src", src, "--dst", dst, "--ports", str(port), "--count", str(count)).strip())
