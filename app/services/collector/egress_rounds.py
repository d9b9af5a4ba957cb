"""One round of the TC egress program's counters into SQLite (:func:`write_egress`), and the round's
verified peers (:func:`verified_peers`, :func:`record_peers`).

Called by app/services/collector/collector.py inside the round's transaction, with the same snapshot
rules as ingress (the deltas come from rounds.diff against the last snapshot).
"""
from __future__ import annotations


import numpy as np

from app.db import egress as egress_db
from app.db import peers as peers_db
from app.services import ports
from app.services.collector import rounds
from app.services.collector import round_rows
from app.services.collector.round_rows import mac_text
from app.services.kernel.bpf_structs import PROOFS, addr_text

def verified_peers(delta: rounds.Delta, on_link=None) -> dict[str, tuple[str, int, str | None]]:
    """address -> (proof name, TTL, MAC text) of the addresses that proved themselves in this round:
    those whose proofs grew in the XDP program's ``verified`` map (a handshake acknowledging this host's
    ISN, an answer to a conversation this host opened: app/db/peers.py), with the fingerprint of the
    proving packet. Both directions of a conversation on matching ports prove nothing by themselves: a
    blind forger's PSH|ACK draws this host's RST, and a forged UDP request draws this host's answer.

    ``on_link``: the interface's on-link test (app/services/kernel/onlink.py; None: unknown). An
    off-link address's packets carry the MAC of the router that forwarded them, not its own: its MAC
    is None (its fingerprint is its TTL only)."""
    if not len(delta):
        return {}
    extras = delta.reading.extras[delta.index].tolist()
    out = {}
    for raw, (proof, ttl, mac) in zip(delta.field("addr").tolist(), extras):
        address = addr_text(raw)
        own_mac = on_link is None or address in on_link
        out[address] = (PROOFS.get(int(proof), "unknown"), int(ttl), mac_text(mac) if own_mac else None)
    return out


def write_egress(conn, round_id: int, deltas: dict, readings: dict, port_ids, fold, top_n: int,
                 many_threshold: int, clock_offset: float | None = None) -> None:
    """egress_port_stats, destination_stats and the outbound flows of one round: egress_port_stats per
    LOCAL (source) port, folded into the ephemeral bucket like port_stats; destination_stats per remote
    address with its distinct remote (port, protocol) pairs; the top outbound flows by bytes (plus every
    flow to a destination reached on many ports) as flows rows with direction 'out'.

    fold(port, protocol) -> the stored port value (the ephemeral bucket rule of port_stats);
    clock_offset: seconds from the program's clock to Unix time (None: the live kernel clock's)."""
    eg_ports, dests, dstports, flows = deltas["eg_ports"], deltas["eg_dests"], deltas["eg_dstports"], deltas["eg_flows"]
    merged: dict[tuple[int, str], list] = {}
    if len(eg_ports):
        for port, proto_number, d in zip(eg_ports.field("port").tolist(), eg_ports.field("proto").tolist(),
                                         eg_ports.values.tolist()):
            proto = ports.protocol_name(proto_number)
            row = merged.setdefault((fold(port, proto), proto), [0, 0, 0, 0])
            for i in range(4):
                row[i] += d[i]
    egress_db.insert_egress_port_stats(conn, round_id, [(port_ids(value, proto), *r)
                                                        for (value, proto), r in merged.items()])

    many: set[bytes] = set()
    rows = []
    if len(dests):
        n_ports = np.zeros(len(dests), dtype=np.int64)
        if len(dstports):
            uniq, counts = np.unique(dstports.field("src"), return_counts=True)
            pos = rounds.match(dests.field("addr"), uniq)
            n_ports = np.where(pos >= 0, counts[np.maximum(pos, 0)], 0)
        key = dests.reading.key
        for i, (packets, bytes_, syn), n in zip(dests.index.tolist(), dests.values.tolist(), n_ports.tolist()):
            rows.append((addr_text(key(i)), packets, bytes_, syn, n))
            if n >= many_threshold:
                many.add(key(i))
    rows.sort()
    egress_db.insert_destination_stats(conn, round_id, rows)

    round_rows.write_flows(conn, round_id, flows, readings["eg_flows"].extras, many, top_n, clock_offset,
                           direction="out")


def record_peers(conn, round_id: int, at: float, two_way: dict, established) -> int:
    """The round's verified peers (:func:`verified_peers`) and the scanner's ESTABLISHED remote
    addresses into ``peers``."""
    if not two_way and not established:
        return 0
    return peers_db.record_two_way(conn, round_id, at, two_way, established)

