"""Reading captures as arrays (pcap, pcapng, raw IP), the host and listener inference, no kernel needed."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import EDecimal
from scapy.utils import PcapNgWriter, PcapWriter

from app.errors import UsageError
from app.services.collector import capture_file

HOST, PEER, OTHER = "198.18.140.1", "198.18.140.2", "198.18.140.3"


def frames():
    out = []
    for i, (pkt) in enumerate([
            IP(src=PEER, dst=HOST) / TCP(sport=40000, dport=22, flags="S"),
            IP(src=HOST, dst=PEER) / TCP(sport=22, dport=40000, flags="SA"),
            IP(src=HOST, dst=OTHER) / UDP(sport=45000, dport=53) / Raw(b"q"),     # the host's own query
            IP(src=OTHER, dst=HOST) / UDP(sport=53, dport=45000) / Raw(b"a"),     # its answer: no listener
            IP(src=OTHER, dst=HOST) / UDP(sport=40123, dport=123) / Raw(b"n"),    # asked the host's NTP ...
            IP(src=HOST, dst=OTHER) / UDP(sport=123, dport=40123) / Raw(b"r"),    # ... which answered
    ]):
        f = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / pkt
        f.time = EDecimal(1_760_000_000) + EDecimal(i) / 2 + EDecimal("0.000000123")
        out.append(f)
    return out


def write(path, writer=PcapWriter, **kw):
    with writer(str(path), **kw) as w:
        for f in frames():
            w.write(f)
    return path


def test_pcap_and_pcapng_read_the_same(tmp_path):
    a = capture_file.read(write(tmp_path / "a.pcap", nano=True, linktype=1))
    b = capture_file.read(write(tmp_path / "b.pcapng", PcapNgWriter))
    assert len(a) == len(b) == 6
    assert a.lengths.tolist() == b.lengths.tolist() == [len(f) for f in frames()]
    for i in range(6):
        assert bytes(a.buffer[a.offsets[i]:a.offsets[i] + a.lengths[i]]) == bytes(frames()[i])
        assert bytes(b.buffer[b.offsets[i]:b.offsets[i] + b.lengths[i]]) == bytes(frames()[i])
    assert a.ts_ns[0] == 1_760_000_000_000_000_123          # nanoseconds kept
    assert abs(int(b.ts_ns[1]) - 1_760_000_000_500_000_000) < 1000    # pcapng: microseconds


def test_raw_ip_captures_get_an_ethernet_header(tmp_path):
    path = tmp_path / "raw.pcap"
    with PcapWriter(str(path), linktype=101) as w:
        for f in frames():
            w.write(f[IP])
    cap = capture_file.read(path)
    h = capture_file.headers(cap)
    assert (h.ip == 4).all() and h.dport.tolist() == [22, 40000, 53, 45000, 123, 40123]
    assert cap.lengths.tolist() == [len(f) for f in frames()]           # 14 bytes of Ethernet each


def test_host_and_listeners_are_inferred(tmp_path):
    cap = capture_file.read(write(tmp_path / "a.pcap", nano=True, linktype=1))
    h = capture_file.headers(cap)
    assert capture_file.most_answered(h, cap.ts_ns) == HOST
    outbound = h.src == capture_file.address_key(HOST)
    listeners = capture_file.inferred_listeners(h, cap.ts_ns, outbound)
    assert [(p, proto, a) for p, proto, a, _ in listeners] == [(22, "tcp", HOST), (123, "udp", HOST)]
    assert listeners[0][3] == cap.ts_ns[1]


def test_not_a_capture_is_one_sentence(tmp_path):
    (tmp_path / "x.pcap").write_text("hello, this is text")
    with pytest.raises(UsageError, match="neither a pcap nor a pcapng"):
        capture_file.read(tmp_path / "x.pcap")
    with pytest.raises(UsageError, match="cannot read the capture"):
        capture_file.read(tmp_path / "missing.pcap")
    np.testing.assert_equal(capture_file.read(write(tmp_path / "a.pcap")).lengths > 0, True)
