"""One round's ingress rows, from the differences of the pinned maps (app/services/collector/collector.py
reads the maps and owns the transaction; app/services/collector/egress_rounds.py writes the egress rows).

port_stats with ephemeral ports folded per protocol, source_stats and source_ports, the chosen
flows of both directions (egress_rounds calls write_flows too), blacklist drops. Field access by name
through the mirrors of bpf/common.h (bpf_structs).
"""
from __future__ import annotations

import numpy as np

from app.db import rounds as rounds_db
from app.services import ports
from app.services.collector import rounds
from app.services.kernel.bpf_structs import ADDR_DTYPE, addr_text, lpm_key_text


def write_ports(conn, round_id: int, delta: rounds.Delta, extras, port_ids, listening, low, high, fold) -> int:
    """port_stats rows, the ephemeral ports folded per protocol. Returns the number of rows."""
    merged: dict[tuple[int, str], list] = {}
    ext = extras[delta.index].tolist() if len(delta) else []
    port_list = delta.field("port").tolist() if len(delta) else []
    proto_list = delta.field("proto").tolist() if len(delta) else []
    for port, proto_number, d, (rmin, rmax) in zip(port_list, proto_list, delta.values.tolist(), ext):
        proto = ports.protocol_name(proto_number)
        value = ports.fold_port(port, proto, listening, low, high, fold)
        rmin = None if rmin == rounds.U32_MAX else rmin
        rmax = None if rmin is None else rmax
        row = merged.get((value, proto))
        if row is None:
            merged[(value, proto)] = [*d, rmin, rmax]
            continue
        for i in range(7):
            row[i] += d[i]
        if rmin is not None:
            row[7] = rmin if row[7] is None else min(row[7], rmin)
            row[8] = rmax if row[8] is None else max(row[8], rmax)
    # (port_id, packets, bytes, payload_bytes, min_payload, max_payload, syn, synack, rst, fin)
    rows = [(port_ids(value, proto), r[0], r[1], r[2], r[7], r[8], r[3], r[4], r[5], r[6])
            for (value, proto), r in merged.items()]
    rounds_db.insert_port_stats(conn, round_id, rows)
    return len(rows)


def write_sources(conn, round_id: int, sources: rounds.Delta, extras, srcports: rounds.Delta,
                  threshold: int, scanners: rounds.Delta | None = None) -> set[bytes]:
    """source_stats rows (with distinct ports, fragments, the round's TTL range) and source_ports for
    many-port sources (``threshold`` distinct ports or more). Returns the raw addresses of the sources
    that reached many ports. ``scanners``: the round's delta of the non-evicting ``scanners`` map: a
    promoted source's distinct ports are at least its count there, and a scanner whose ``sources``
    entry a flood evicted still gets its row (packets and SYNs since its promotion)."""
    # distinct (port, protocol) pairs per source, vectorised over the srcport keys' "src" field
    n_ports = np.zeros(len(sources), dtype=np.int64)
    src_of_pair = srcports.field("src") if len(srcports) else None
    if src_of_pair is not None and len(sources):
        uniq, counts = np.unique(src_of_pair, return_counts=True)
        pos = rounds.match(sources.field("addr"), uniq)
        n_ports = np.where(pos >= 0, counts[np.maximum(pos, 0)], 0)
    key = sources.reading.key          # a sources key is one struct pw_addr
    ttl = extras[sources.index].tolist() if len(sources) else []
    rows = [(addr_text(key(i)), packets, bytes_, syn, n, frags, None if lo == rounds.U32_MAX else lo,
             None if lo == rounds.U32_MAX else hi, mac_text(mac, mixed))
            for i, (packets, bytes_, syn, frags), n, (lo, hi, mac, mixed) in
            zip(sources.index.tolist(), sources.values.tolist(), n_ports.tolist(), ttl)]
    many = {key(i) for i, n in zip(sources.index.tolist(), n_ports.tolist()) if n >= threshold}
    _merge_scanners(rows, many, scanners, threshold)
    detail = []
    if many and src_of_pair is not None:
        hit = np.flatnonzero(np.isin(src_of_pair, np.array(sorted(many), dtype=ADDR_DTYPE)))
        pairs = srcports.key_fields(hit)
        for src, port, proto, (n,) in zip(pairs["src"].tolist(), pairs["port"].tolist(), pairs["proto"].tolist(),
                                         srcports.values[hit].tolist()):
            detail.append((addr_text(src), port, ports.protocol_name(proto), n))
    rows.sort()   # in address order: far cheaper inserts into the (address, round_id) index
    rounds_db.insert_source_stats(conn, round_id, rows)
    rounds_db.insert_source_ports(conn, round_id, detail)
    return many


def _merge_scanners(rows: list, many: set[bytes], scanners: rounds.Delta | None, threshold: int) -> None:
    """Fold the scanners delta into the source_stats rows (see write_sources), in place."""
    if scanners is None or not len(scanners):
        return
    at = {row[0]: i for i, row in enumerate(rows)}
    for raw, (n_ports, packets, syn) in zip(scanners.keys, scanners.values.tolist()):
        address = addr_text(raw)
        if n_ports >= threshold:
            many.add(raw)
        if address in at:
            row = rows[at[address]]
            rows[at[address]] = (*row[:4], max(row[4], n_ports), *row[5:])
        elif n_ports:
            rows.append((address, packets, 0, syn, n_ports, 0, None, None, None))


def mac_text(mac: int, mixed: int = 0) -> str | None:
    """'02:00:00:00:00:02' for a 48-bit MAC, 'mixed' when several came under one address, None for 0."""
    if mixed:
        return "mixed"
    return ":".join(f"{b:02x}" for b in int(mac).to_bytes(6, "big")) if mac else None


def idle_scanners(scanners: rounds.Delta) -> list[bytes]:
    """Keys of the scanners map that did not move this round: removed so the map keeps room."""
    moved = set(scanners.index.tolist())
    return [scanners.reading.key(i) for i in range(scanners.reading.entries) if i not in moved]


def write_flows(conn, round_id: int, flows: rounds.Delta, extras, many: set[bytes], top_n: int,
                clock_offset: float | None = None, direction: str = "in") -> None:
    """The ``top_n`` flows by bytes, plus every flow of a remote address in ``many`` (one that reached
    many ports: the source of an ingress flow, the destination of an egress one), as flows rows.

    The one flow-row builder of both programs: ``direction`` 'in' (XDP ingress) or 'out' (TC egress);
    clock_offset: seconds from the program's clock to Unix time (None: the live kernel clock's)."""
    if not len(flows):
        return
    by_bytes = flows.values[:, 1]
    top = np.argsort(-by_bytes, kind="stable")[:top_n].tolist()
    chosen = {i: "top" for i in top}
    if many:
        remote = flows.field("src" if direction == "in" else "dst")
        hit = np.isin(remote, np.array(sorted(many), dtype=ADDR_DTYPE))
        for i in np.flatnonzero(hit).tolist():
            chosen.setdefault(i, "many-ports")
    offset = rounds.kernel_clock_offset() if clock_offset is None else clock_offset
    rows_i = list(chosen)
    keys = flows.key_fields(rows_i)
    ext = extras[flows.index[rows_i]].tolist()
    rows = []
    for src, sport, dst, dport, proto, (packets, bytes_), (first_ns, last_ns, flags), reason in zip(
            keys["src"].tolist(), keys["sport"].tolist(), keys["dst"].tolist(), keys["dport"].tolist(),
            keys["proto"].tolist(), flows.values[rows_i].tolist(), ext, chosen.values()):
        rows.append((addr_text(src), sport, addr_text(dst), dport, ports.protocol_name(proto), packets, bytes_,
                     round(first_ns / 1e9 + offset, 3) if first_ns else None,
                     round(last_ns / 1e9 + offset, 3) if last_ns else None, flags, reason))
    rounds_db.insert_flows(conn, round_id, rows, direction)


def write_blacklist_drops(conn, round_id: int, delta: rounds.Delta) -> None:
    """Per blacklist entry, the packets it dropped and the answers it passed in the round."""
    rows = [(lpm_key_text(key), d[0], d[2]) for key, d in zip(delta.keys, delta.values.tolist()) if d[0] or d[2]]
    rounds_db.insert_blacklist_drops(conn, round_id, rows)
