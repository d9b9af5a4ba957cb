"""Two-way exchanges from ingress and egress flow readings (no kernel): matching ports both ways, the
remote's ACK for TCP, activity in this round."""
from __future__ import annotations

import numpy as np

from app.services.collector import egress_rounds, rounds
from app.services.kernel.bpf_structs import PwAddr, PwFlowKey, addr_bytes

TCP, UDP = 6, 17


def flow(src, sport, dst, dport, proto) -> bytes:
    return bytes(PwFlowKey(src=PwAddr.from_buffer_copy(addr_bytes(src)), dst=PwAddr.from_buffer_copy(addr_bytes(dst)),
                           sport=sport, dport=dport, proto=proto))


def reading(name, keys_flags, packets):
    keys = b"".join(k for k, _ in keys_flags)
    counters = np.array([[p, 100 * p] for p in packets], dtype=np.uint64).reshape(len(packets), 2)
    extras = np.array([[1, 2, f] for _, f in keys_flags], dtype=np.uint64).reshape(len(packets), 3)
    return rounds.MapReading(name, keys, len(keys_flags[0][0]), counters, extras)


def test_two_way_needs_both_directions_matching_ports_and_the_remotes_ack():
    me = "198.18.0.1"
    inbound = reading("flows", [
        (flow("198.18.0.2", 5000, me, 53, UDP), 0),          # UDP request ...
        (flow("198.18.0.3", 40000, me, 80, TCP), 0x02),      # forged SYN: this host answered SYN-ACK
        (flow("198.18.0.4", 41000, me, 22, TCP), 0x18),      # a real TCP conversation (ACK, PSH)
        (flow("198.18.0.5", 5000, me, 53, UDP), 0),          # ... answered from another port: no match
        (flow("::ffff:198.18.0.6", 5000, me, 53, UDP), 0),   # IPv6 peer, answered over IPv4: not the same
    ], [3, 1, 5, 2, 1])
    outbound = reading("eg_flows", [
        (flow(me, 53, "198.18.0.2", 5000, UDP), 0),
        (flow(me, 80, "198.18.0.3", 40000, TCP), 0x12),
        (flow(me, 22, "198.18.0.4", 41000, TCP), 0x18),
        (flow(me, 54, "198.18.0.5", 5000, UDP), 0),
        (flow(me, 53, "198.18.0.6", 5000, UDP), 0),
    ], [3, 1, 4, 2, 1])
    d_in, d_out = rounds.diff(inbound, rounds.empty("flows")), rounds.diff(outbound, rounds.empty("eg_flows"))
    assert egress_rounds.two_way_addresses(d_in, d_out) == {"198.18.0.2", "198.18.0.4"}
    # nothing new in either direction this round: no two-way exchange IN this round
    assert egress_rounds.two_way_addresses(rounds.diff(inbound, inbound), rounds.diff(outbound, outbound)) == set()
    # only the answer is new (the request was counted last round): still this round's exchange
    assert egress_rounds.two_way_addresses(rounds.diff(inbound, inbound), d_out) == {"198.18.0.2", "198.18.0.4"}
