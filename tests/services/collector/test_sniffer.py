"""Sniffer: real captures on the lab's veth (kernel tests) plus the parser and the no-tshark path.

The DNS test runs dnsmasq in the lab's peer namespace, sends queries with known names from the
root namespace (a stdlib DNS query builder below, no dig needed) and checks the rows written to a
real SQLite file.
"""
from __future__ import annotations

import functools
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from app.config import Sniffer as SnifferConfig
from app.db.connection import connect
from app.db.packets import insert_packets
from app.db.ports import PortIds
from app.errors import DependencyError, PortwatchError
from app.services.ports import ephemeral_range, fold_port
from app.services.collector.sniffer import PacketRecord, Sniffer, find_tshark, record_from_fields, window_seconds
from app.threads.sniffer import SnifferThread

REPO = Path(__file__).resolve().parents[3]
KNOWN_V4 = "portwatch-known.test"
KNOWN_V6 = "portwatch-known6.test"
PROBE = b"probe"
SLACK = 4.0                       # seconds: start-up, process reaping; a bound, not a benchmark


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def dns_query(name: str, qtype: int, query_id: int) -> bytes:
    """A standard recursive query for ``name`` (qtype 1 = A, 28 = AAAA), RFC 1035 wire format."""
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    return header + labels + struct.pack(">HH", qtype, 1)


def ask(server: str, source: str, name: str, qtype: int = 1, query_id: int = 0x5157, timeout: float = 2.0) -> bytes:
    """Send one query over UDP and return the response (socket.timeout when none comes)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(dns_query(name, qtype, query_id), (server, 53))
        while True:
            reply, _ = sock.recvfrom(4096)
            if reply[:2] == struct.pack(">H", query_id):
                return reply


def wait_until_receiving(sniffer: Sniffer, lab, seconds: float = 10) -> None:
    """Send UDP probes (port 7, payload b"probe") to the peer until tshark delivers packets:
    the capture is live from then on."""
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((lab.root_v4, 0))
        while not sniffer.receiving.wait(0.05):
            assert time.monotonic() < deadline, "the capture delivered no packet"
            sock.sendto(PROBE, (lab.peer_v4, 7))


def stop_after_quiet(sniffer: Sniffer, seconds: float = 1.5) -> None:
    """End a window after ``seconds`` without traffic. The stop is immediate (dumpcap gets
    SIGTERM), so dumpcap first gets time to read what the kernel holds; the test's last packet
    stays the last one, which tshark's JSON holds back until the drain. Content tests use long
    windows ended this way, so a slow (loaded) machine cannot end them before their traffic."""
    time.sleep(seconds)
    sniffer.stop_event.set()


def capture_processes(*markers: str) -> list[str]:
    """Live (non-zombie) processes whose command line mentions any marker."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(m and m in cmdline for m in markers):
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def run_in_thread(sniffer: Sniffer) -> tuple[threading.Thread, dict]:
    """Start ``sniffer.run()`` in a thread; the dict gets 'result' / 'error' and 'seconds'."""
    outcome: dict = {}

    def target():
        began = time.monotonic()
        try:
            outcome["result"] = sniffer.run()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def finish(thread: threading.Thread, outcome: dict, bound: float):
    thread.join(bound)
    assert not thread.is_alive(), f"the sniffer did not return within {bound} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.fixture
def dns_server(lab, tmp_path):
    """dnsmasq in the peer namespace answering KNOWN_V4 (A) and KNOWN_V6 (AAAA) with lab
    addresses; killed at the end, even when the test fails."""
    answers = {KNOWN_V4: f"198.18.{lab.subnet}.77", KNOWN_V6: f"2001:db8:18:{lab.subnet}::77"}
    proc = lab.popen("dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=53",
                     f"--listen-address={lab.peer_v4}", f"--listen-address={lab.peer_v6}", "--bind-interfaces",
                     f"--pid-file={tmp_path / 'dnsmasq.pid'}",
                     *(f"--address=/{name}/{address}" for name, address in answers.items()),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:                       # ready when it answers (an unknown name: REFUSED/NXDOMAIN)
            try:
                ask(lab.peer_v4, lab.root_v4, "readiness-probe.test", timeout=0.3)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dnsmasq did not start: {proc.stderr.read().decode(errors='replace')}")
        yield answers
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def store(db_path: Path, interface: str, records) -> tuple:
    """Write records into a real database as round 1; return (connection, round_id)."""
    conn = connect(db_path)
    low, high = ephemeral_range()
    fold = functools.partial(fold_port, listening=set(), low=low, high=high, fold=True)
    with conn:
        now = time.time()
        round_id = conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, ?)",
                                (now - 5, now, interface)).lastrowid
        insert_packets(conn, round_id, records, PortIds(conn), fold)
    return conn, round_id


# --------------------------------------------------------------------------------------------
# kernel tests: real captures
# --------------------------------------------------------------------------------------------
@pytest.mark.kernel
def test_dns_names_from_a_real_server_land_in_sqlite(lab, dns_server, tmp_path):
    sniffer = Sniffer(lab.interface, window_seconds=60, temp_root=tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    replies = [ask(lab.peer_v4, lab.root_v4, KNOWN_V4, 1, 0x100 + i) for i in range(3)]
    replies += [ask(lab.peer_v6, lab.root_v6, KNOWN_V6, 28, 0x200 + i) for i in range(2)]
    # dnsmasq answered with the configured addresses
    assert all(socket.inet_aton(dns_server[KNOWN_V4]) in r for r in replies[:3])
    assert all(socket.inet_pton(socket.AF_INET6, dns_server[KNOWN_V6]) in r for r in replies[3:])
    stop_after_quiet(sniffer)
    result = finish(thread, outcome, sniffer.drain_seconds + SLACK)
    assert result.skipped == 0 and not result.limit_reached and result.stopped_early

    conn, round_id = store(tmp_path / "ports.db", lab.interface, result.records)
    rows = conn.execute("SELECT p.*, ports.value AS port_value, ports.protocol AS port_protocol FROM packets p "
                        "LEFT JOIN ports ON ports.id = p.port_id WHERE round_id = ? AND qry_name IS NOT NULL "
                        "ORDER BY timestamp", (round_id,)).fetchall()
    queries = [r for r in rows if r["resp_name"] is None]
    answers = [r for r in rows if r["resp_name"] is not None]
    # exactly what was sent: the last response (held back by tshark's JSON until the end) included
    assert [r["qry_name"] for r in queries] == [KNOWN_V4] * 3 + [KNOWN_V6] * 2
    assert [r["resp_name"] for r in answers] == [KNOWN_V4] * 3 + [KNOWN_V6] * 2
    assert [r["qry_name"] for r in answers] == [KNOWN_V4] * 3 + [KNOWN_V6] * 2
    low, high = ephemeral_range()
    for r in queries:
        assert (r["dest_port"], r["transport"]) == (53, "udp")
        assert r["dst_address"] in (lab.peer_v4, lab.peer_v6) and r["src_address"] in (lab.root_v4, lab.root_v6)
        assert r["protocols"].endswith(":udp:dns") and r["length"] > r["payload"] > 0
        # the local side is the client's port, folded like port_stats
        assert r["port_value"] == fold_port(r["src_port"], "udp", set(), low, high)
    for r in answers:
        assert r["src_port"] == 53 and r["port_value"] == fold_port(r["dest_port"], "udp", set(), low, high)
    by_name = dict(conn.execute("SELECT qry_name, queries FROM v_dns_names").fetchall())
    assert by_name == {KNOWN_V4: 6, KNOWN_V6: 4}
    conn.close()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.kernel
def test_window_is_bounded_and_leaves_no_file_or_process(lab, tmp_path):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    sniffer = Sniffer(lab.interface, window_seconds=6, temp_root=temp_root)
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    # while capturing, tshark's own dumpcap writes its temp pcapng into the private directory
    private = Path(sniffer.temp_dir)
    assert private.parent == temp_root
    assert list(private.glob("wireshark_*.pcapng")), "tshark's temp file is not in the private directory"
    running = capture_processes(lab.interface, str(private))
    assert len(running) >= 3, running          # dumpcap | tshark (+ tshark's own dumpcap)
    result = finish(thread, outcome, 6 + sniffer.drain_seconds + SLACK)
    assert 5.5 <= outcome["seconds"] <= 6 + sniffer.drain_seconds + SLACK
    assert not result.stopped_early and result.window_seconds == 6
    assert [r.payload for r in result.records if r.dst_port == 7][:1] == [len(PROBE)]
    assert list(temp_root.iterdir()) == []
    assert capture_processes(lab.interface, str(private)) == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in sniffer.pids)


@pytest.mark.kernel
def test_stop_event_ends_a_long_window_and_killing_tshark_leaves_nothing(lab, tmp_path):
    """drain_seconds=0: tshark is killed at once, mid-file; its temp file must not survive."""
    stop = threading.Event()
    sniffer = Sniffer(lab.interface, window_seconds=60, temp_root=tmp_path, stop_event=stop, drain_seconds=0)
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    stop.set()
    result = finish(thread, outcome, SLACK)
    assert result.stopped_early
    assert list(tmp_path.iterdir()) == []
    assert capture_processes(lab.interface, sniffer.temp_dir) == []


@pytest.mark.kernel
def test_max_packets_caps_the_sample(lab, tmp_path):
    sniffer = Sniffer(lab.interface, window_seconds=20, max_packets=7, temp_root=tmp_path)
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    lab.send("--src", lab.peer_v4, "--dst", lab.root_v4, "--ports", "9", "--count", "50", "--payload", "8")
    result = finish(thread, outcome, 10 + SLACK)         # tshark -c ends it long before the window
    assert len(result.records) == 7 and result.limit_reached
    assert outcome["seconds"] < 15


ODD_FRAMES = r"""
import sys
sys.path.insert(0, REPO)
from app.lab import send_scapy
sent = 0
for kind in ("bad-ihl", "truncated-tcp", "truncated-ip", "fragment", "vlan", "qinq"):
    sent += send_scapy(kind, SRC4, DST4, [9], 1, 8, IFACE, 10)
sent += send_scapy("ipv6-ext", SRC6, DST6, [9], 1, 8, IFACE, 10)
print(sent)
"""


@pytest.mark.kernel
def test_odd_frames_do_not_break_the_capture(lab, dns_server, tmp_path):
    sniffer = Sniffer(lab.interface, window_seconds=120, temp_root=tmp_path)
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    code = ODD_FRAMES
    for key, value in (("REPO", str(REPO)), ("SRC4", lab.peer_v4), ("DST4", lab.root_v4), ("SRC6", lab.peer_v6),
                       ("DST6", lab.root_v6), ("IFACE", lab.peer_interface)):
        code = code.replace(key, repr(value))
    sent = int(lab.run(sys.executable, "-c", code, timeout=60).stdout.split()[-1])
    ask(lab.peer_v4, lab.root_v4, KNOWN_V4)       # a normal packet after the odd ones
    stop_after_quiet(sniffer)
    result = finish(thread, outcome, sniffer.drain_seconds + SLACK)
    assert sent == 7 and result.skipped == 0
    by_stack: dict[str, list[PacketRecord]] = {}
    for r in result.records:
        if r.src_address in (lab.peer_v4, lab.peer_v6, None):
            by_stack.setdefault(r.protocols, []).append(r)
    # a bad IHL and a 3-byte IPv4 header: kept with what tshark could read (no addresses)
    assert [r.src_address for r in by_stack["eth:ethertype:ip"]] == [None, None]
    truncated_tcp, = by_stack["eth:ethertype:ip:tcp"]              # 8 of 20 header bytes
    assert (truncated_tcp.transport, truncated_tcp.payload) == ("tcp", None)
    fragment, = by_stack["eth:ethertype:ip:data"]                  # non-first fragment: no ports
    assert (fragment.transport, fragment.dst_port, fragment.local_port) == ("udp", None, None)
    for stack in ("eth:ethertype:vlan:ethertype:ip:udp:data",                          # VLAN
                  "eth:ethertype:ieee8021ad:ethertype:vlan:ethertype:ip:udp:data",     # QinQ
                  "eth:ethertype:ipv6:ipv6.dstopts:udp:data"):                         # IPv6 extension header
        tagged, = by_stack[stack]
        assert (tagged.dst_port, tagged.local_port, tagged.payload) == (9, 9, 8)
    assert [r.qry_name for r in result.records if r.qry_name and r.resp_name] == [KNOWN_V4]
    store(tmp_path / "ports.db", lab.interface, result.records)[0].close()   # odd rows are storable


@pytest.mark.kernel
def test_sniffer_thread_scales_the_window_to_the_round(lab, tmp_path):
    config = SnifferConfig(window_fraction=0.5)
    thread = SnifferThread(lab.interface, config, round_seconds=4, temp_root=tmp_path / "state")
    assert thread.sniffer.window_seconds == 2.0
    began = time.monotonic()
    thread.start()
    thread.join(2 + config.drain_seconds + SLACK)
    assert not thread.is_alive() and thread.status == "ok", thread.status
    assert time.monotonic() - began < 2 + config.drain_seconds + SLACK
    assert thread.sample.window_seconds == 2.0 and thread.error is None
    assert thread.result is thread.sample.records
    assert [p.name for p in (tmp_path / "state").iterdir()] == []       # made when missing, left empty


# --------------------------------------------------------------------------------------------
# without tshark
# --------------------------------------------------------------------------------------------
def test_missing_tshark_is_a_dependency_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "tshark")
    with pytest.raises(DependencyError) as caught:
        Sniffer("lo", 1, tshark_path=missing, temp_root=tmp_path).run()
    message = str(caught.value)
    assert missing in message and "apt-get install tshark" in message and "\n" not in message
    assert caught.value.exit_code == 7
    assert list(tmp_path.iterdir()) == []            # nothing was created


def test_tshark_not_on_path(monkeypatch):
    monkeypatch.setattr("app.services.collector.sniffer.shutil.which", lambda *a, **kw: None)
    with pytest.raises(DependencyError, match="tshark is not installed"):
        find_tshark("")


def test_sniffer_thread_without_tshark_reports_no_tshark_and_warns_once(tmp_path, caplog):
    config = SnifferConfig(tshark_path=str(tmp_path / "missing-tshark"))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):                          # three rounds of one collector run
            thread = SnifferThread("lo", config, round_seconds=60, temp_root=tmp_path)
            thread.start()
            thread.join(10)
            assert not thread.is_alive()
            assert thread.status == "no-tshark"
            assert isinstance(thread.error, DependencyError) and thread.result is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tshark" in warnings[0].getMessage() and warnings[0].exc_info is None
    assert list(tmp_path.iterdir()) == []


def test_disabled_sniffer_thread():
    thread = SnifferThread("lo", SnifferConfig(enabled=False), round_seconds=60)
    thread.start()
    thread.join(5)
    assert (thread.status, thread.result) == ("disabled", None)


def test_unknown_interface_is_a_usage_error():
    from app.errors import UsageError
    with pytest.raises(UsageError, match="does not exist"):
        Sniffer("pwsn-no-such-if", 1).check()


def test_window_scales_with_the_round():
    assert window_seconds(60, 0.75) == 45
    assert window_seconds(8, 0.75) == 6
    assert window_seconds(10, 2.0) == 9.5          # never the whole round: drain and cleanup must fit
    assert window_seconds(10, -1) == 0


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
LOCAL = frozenset({"198.18.0.1", "2001:db8:18::1"})


def fields(**values) -> dict:
    return {name.replace("__", "."): (v if isinstance(v, list) else [v]) for name, v in values.items()}


def test_record_of_a_dns_response_to_this_host():
    record = record_from_fields(fields(
        frame__time_epoch="1700000000.123456789", frame__len="120", frame__protocols="eth:ethertype:ip:udp:dns",
        ip__src="198.18.0.2", ip__dst="198.18.0.1", ip__proto="17", udp__srcport="53", udp__dstport="45000",
        udp__length="86", dns__flags__response="1", dns__qry__name="a.example.test",
        dns__resp__name=["a.example.test", "a.example.test", "cdn.example.test", "<Root>"]), LOCAL)
    assert record == PacketRecord(1700000000.123456789, "eth:ethertype:ip:udp:dns", "udp", "198.18.0.2",
                                  "198.18.0.1", 53, 45000, 45000, "a.example.test",
                                  "a.example.test,cdn.example.test", None, 78, 120)


def test_record_of_outgoing_tls_client_hello_over_ipv6():
    record = record_from_fields(fields(
        frame__time_epoch="1700000000.5", frame__len="600", frame__protocols="eth:ethertype:ipv6:tcp:tls",
        ipv6__src="2001:db8:18::1", ipv6__dst="2001:db8:18::9", ipv6__nxt="6", tcp__srcport="50000",
        tcp__dstport="443", tcp__len="517", tls__handshake__extensions_server_name="www.example.test"), LOCAL)
    assert (record.transport, record.local_port, record.dst_port, record.payload, record.server_name) == \
           ("tcp", 50000, 443, 517, "www.example.test")


def test_records_of_icmp_error_fragment_and_arp():
    icmp = record_from_fields(fields(
        frame__time_epoch="1", frame__len="70", frame__protocols="eth:ethertype:ip:icmp:ip:udp:dns",
        ip__src=["198.18.0.1", "198.18.0.2"], ip__dst=["198.18.0.2", "198.18.0.1"], ip__proto=["1", "17"],
        icmp__type="3", udp__srcport="53", udp__dstport="4000", dns__qry__name="x.test"), LOCAL)
    assert (icmp.transport, icmp.src_address, icmp.local_port, icmp.src_port, icmp.qry_name, icmp.resp_name) == \
           ("icmp", "198.18.0.1", 3, None, "x.test", None)
    fragment = record_from_fields(fields(frame__time_epoch="1", frame__len="98",
                                         frame__protocols="eth:ethertype:ip:data", ip__src="198.18.0.2",
                                         ip__dst="198.18.0.1", ip__proto="17"), LOCAL)
    assert (fragment.transport, fragment.local_port, fragment.payload) == ("udp", None, None)
    arp = record_from_fields(fields(frame__time_epoch="1", frame__len="42", frame__protocols="eth:ethertype:arp"),
                             LOCAL)
    assert (arp.transport, arp.src_address, arp.local_port) == (None, None, None)


@pytest.mark.parametrize("bad", [
    {},                                                              # no time
    fields(frame__time_epoch="soon", frame__len="60"),
    fields(frame__time_epoch="1", frame__len="-3"),
    fields(frame__time_epoch="1", frame__len="60", frame__protocols="eth:ethertype:ip:tcp", tcp__srcport="http"),
    {"frame.time_epoch": [{"nested": 1}], "frame.len": ["60"]},
    ["not", "an", "object"],
])
def test_unusable_fields_raise(bad):
    with pytest.raises((ValueError, TypeError, KeyError)):
        record_from_fields(bad, LOCAL)


def test_stream_with_a_corrupt_packet_skips_and_counts_it():
    """tshark -T json framing as pyshark parses it; the middle packet is not valid JSON."""
    from packaging import version
    from pyshark.tshark.output_parser.tshark_json import TsharkJsonParser

    def packet(body: str) -> str:
        return '  {\n    "_index": "packets",\n    "_source": {\n      "layers": ' + body + '\n    }\n  }'

    good = json.dumps({"frame.time_epoch": ["1"], "frame.len": ["60"], "frame.protocols": ["eth:ethertype:arp"]})
    stream = "[\n" + ",\n".join([packet(good), packet('{"frame.len": [6'), packet(good)]) + "\n]\n"
    sniffer = Sniffer("lo", 1)
    parser = TsharkJsonParser(version.parse("4.0.17"))
    rest = b""
    for i in range(0, len(stream), 7):                  # arrives in small pieces
        rest = sniffer._take_packets(parser, rest + stream[i:i + 7].encode())
    assert (len(sniffer._records), sniffer._skipped) == (2, 1)


@pytest.mark.kernel
def test_a_failing_capture_is_an_error_and_leaves_nothing(lab, tmp_path):
    sniffer = Sniffer(lab.interface, window_seconds=5, bpf_filter="udp port nonsense", temp_root=tmp_path)
    began = time.monotonic()
    with pytest.raises(PortwatchError) as caught:
        sniffer.run()
    assert time.monotonic() - began < 5 + SLACK
    assert str(caught.value).startswith(f"capture on {lab.interface} failed: Invalid capture filter")
    assert list(tmp_path.iterdir()) == []
    assert capture_processes(lab.interface, sniffer.temp_dir) == []
