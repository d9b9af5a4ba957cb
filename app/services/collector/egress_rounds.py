"""One round of the TC egress program's counters into SQLite, and the round's two-way peers.

Called by app/services/collector/collector.py inside the round's transaction, with the same snapshot rules
as ingress (the deltas come from rounds.diff against the last snapshot): egress_port_stats per
LOCAL (source) port, folded into the ephemeral bucket like port_stats; destination_stats per
remote address with its distinct remote (port, protocol) pairs; the top outbound flows by bytes
(plus every flow to a destination reached on many ports) as flows rows with direction 'out'.

Two-way peers (:func:`two_way_addresses`): a remote address had a two-way exchange in a round when
one of its TCP/UDP conversations was seen in BOTH directions on matching ports (ingress flow
remote:rp -> local:lp and egress flow local:lp -> remote:rp), at least one direction in this round,
and — for TCP — the remote's packets carried ACK (a forged SYN draws this host's SYN-ACK, which
alone must not make the forged address a peer; an RST-only answer does not count either).
"""
from __future__ import annotations


import numpy as np

from app.db import egress as egress_db
from app.db import peers as peers_db
from app.db import rounds as rounds_db
from app.services import ports
from app.services.collector import rounds
from app.services.kernel.bpf_structs import ADDR_DTYPE, ADDR_SIZE, addr_text, key_dtype

TCP, UDP, TCP_ACK = 6, 17, 0x10
_CONV = np.dtype([("remote", ADDR_DTYPE), ("rport", ">u2"), ("lport", ">u2"), ("proto", "u1")])


def _conversations(keys: np.ndarray, outbound: bool) -> np.ndarray:
    """(remote, remote port, local port, proto) of flow keys as one comparable 'S<n>' array."""
    conv = np.zeros(len(keys), dtype=_CONV)
    conv["remote"] = keys["dst"] if outbound else keys["src"]
    conv["rport"] = keys["dport"] if outbound else keys["sport"]
    conv["lport"] = keys["sport"] if outbound else keys["dport"]
    conv["proto"] = keys["proto"]
    return conv.view(f"S{_CONV.itemsize}")


def two_way_addresses(inbound: rounds.Delta, outbound: rounds.Delta) -> set[str]:
    """Remote addresses (text) with a two-way exchange in this round (see the module docstring)."""
    rin, rout = inbound.reading, outbound.reading
    if not rin.entries or not rout.entries:
        return set()
    in_keys = np.frombuffer(rin.raw_keys, dtype=key_dtype("flows"), count=rin.entries)
    out_keys = np.frombuffer(rout.raw_keys, dtype=key_dtype("eg_flows"), count=rout.entries)
    flags = rin.extras[:, 2].astype(np.int64) if rin.extras is not None else np.zeros(rin.entries, np.int64)
    ok_in = (in_keys["proto"] == UDP) | ((in_keys["proto"] == TCP) & ((flags & TCP_ACK) != 0))
    in_active = np.zeros(rin.entries, dtype=bool)
    in_active[inbound.index] = True
    out_active = np.zeros(rout.entries, dtype=bool)
    out_active[outbound.index] = True
    cin, cout = _conversations(in_keys, False), _conversations(out_keys, True)
    pos = rounds.match(cin, cout)
    both = ok_in & (pos >= 0)
    both &= in_active | np.where(pos >= 0, out_active[np.maximum(pos, 0)], False)
    return {addr_text(bytes(a)) for a in np.unique(in_keys["src"][both]).tolist()}


def write_egress(conn, round_id: int, deltas: dict, readings: dict, port_ids, fold, top_n: int,
                 many_threshold: int, clock_offset: float | None = None) -> None:
    """egress_port_stats, destination_stats and the outbound flows of one round.

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

    if not len(flows):
        return
    chosen = {i: "top" for i in np.argsort(-flows.values[:, 1], kind="stable")[:top_n].tolist()}
    if many:
        hit = np.isin(flows.field("dst"), np.array(sorted(many), dtype=ADDR_DTYPE))
        for i in np.flatnonzero(hit).tolist():
            chosen.setdefault(i, "many-ports")
    offset = rounds.kernel_clock_offset() if clock_offset is None else clock_offset
    rows_i = list(chosen)
    keys = flows.key_fields(rows_i)
    ext = readings["eg_flows"].extras[flows.index[rows_i]].tolist()
    out = []
    for src, sport, dst, dport, proto, (packets, bytes_), (first_ns, last_ns, flags), reason in zip(
            keys["src"].tolist(), keys["sport"].tolist(), keys["dst"].tolist(), keys["dport"].tolist(),
            keys["proto"].tolist(), flows.values[rows_i].tolist(), ext, chosen.values()):
        out.append((addr_text(src), sport, addr_text(dst), dport, ports.protocol_name(proto), packets, bytes_,
                    round(first_ns / 1e9 + offset, 3) if first_ns else None,
                    round(last_ns / 1e9 + offset, 3) if last_ns else None, flags, reason))
    rounds_db.insert_flows(conn, round_id, out, direction="out")


def record_peers(conn, round_id: int, at: float, two_way: set[str], established) -> int:
    """The round's two-way peers and the scanner's ESTABLISHED remote addresses into ``peers``."""
    if not two_way and not established:
        return 0
    return peers_db.record_two_way(conn, round_id, at, two_way, established)


assert ADDR_SIZE == _CONV.fields["remote"][0].itemsize
