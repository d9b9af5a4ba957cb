"""Helpers shared by kernel tests: settings for a tmp database, one collection on a lab, and the
blocklist tests' fixtures (tests/services/blocklist/test_{blocklist,decisions,enforcement}.py,
tests/commands/test_blacklist.py): stored findings, ledger events, the real pinned map.

Blocklist tests pin under their OWN root (``pin_root`` fixture) rather than /sys/fs/bpf/portwatch:
reconciling "every interface under pin_root" must never touch the maps of another test run's
labs that share this machine.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from app import config
from app.threads import collection

REPO = Path(__file__).resolve().parent.parent

def make_settings(tmp_path, **collector):
    env = {"PORTWATCH_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    s = config.load(environ=env)
    s.general.db = str(tmp_path / "ports.db")
    s.general.state_dir = str(tmp_path / "state")
    s.general.run_dir = str(tmp_path / "run")
    s.reports.out_dir = str(tmp_path / "reports")          # the evaluation job reports (also in warm-up)
    s.scanner.enabled = False
    s.sniffer.enabled = False
    for k, v in collector.items():
        setattr(s.collector, k, v)
    return s


# what each later migration added, undone: a test that makes an older schema out of today's undoes every
# migration after the version it wants (drop columns and tables in reverse order)
UNDO_MIGRATION = {
    11: "ALTER TABLE peers DROP COLUMN proof; ALTER TABLE peers DROP COLUMN ttl; ALTER TABLE peers DROP COLUMN mac; "
        "ALTER TABLE peers DROP COLUMN last_verified; ALTER TABLE blacklist_drops DROP COLUMN replies; "
        "ALTER TABLE source_stats DROP COLUMN mac;",
    13: "ALTER TABLE counter_snapshots DROP COLUMN epoch; ALTER TABLE counter_snapshots DROP COLUMN buckets; "
        "DROP TABLE snapshot_buckets; DROP TABLE snapshot_log;",
    # SQLite cannot drop the last column of rounds (its definition ends in a comment): renamed out of the way
    15: "ALTER TABLE rounds RENAME COLUMN replayed TO replayed_undone; ALTER TABLE rounds RENAME COLUMN capture "
        "TO capture_undone; ALTER TABLE rounds_ports DROP COLUMN inferred;",
}


def downgrade(conn, version: int, extra_sql: str = "") -> None:
    """Make today's schema in ``conn`` look like schema ``version``: undo the later migrations listed in
    UNDO_MIGRATION, run ``extra_sql`` (what the migrations up to the tested one added), set user_version."""
    for number in sorted((n for n in UNDO_MIGRATION if n > version), reverse=True):
        conn.executescript(UNDO_MIGRATION[number])
    conn.executescript(f"{extra_sql} PRAGMA user_version = {int(version)};")


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


def add_evaluation(conn, findings: list, at: float | None = None) -> list:
    """An evaluations row storing ``findings`` (findings.Finding) the way the evaluation does: each
    one's to_json() in anomalies.reasons, a ports row made for its port, its id and evaluation_id set.
    Returns the findings (stored), what the block decisions take."""
    from app.db import evaluations as dbe
    at = time.time() if at is None else at
    with conn:
        eid = conn.execute("INSERT INTO evaluations (started_at, finished_at, status) VALUES (?, ?, 'ok')",
                           (at, at)).lastrowid
        for f in findings:
            if f.port is not None and f.port_id is None:
                f.port_id = port_row(conn, f.port, f.protocol or "tcp")
            f.evaluation_id = eid
            f.id = dbe.insert_anomaly(conn, evaluation_id=eid, port_id=f.port_id, detector=f.detector, score=f.score,
                                      threshold=f.threshold, reasons=f.to_json(), first_round_id=f.first_round_id,
                                      last_round_id=f.last_round_id, source=f.source, created_at=at)
    return findings


def finding(detector="port_scan", source=None, port=None, protocol="tcp", sources=(), score=1.0, threshold=0.5,
            first_round_id=1, last_round_id=1, summary="", **details):
    """A findings.Finding for decision tests; ``sources``: addresses, or (address, share) pairs, or Source."""
    from app.services.evaluation.findings import Finding, Source
    named = [s if isinstance(s, Source) else Source(s) if isinstance(s, str) else Source(s[0], share=s[1])
             for s in sources]
    return Finding(detector, None, port, protocol if port is not None else None, first_round_id, last_round_id,
                   score, threshold, source=source, sources=named, details=details, summary=summary)


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


# --- blocklist tests: ledger events, a scan finding, the real XDP map --------------------------------

def ledger_events(conn, action=None):
    """(address, action) of every blacklist_events row (of ``action`` only when given), in order."""
    from app.db import blacklist as queries
    rows = queries.events(conn)
    return [(r["address"], r["action"]) for r in rows if action is None or r["action"] == action]


def scan(source, **kw):
    """A stored-to-be port_scan finding naming ``source`` (kw: port, protocol, ...)."""
    return finding("port_scan", source=source, sources=[source], rule="port scan", **kw)


def loaded(lab, tmp_path, pin_root, **blocklist_keys):
    """Settings pinned under ``pin_root`` and one collection on the lab (compile, attach, pin); (settings, pin dir)."""
    s = blocklist_settings(tmp_path, pin_root, **blocklist_keys)
    collect(s, lab)
    return s, Path(s.general.pin_root) / lab.interface


def map_drops(pdir, cidr) -> int | None:
    """The drop counter of ``cidr``'s entry in the pinned blacklist map, None when it has none."""
    from app.services.kernel import bpf_structs, maps
    from app.services.kernel.enforcement import parse_network
    with maps.PinnedMap(pdir / "blacklist") as m:
        raw = m.lookup(bpf_structs.lpm_key(parse_network(cidr)))
    return None if raw is None else bpf_structs.PwBlacklistValue.from_buffer_copy(raw[:ctypes.sizeof(bpf_structs.PwBlacklistValue)]).drops


def bpftool_entries(pdir) -> int:
    """Entries in the pinned blacklist map, as bpftool counts them."""
    import subprocess
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pdir / "blacklist")],
                         capture_output=True, text=True, check=True)
    return len(json.loads(out.stdout))


def attach_foreign_xdp(interface: str, name: bytes = b"foreign_pass") -> int:
    """Attach a program portwatch did not load to ``interface`` (generic mode): two instructions,
    ``r0 = XDP_PASS; exit``, loaded and attached through libbpf (no compiler). Returns its kernel id."""
    import ctypes
    from app.services.kernel import maps
    from app.services.kernel.attachment import xdp_attachment
    lib = maps.libbpf()
    insns = bytes.fromhex("b700000002000000" "9500000000000000")
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                  ctypes.c_void_p]
    fd = lib.bpf_prog_load(6, name, b"GPL", insns, 2, None)          # BPF_PROG_TYPE_XDP
    assert fd >= 0, f"bpf_prog_load failed ({fd})"
    lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]
    try:
        ifindex = int(Path(f"/sys/class/net/{interface}/ifindex").read_text())
        assert lib.bpf_xdp_attach(ifindex, fd, 1 << 1, None) == 0      # XDP_FLAGS_SKB_MODE
    finally:
        os.close(fd)                       # the attachment keeps the program
    return xdp_attachment(interface)[0]
