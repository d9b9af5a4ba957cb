"""Labelled captures for the replay tests, written with scapy (no download): benign background plus a SYN
scan, a UDP scan, a forged-source SYN flood, a DNS tunnel-like query stream, an upload and a periodic
beacon, each with its labels row.

    labelled_capture(path, labels_path, subnet=140) -> Plan   (the host, the attackers, the capture's span)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapWriter

T0 = 1_760_000_000.0
HOST_MAC, PEER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


@dataclass
class Plan:
    host: str
    start: float
    end: float
    attackers: dict = field(default_factory=dict)     # label -> address
    benign: list = field(default_factory=list)
    labels: list = field(default_factory=list)        # (start, end, address, detector, label)
    packets: int = 0


class Writer:
    def __init__(self, path):
        self.frames: list = []
        self.path = path

    def add(self, t: float, pkt, inbound: bool) -> None:
        src, dst = (PEER_MAC, HOST_MAC) if inbound else (HOST_MAC, PEER_MAC)
        frame = Ether(src=src, dst=dst) / pkt
        frame.time = t
        self.frames.append(frame)

    def close(self) -> int:
        self.frames.sort(key=lambda f: float(f.time))
        with PcapWriter(str(self.path), linktype=1, nano=True, sync=False) as out:
            for f in self.frames:
                out.write(f)
        return len(self.frames)


def _tcp_session(w: Writer, t: float, client: str, host: str, port: int, sport: int, up: int, down: int,
                 host_is_server: bool = True) -> None:
    """A whole TCP connection: handshake, ``up`` bytes client->server, ``down`` back, FIN both ways."""
    inbound = host_is_server               # the client's packets come in when the host serves
    c, s = (client, host) if host_is_server else (host, client)
    w.add(t, IP(src=c, dst=s, ttl=64) / TCP(sport=sport, dport=port, flags="S", seq=1000), inbound)
    w.add(t + 0.001, IP(src=s, dst=c, ttl=64) / TCP(sport=port, dport=sport, flags="SA", seq=5000, ack=1001), not inbound)
    w.add(t + 0.002, IP(src=c, dst=s, ttl=64) / TCP(sport=sport, dport=port, flags="A", seq=1001, ack=5001), inbound)
    seq, at = 1001, t + 0.003
    while up > 0:
        n = min(up, 1400)
        w.add(at, IP(src=c, dst=s, ttl=64) / TCP(sport=sport, dport=port, flags="PA", seq=seq, ack=5001) / Raw(b"u" * n), inbound)
        seq, up, at = seq + n, up - n, at + 0.0005
    sent = 0
    while sent < down:
        n = min(down - sent, 1400)
        w.add(at, IP(src=s, dst=c, ttl=64) / TCP(sport=port, dport=sport, flags="PA", seq=5001 + sent, ack=seq) /
              Raw(b"d" * n), not inbound)
        sent, at = sent + n, at + 0.0005
    w.add(at + 0.001, IP(src=c, dst=s, ttl=64) / TCP(sport=sport, dport=port, flags="FA", seq=seq, ack=5001 + down), inbound)
    w.add(at + 0.002, IP(src=s, dst=c, ttl=64) / TCP(sport=port, dport=sport, flags="FA", seq=5001 + down, ack=seq + 1),
          not inbound)


def labelled_capture(path, labels_path, subnet: int = 140, minutes: int = 12, seed: int = 7) -> Plan:
    rnd = random.Random(seed)
    net = f"198.18.{subnet}"
    host = f"{net}.1"
    w = Writer(path)
    end = T0 + minutes * 60
    plan = Plan(host, T0, end)
    # benign background: two web clients, the host's own DNS lookups and NTP
    for client in (f"{net}.10", f"{net}.11"):
        plan.benign.append(client)
        t = T0 + rnd.random() * 5
        while t < end - 2:
            _tcp_session(w, t, client, host, 443, rnd.randrange(32768, 60999), rnd.randrange(200, 2000), 4000)
            t += 8 + rnd.random() * 4
    resolver = f"{net}.53"
    plan.benign.append(resolver)
    t = T0 + 1
    while t < end - 2:
        qid, sport = rnd.randrange(65536), rnd.randrange(32768, 60999)
        name = rnd.choice(["www.example.org", "mail.example.org", "updates.example.net"])
        w.add(t, IP(src=host, dst=resolver) / UDP(sport=sport, dport=53) / DNS(id=qid, rd=1, qd=DNSQR(qname=name)), False)
        w.add(t + 0.004, IP(src=resolver, dst=host) / UDP(sport=53, dport=sport) / DNS(id=qid, qr=1, qd=DNSQR(qname=name)), True)
        t += 15 + rnd.random() * 10
    # a peer asks the host's NTP server every minute (the host answers from UDP 123: a listener)
    ntp_client, t = f"{net}.12", T0 + 2
    plan.benign.append(ntp_client)
    while t < end - 2:
        w.add(t, IP(src=ntp_client, dst=host) / UDP(sport=40123, dport=123) / Raw(b"\x23" + b"\0" * 47), True)
        w.add(t + 0.001, IP(src=host, dst=ntp_client) / UDP(sport=123, dport=40123) / Raw(b"\x24" + b"\0" * 47), False)
        t += 60
    for label, start, length in (("benign", T0, end - T0),):
        for address in plan.benign:
            plan.labels.append((start, start + length, address, "", label))

    def attack(label, address, detector, start, stop):
        plan.attackers[label] = address
        plan.labels.append((start, stop, address, detector, label))

    def within(start: float) -> bool:
        return start < end - 5

    # SYN scan (minute 2): 200 ports, closed ones answered with RST; the scanner comes back at minute 8
    # (100 more ports): by then a closed loop has blocked it, and its packets are dropped
    scanner, t = f"{net}.66", T0 + 120
    for first, start in ((1, T0 + 120), (201, T0 + 480)):
        if not within(start):
            continue
        t = start
        for port in range(first, first + (200 if first == 1 else 100)):
            w.add(t, IP(src=scanner, dst=host, ttl=50) / TCP(sport=41000, dport=port, flags="S"), True)
            w.add(t + 0.0005, IP(src=host, dst=scanner) / TCP(sport=port, dport=41000, flags="RA"), False)
            t += 0.05
    if within(T0 + 120):
        attack("syn_scan", scanner, "port_scan", T0 + 120, t)
    # UDP scan (minute 4): 120 ports, each answered with ICMP port unreachable
    uscan, t = f"{net}.67", T0 + 240
    if within(t):
        for port in range(1000, 1120):
            probe = IP(src=uscan, dst=host, ttl=50) / UDP(sport=42000, dport=port) / Raw(b"x")
            w.add(t, probe, True)
            w.add(t + 0.0005, IP(src=host, dst=uscan) / ICMP(type=3, code=3) / bytes(probe)[:28], False)
            t += 0.1
        attack("udp_scan", uscan, "port_scan", T0 + 240, t)
    # forged-source SYN flood (minute 6): 600 SYNs from random addresses of one /24 to port 443 in 20 s
    flood_net, t = f"198.18.{subnet + 1}.0/24", T0 + 360
    if within(t):
        for i in range(600):
            src = f"198.18.{subnet + 1}.{rnd.randrange(1, 255)}"
            w.add(t, IP(src=src, dst=host, ttl=rnd.randrange(30, 250)) /
                  TCP(sport=rnd.randrange(1024, 65535), dport=443, flags="S", seq=rnd.randrange(1 << 32)), True)
            t += 20 / 600
        attack("syn_flood", flood_net, "syn_flood", T0 + 360, t)
    # DNS tunnel-like stream (minutes 7-9): the host sends long random TXT queries below one domain; the
    # detector names the client (this host), so the label does
    tunnel_ns, t = f"{net}.99", T0 + 420
    if within(t):
        for i in range(150):
            label1 = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(50))
            name = f"{label1}.t{i}.tunnel-example.org"
            sport, qid = rnd.randrange(32768, 60999), rnd.randrange(65536)
            w.add(t, IP(src=host, dst=tunnel_ns) / UDP(sport=sport, dport=53) /
                  DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype="TXT")), False)
            w.add(t + 0.003, IP(src=tunnel_ns, dst=host) / UDP(sport=53, dport=sport) /
                  DNS(id=qid, qr=1, rcode=3, qd=DNSQR(qname=name, qtype="TXT")), True)
            t += 0.8
        attack("dns_tunnel", host, "dns_tunnel", T0 + 420, t)
    # upload (minute 10): 3 MB from the host to one address
    sink = f"{net}.77"
    if within(T0 + 600):
        _tcp_session(w, T0 + 600, sink, host, 8443, 50123, 3_000_000, 0, host_is_server=False)
        attack("upload", sink, "exfiltration", T0 + 600, T0 + 602)
    # beacon: the host connects to one address every 30 s for the whole capture
    c2, t = f"{net}.88", T0 + 3
    while t < end - 2:
        _tcp_session(w, t, c2, host, 8080, rnd.randrange(32768, 60999), 120, 60, host_is_server=False)
        t += 30
    attack("beacon", c2, "beaconing", T0 + 3, end)
    plan.packets = w.close()
    with open(labels_path, "w") as fh:
        fh.write("start,end,address,detector,label\n")
        for row in plan.labels:
            fh.write(",".join(str(x) for x in row) + "\n")
    return plan
