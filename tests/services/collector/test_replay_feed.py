"""What a replay feeds the programs beyond plain frames: frames longer than a test run takes (fed cut, every
packet counted), and the XDP program's SYN limit, set by the closed loop, windowed and expired in capture time."""
from __future__ import annotations

import sqlite3
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from app.cli import main
from app.services.collector import replay
from app.services.kernel import enforcement, prog_run, synlimit
from tests.helpers import make_settings

pytestmark = pytest.mark.kernel

T0_NS = 1_760_000_000 * 10**9
HOST, PEER = "198.18.141.1", "198.18.141.2"
HOST_MAC, PEER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _write(path, frames) -> None:
    """A nanosecond pcap of (capture time in ns, frame) in that order: exact integer times, no float."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for t, frame in frames:
            raw = bytes(frame)
            fh.write(struct.pack("<IIII", t // 10**9, t % 10**9, len(raw), len(raw)) + raw)


def _inbound(pkt):
    return Ether(src=PEER_MAC, dst=HOST_MAC) / IP(src=PEER, dst=HOST) / pkt


def _outbound(pkt):
    return Ether(src=HOST_MAC, dst=PEER_MAC) / IP(src=HOST, dst=PEER) / pkt


def test_frames_over_a_test_run_are_fed_cut_and_every_packet_counts(tmp_path, capsys):
    syn = _inbound(TCP(sport=40000, dport=443, flags="S", seq=1))
    synack = _outbound(TCP(sport=443, dport=40000, flags="SA", seq=9, ack=2))
    jumbo_in = _inbound(TCP(sport=40000, dport=443, flags="PA", seq=2, ack=10) / Raw(b"u" * 8000))
    jumbo_out = _outbound(UDP(sport=123, dport=40001) / Raw(b"d" * 5000))
    sizes = [len(f) for f in (syn, synack, jumbo_in, jumbo_out)]
    assert sizes[2] > prog_run.MAX_FRAME and sizes[3] > prog_run.MAX_FRAME
    _write(tmp_path / "jumbo.pcap", [(T0_NS + i * 10**8, f) for i, f in enumerate((syn, synack, jumbo_in, jumbo_out))])
    db = tmp_path / "ports.db"
    (tmp_path / "c.toml").write_text(f'[general]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n')
    assert main(["replay", str(tmp_path / "jumbo.pcap"), "--db", str(db), "--config", str(tmp_path / "c.toml"),
                 "--host", HOST, "--no-sniffer"]) == 0
    out = capsys.readouterr().out
    not_counted = sizes[2] + sizes[3] - 2 * prog_run.MAX_FRAME
    assert (f"2 frames over {prog_run.MAX_FRAME} bytes fed cut to their first {prog_run.MAX_FRAME} (the most a test "
            f"run takes): packets and payload bytes exact, {not_counted} frame bytes not counted") in out
    assert "2 to the host through XDP, 2 from it through TC egress" in out
    c = sqlite3.connect(db)
    inbound = c.execute("SELECT sum(s.packets), sum(s.bytes), sum(s.payload_bytes), sum(s.syn) FROM port_stats s "
                        "JOIN ports p ON p.id = s.port_id WHERE p.value = 443 AND p.protocol = 'tcp'").fetchone()
    assert inbound == (2, sizes[0] + prog_run.MAX_FRAME, 8000, 1)      # payload from the IP header: exact
    outbound = c.execute("SELECT sum(s.packets), sum(s.bytes), sum(s.payload_bytes) FROM egress_port_stats s "
                         "JOIN ports p ON p.id = s.port_id WHERE p.value = 123 AND p.protocol = 'udp'").fetchone()
    assert outbound == (1, prog_run.MAX_FRAME, 5000)
    flows = c.execute("SELECT direction, sum(packets) FROM flows GROUP BY 1 ORDER BY 1").fetchall()
    assert sum(n for _, n in flows) == 4


def test_the_closed_loops_syn_limit_runs_in_capture_time(tmp_path):
    """8 SYNs per second of capture time to tcp/8080 for 4 rounds of 60 s; after round 1 the loop limits the
    port to 5 SYNs per second for 120 s of capture time: 3 of every second's 8 are dropped in rounds 2 and 3,
    none after the limit expires. (On the wall clock, a round's 480 SYNs would all fall in one window.)"""
    step = 125_000_000
    syns = [(T0_NS + k * step, _inbound(TCP(sport=20000 + k % 30000, dport=8080, flags="S", seq=k)))
            for k in range(4 * 60 * 8)]
    _write(tmp_path / "syns.pcap", syns)
    settings = make_settings(tmp_path)
    settings.blocklist.enabled = True
    limited = []

    def after_round(conn, s, start, now, last):
        if not limited:
            limited.append(enforcement.limit_port_syns(conn, s, 8080, 5, 120))
            (limit,) = synlimit.list_limits(replay.Path(s.general.pin_root) / replay.INTERFACE)
            assert (limit.port, limit.per_second, limit.expires_at) == (8080, 5, now + 120)

    result = replay.replay(settings, tmp_path / "syns.pcap", [HOST], round_seconds=60, after_round=after_round,
                           sniff=False)
    assert limited == [True]
    c = sqlite3.connect(settings.general.db)
    assert [r[0] for r in c.execute("SELECT syn_limited_packets FROM rounds ORDER BY id")] == [0, 180, 180, 0]
    assert result.stats.dropped == 360 and result.stats.inbound == len(syns)
    syn_counts = c.execute("SELECT sum(s.syn) FROM port_stats s JOIN ports p ON p.id = s.port_id "
                           "WHERE p.value = 8080").fetchone()[0]
    assert syn_counts == len(syns)                                       # counted before the drop
