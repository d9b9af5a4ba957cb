"""The port_scan rule: a source reaching many local ports within one round or within the scan span,
one finding per scanning source that grows while the scan lasts. A pure function of the evaluation's
loaded Batch (no SQL); its ``details`` keys (stable: reports and alerts read them) are in its docstring.
"""
from __future__ import annotations

from collections import defaultdict

from app.config import Evaluator
from app.services.evaluation.batch import Batch
from app.services.evaluation.finding_sources import source
from app.services.evaluation.findings import Finding
from app.services.ports import EPHEMERAL, ephemeral_range

MAX_LISTED_PORTS = 100        # ports named in one scan finding's details
SCAN_PROBES_PER_PORT = 10     # packets to one port in one round a scan explains (nmap: 1-2 probes, retries)


def port_scans(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per scanning source over the batch: a source reaching >= scan_ports distinct local
    (port, protocol) pairs within one round (source_stats.distinct_ports) or within scan_span_seconds
    (source_ports and flows evidence united across rounds: probes, at most SCAN_PROBES_PER_PORT
    packets to a port in a round). details: rule, distinct_ports, ports_known, ports {protocol: [port,
    ...]} (first 100), port_ranges {protocol: [[low, high], ...]}, ports_truncated,
    max_ports_in_one_round, rounds [first, last], flagged_rounds, ephemeral_range [low, high],
    evaluations (how many evaluations it grew in, when more than one).

    A scan is ONE finding that grows while it lasts: when ``batch.open_scans`` holds a stored scan
    by the same source that ended within the scan span, the rounds it already holds are not counted
    again (a later round with a little traffic from that source is not a scan by the old ports), and
    new scanning grows that finding (same id, its rounds and ports widened) instead of raising another.
    """
    first, last = batch.first, batch.last
    rounds = list(batch.scan_rounds) + list(batch.rounds)
    end_of = {r["id"]: r["end_time"] for r in rounds}
    lo = rounds[0]["id"]
    open_scans: dict[str, Finding] = {}
    for row in batch.open_scans:
        stored = Finding.from_row(row)
        if stored.source and (stored.source not in open_scans
                              or stored.last_round_id > open_scans[stored.source].last_round_id):
            open_scans[stored.source] = stored
    per_round_count: dict[str, dict[int, int]] = defaultdict(dict)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"packets": 0, "syn": 0})
    for round_id, address, packets, _bytes, syn, distinct_ports in batch.source_stats:
        if not lo <= round_id <= last:
            continue
        per_round_count[address][round_id] = distinct_ports
        if round_id >= first:
            stats[address]["packets"] += packets
            stats[address]["syn"] += syn
    pairs: dict[str, dict[int, dict]] = defaultdict(lambda: defaultdict(dict))
    for round_id, address, port, protocol, packets, _bytes in batch.source_ports:
        if lo <= round_id <= last:
            pairs[address][round_id][(port, protocol)] = packets

    findings = []
    for address in sorted(set(per_round_count) | set(pairs)):
        held = open_scans.get(address)
        attributed = held.last_round_id if held is not None else lo - 1      # rounds a finding already holds
        reached = {rid: p for rid, p in pairs.get(address, {}).items() if rid > attributed}
        # what a scan is made of across rounds: probes (a few packets to a port), not a stream to one port
        by_round = {rid: probed for rid, p in reached.items()
                    if (probed := {k for k, n in p.items() if n <= SCAN_PROBES_PER_PORT})}
        counts = {rid: n for rid, n in per_round_count[address].items() if rid > attributed}
        seen_all = set().union(*by_round.values()) if by_round else set()
        if max(counts.values(), default=0) < cfg.scan_ports and len(seen_all) < cfg.scan_ports:
            continue
        flagged, ports, best = [], set(), 0
        for r in batch.rounds:
            rid = r["id"]
            in_round = counts.get(rid, 0)
            span = set(reached.get(rid, ())) if in_round >= cfg.scan_ports else set()   # a scan in one round
            for other, other_ports in by_round.items():
                if other <= rid and end_of.get(other, 0) > r["end_time"] - cfg.scan_span_seconds:
                    span |= other_ports
            count = max(in_round, len(span))
            if count >= cfg.scan_ports and (rid in by_round or in_round >= cfg.scan_ports):
                flagged.append(rid)
                ports |= span
                best = max(best, count)
        if not flagged:
            continue
        found = _scan_finding(batch, address, flagged, ports, best, counts, reached, stats.get(address, {}), cfg)
        findings.append(_grow(held, found) if held is not None else found)
    return findings


def _ranges(ports) -> list[list[int]]:
    """Sorted ports as [[low, high], ...] runs (a full 65,535-port scan is one pair)."""
    out: list[list[int]] = []
    for port in sorted(set(ports)):
        if out and port == out[-1][1] + 1:
            out[-1][1] = port
        else:
            out.append([port, port])
    return out


def _scan_finding(batch, address, flagged, ports, best, per_round_count, reached_by_round, stats, cfg) -> Finding:
    by_proto: dict[str, list[int]] = defaultdict(list)
    for port, protocol in sorted(ports):
        by_proto[protocol].append(port)
    listed = {proto: values[:MAX_LISTED_PORTS] for proto, values in by_proto.items()}
    first_round, last_round = min(flagged), max(flagged)
    low, high = ephemeral_range()
    # each scanned port is implicated in the rounds the source reached it (up to the last flagged
    # round), not the whole span: other traffic to it in other rounds is not the scan's
    reached: dict[tuple, list[int]] = {}
    for rid, round_ports in reached_by_round.items():
        if rid <= last_round:
            for key in round_ports.keys() & ports:
                span = reached.setdefault(key, [rid, rid])
                span[0], span[1] = min(span[0], rid), max(span[1], rid)
    covers = sorted((pid, lo, hi) for key, (lo, hi) in reached.items()
                    if (pid := batch.port_id(*key)) is not None)
    covers += sorted((pid, first_round, last_round) for pid in
                     {batch.port_id(EPHEMERAL, proto) for proto in by_proto} if pid is not None)
    details = {
        "rule": f">= {cfg.scan_ports} distinct local ports within one round or {cfg.scan_span_seconds:g} s",
        "distinct_ports": best, "ports_known": len(ports), "ports": listed,
        "port_ranges": {proto: _ranges(values) for proto, values in by_proto.items()},
        "ports_truncated": any(len(v) > MAX_LISTED_PORTS for v in by_proto.values()),
        "max_ports_in_one_round": max((per_round_count.get(r, 0) for r in flagged), default=0),
        "rounds": [first_round, last_round], "flagged_rounds": len(flagged),
        "ephemeral_range": [low, high],
    }
    sources = [source(batch, address, batch.first, batch.last, ports=ports, need=cfg.scan_ports, kind="scan",
                      **stats)]
    return Finding("port_scan", None, None, None, first_round, last_round, float(best), float(cfg.scan_ports),
                   source=address, sources=sources, details=details, covers=covers)


def _grow(held: Finding, new: Finding) -> Finding:
    """``held`` (a stored scan by the same source that is still going) widened by ``new``: same id."""
    from app.services.evaluation.explain import scan_ports
    ports = {(p, proto) for proto, values in scan_ports(held).items() for p in values}
    ports |= {(p, proto) for proto, values in scan_ports(new).items() for p in values}
    by_proto: dict[str, list[int]] = defaultdict(list)
    for port, protocol in sorted(ports):
        by_proto[protocol].append(port)
    d, old = dict(new.details), held.details
    d.update({
        "distinct_ports": max(int(old.get("distinct_ports", 0)), int(d["distinct_ports"])),
        "ports_known": len(ports), "ports": {p: v[:MAX_LISTED_PORTS] for p, v in by_proto.items()},
        "port_ranges": {p: _ranges(v) for p, v in by_proto.items()},
        "ports_truncated": any(len(v) > MAX_LISTED_PORTS for v in by_proto.values()),
        "max_ports_in_one_round": max(int(old.get("max_ports_in_one_round", 0)), int(d["max_ports_in_one_round"])),
        "rounds": [held.first_round_id, new.last_round_id],
        "flagged_rounds": int(old.get("flagged_rounds", 0)) + int(d["flagged_rounds"]),
        "evaluations": int(old.get("evaluations", 1)) + 1,
    })
    was = held.source_of(held.source) if held.source else None
    main = new.sources[0]
    if was is not None:
        main.packets += was.packets
        main.syn += was.syn
        main.bytes += was.bytes
    covers = sorted({tuple(c) for c in held.covers} | {tuple(c) for c in new.covers})
    return Finding("port_scan", None, None, None, held.first_round_id, new.last_round_id,
                   max(held.score or 0.0, new.score or 0.0), new.threshold, source=new.source, sources=new.sources,
                   details=d, covers=covers, id=held.id, evaluation_id=held.evaluation_id)
