"""Rule detectors beside the model, from the first evaluation on (no training needed): port_scan,
syn_flood, new_listener, process_changed, unlistened_port, source_flood — each described, with the
``details`` keys it writes (stable: reports and alerts read them), in its function's docstring.
Every detector is a pure function of the evaluation's loaded Batch (no SQL) returning Findings whose
``covers`` cells the evaluator keeps out of the model's refit. Per-source findings in rounds with
map evictions get ``details.incomplete`` {rounds, why} (their counts are lower bounds).
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Sequence

from app.config import Evaluator
from app.services.evaluation.batch import Batch
from app.services.evaluation.finding_sources import evidence_class, port_sources, source
from app.services.evaluation.findings import Finding, Source
from app.services.ports import EPHEMERAL, PORTED, ephemeral_range

log = logging.getLogger(__name__)

MAX_LISTED_PORTS = 100        # ports named in one scan finding's details
MAX_UNLISTENED_FINDINGS = 200  # per evaluation; the rest is counted in the last finding's details
SCAN_PROBES_PER_PORT = 10     # packets to one port in one round a scan explains (nmap: 1-2 probes, retries)


def detect(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """All rule findings for the batch rounds."""
    if not batch.rounds:
        return []
    scans = port_scans(batch, cfg)
    findings = scans + syn_floods(batch, cfg) + listener_changes(batch)
    findings += unlistened_traffic(batch, scans, cfg)
    findings += source_floods(batch, cfg)
    mark_incomplete(batch, findings)
    log.info("rules: %d finding(s) in rounds %d..%d (%s)", len(findings), batch.first, batch.last,
             ", ".join(f"{k} {v}" for k, v in Counter(f.detector for f in findings).items()) or "none")
    return findings


# --- port scan -------------------------------------------------------------------------------------

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


# --- SYN flood -------------------------------------------------------------------------------------

def completion_share(packets: int, syn: int, synack: int, rst: int) -> float:
    """Share of SYNs that look answered, 0..1.

    XDP sees ingress only, so this host's own SYN-ACKs are invisible. A client that completes the
    handshake sends at least one more packet (its ACK) per SYN, so the non-SYN, non-RST packets
    per SYN estimate the completed share; SYN-ACKs arriving on the port count as answered too.
    A flood is (almost) all SYNs: share near 0.
    """
    if syn <= 0:
        return 1.0
    return max(0.0, min(1.0, (packets - syn - rst) / syn))


def syn_floods(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per TCP port per run of consecutive flooded rounds: >= syn_flood_syns SYNs in a
    round with an answered share below syn_flood_completion (:func:`completion_share`). From >=
    flood_many_sources sources with none dominant it is judged forged (every named Source.forged,
    details.many_one_way_sources): one finding with Finding.source_count, never a blocklist full of
    random addresses. details: rule, port, protocol, rounds, flooded_rounds, syn, packets, synack,
    rst, peak {round_id, syn, completion_share}, top_syn_sources [{address, syn, share}],
    many_one_way_sources."""
    first, last = batch.first, batch.last
    order = {r["id"]: i for i, r in enumerate(batch.rounds)}
    hits: dict[int, list[tuple]] = defaultdict(list)
    for round_id, port_id, packets, _bytes, _payload, _max, syn, synack, rst in batch.port_stats:
        if first <= round_id <= last and syn >= cfg.syn_flood_syns:
            share = completion_share(packets, syn, synack, rst)
            if share < cfg.syn_flood_completion:
                hits[port_id].append((round_id, packets, syn, synack, rst, share))
    if not hits:
        return []
    syn_senders = [s for s in batch.source_stats if first <= s[0] <= last and s[4]]
    findings = []
    for port_id, rows in sorted(hits.items()):
        value, protocol = batch.ports[port_id]
        if protocol != "tcp":
            continue
        rows.sort()
        for run in _runs(rows, order):
            lo, hi = run[0][0], run[-1][0]
            syns = sum(r[2] for r in run)
            packets = sum(r[1] for r in run)
            # one-way SYN senders of the run toward this port: a sender whose ports are known (flows,
            # source_ports) counts when this port is among them; one whose ports are not (a one-SYN
            # source outside the kept flows) counts too
            talking = {a for a, seen in batch.handshakes.items() if any(lo <= r[0] <= hi for r in seen)}
            reached: dict[str, set] = defaultdict(set)
            for round_id, address, port, proto, _packets, _bytes in batch.source_ports:
                if lo <= round_id <= hi:
                    reached[address].add((port, proto))
            senders = Counter()
            for round_id, address, _packets, _bytes, syn, _distinct in syn_senders:
                if lo <= round_id <= hi and address not in talking and (
                        address not in reached or (value, protocol) in reached[address]):
                    senders[address] += syn
            top_syn = [{"address": a, "syn": n, "share": round(n / syns, 3)} for a, n in senders.most_common(5)]
            sources, dominant = port_sources(batch, value, protocol, packets, lo, hi)
            # a flood names only its own SYN senders: the port's busiest source may be a live peer
            sources = [s for s in sources if s.address in senders]
            dominant = dominant if dominant in senders else None
            if dominant is None and top_syn and top_syn[0]["share"] >= 0.5:
                dominant = top_syn[0]["address"]
            if not sources:
                sources = [Source(t["address"], syn=t["syn"], share=t["share"]) for t in top_syn]
            if dominant is not None and dominant not in {s.address for s in sources}:   # main source first
                main = top_syn[0]
                sources.insert(0, Source(dominant, syn=main["syn"], share=main["share"]))
            for s in sources:       # the flood's evidence is unanswered SYNs, whatever else a source sent
                s.evidence = evidence_class(batch, s.address, lo, hi, kind="flood")
            forged = len(senders) >= cfg.flood_many_sources and dominant is None
            if forged:
                for s in sources:
                    s.forged, s.note = True, f"one of {len(senders)} one-way sources of a SYN flood"
            peak = max(run, key=lambda r: r[2])
            details = {
                "rule": f">= {cfg.syn_flood_syns} SYNs in a round with < {cfg.syn_flood_completion:g} answered",
                "port": value, "protocol": protocol, "rounds": [lo, hi], "flooded_rounds": len(run),
                "syn": syns, "packets": packets, "synack": sum(r[3] for r in run), "rst": sum(r[4] for r in run),
                "peak": {"round_id": peak[0], "syn": peak[2], "completion_share": round(peak[5], 3)},
                "top_syn_sources": top_syn, "many_one_way_sources": forged,
            }
            summary = (f"SYN flood on tcp/{value} from {len(senders)} one-way sources (possibly forged): "
                       "mitigated per port, no source blocked") if forged else ""
            findings.append(Finding("syn_flood", port_id, value, protocol, lo, hi, float(peak[2]),
                                    float(cfg.syn_flood_syns), source=dominant, sources=sources, details=details,
                                    covers=[(port_id, lo, hi)], source_count=len(senders), summary=summary))
    return findings


def _runs(rows: list[tuple], order: dict[int, int]) -> list[list[tuple]]:
    """Split rows (round_id first, ascending) into runs of consecutive batch rounds."""
    runs: list[list[tuple]] = []
    for row in rows:
        if runs and order[row[0]] == order[runs[-1][-1][0]] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


# --- occupancy -------------------------------------------------------------------------------------

def listener_changes(batch: Batch) -> list[Finding]:
    """new_listener (a local port held for the first time since occupancy data began) and
    process_changed (its owning process name differs from its previous holder's) findings, at most
    one of each per port per batch. details: port, protocol, round_id, holders [{pid, process, user,
    address}], previous {round_id, holders} (process_changed only).

    A port is new when no earlier round held it and occupancy data existed before (the first
    round ever scanned is the baseline, never "new"). Unlistened-ephemeral UDP sockets (clients'
    bound ports) are ignored. A pid change with the same process name is a restart, not a change.
    """
    first, last = batch.first, batch.last
    baseline = batch.first_occupancy_round
    if baseline is None:
        return []
    holders: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for round_id, port_id, pid, process, _established, user, address in batch.occupancy:
        if first <= round_id <= last:
            holders[port_id][round_id].append((pid, process, user, address))
    previous = batch.previous_holders
    low, high = ephemeral_range()
    findings = []
    for port_id in sorted(holders):
        value, protocol = batch.ports[port_id]
        if protocol not in PORTED or value <= 0:
            continue
        before = previous.get(port_id)
        last_seen = (before[0], [(pid, proc, user, None) for pid, proc, user in before[1]]) if before else None
        reported = set()
        for round_id in sorted(holders[port_id]):
            now = holders[port_id][round_id]
            if last_seen is None:
                if round_id > baseline and "new_listener" not in reported and not (
                        protocol == "udp" and low <= value <= high):
                    findings.append(_listener_finding("new_listener", port_id, value, protocol, round_id, now, None))
                    reported.add("new_listener")
            else:
                names_now = {h[1] for h in now}
                names_before = {h[1] for h in last_seen[1]}
                if None not in names_now and None not in names_before and names_now != names_before \
                        and "process_changed" not in reported:
                    findings.append(_listener_finding("process_changed", port_id, value, protocol, round_id,
                                                      now, last_seen))
                    reported.add("process_changed")
            last_seen = (round_id, now)
    return findings


def _holder(h) -> dict:
    pid, process, user, address = h
    return {k: v for k, v in (("pid", pid), ("process", process), ("user", user), ("address", address)) if v is not None}


def _listener_finding(detector, port_id, value, protocol, round_id, now, before) -> Finding:
    details = {"port": value, "protocol": protocol, "round_id": round_id, "holders": [_holder(h) for h in now]}
    if before is not None:
        details["previous"] = {"round_id": before[0], "holders": [_holder(h) for h in before[1]]}
    return Finding(detector, port_id, value, protocol, round_id, round_id, None, None, details=details,
                   covers=[(port_id, round_id, round_id)])


# --- traffic to unlistened ports -------------------------------------------------------------------

def unlistened_traffic(batch: Batch, scans: Sequence[Finding], cfg: Evaluator) -> list[Finding]:
    """One finding per TCP/UDP port that received traffic in batch rounds where nothing held it (never
    the ephemeral bucket -1, port 0 or ICMP types). details: port, protocol, rounds, unlistened_rounds,
    packets, bytes, syn, more_ports_not_reported (on the last one, when capped).

    Only rounds with scanner data count (no occupancy rows: nothing is known). Rounds where a
    flagged scan touched the port are left to that finding.
    """
    first, last = batch.first, batch.last
    occ = [row for row in batch.occupancy if first <= row[0] <= last]
    scanned_rounds = {row[0] for row in occ}
    held = {(row[0], row[1]) for row in occ}
    covered = {(pid, lo, hi) for f in scans for pid, lo, hi in f.covers}
    stats = [r for r in batch.port_stats
             if first <= r[0] <= last and r[0] in scanned_rounds and (r[0], r[1]) not in held]
    if not stats:
        return []
    per_port: dict[int, list[tuple]] = defaultdict(list)
    for row in stats:
        value, protocol = batch.ports[row[1]]
        if protocol not in PORTED or value <= 0:
            continue
        if row[2] <= SCAN_PROBES_PER_PORT and any(pid == row[1] and lo <= row[0] <= hi for pid, lo, hi in covered):
            continue            # the scan's probes; more than that to the port in the round is other traffic
        per_port[row[1]].append(row)
    findings, skipped = [], 0
    for port_id, rows in sorted(per_port.items(), key=lambda kv: -sum(r[2] for r in kv[1])):
        packets = sum(r[2] for r in rows)
        if packets < cfg.unlistened_min_packets:
            continue
        if len(findings) >= MAX_UNLISTENED_FINDINGS:
            skipped += 1
            continue
        value, protocol = batch.ports[port_id]
        lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
        sources, dominant = port_sources(batch, value, protocol, packets, lo, hi)
        details = {"port": value, "protocol": protocol, "rounds": [lo, hi], "unlistened_rounds": len(rows),
                   "packets": packets, "bytes": sum(r[3] for r in rows), "syn": sum(r[6] for r in rows)}
        findings.append(Finding("unlistened_port", port_id, value, protocol, lo, hi, float(packets),
                                float(cfg.unlistened_min_packets), source=dominant, sources=sources,
                                details=details, covers=[(port_id, lo, hi)]))
    if skipped and findings:
        findings[-1].details["more_ports_not_reported"] = skipped
    return findings


# --- floods of new sources, and what map evictions make incomplete ------------------------------------

def source_floods(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One source_flood finding per run of consecutive batch rounds with >= source_flood_new_sources
    new sources or any source-map eviction (nothing when the rounds do not record those counts): a
    flood of new (typically forged) sources could hide a scanner. details: rule, rounds [first, last],
    per_round [{round_id, new_sources, source_evictions, srcport_evictions}]."""
    hits = []
    for r in batch.rounds:
        counts = batch.round_counts.get(r["id"], {})
        if counts.get("new_sources", 0) >= cfg.source_flood_new_sources or counts.get("source_evictions", 0) > 0:
            hits.append((r["id"], counts))
    order = {r["id"]: i for i, r in enumerate(batch.rounds)}
    findings = []
    for run in _runs(hits, order):
        lo, hi = run[0][0], run[-1][0]
        new = [c.get("new_sources", 0) for _, c in run]
        details = {"rule": f">= {cfg.source_flood_new_sources} new sources in a round, or any source-map eviction",
                   "rounds": [lo, hi],
                   "per_round": [{"round_id": rid, **{k: c.get(k, 0) for k in ("new_sources", "source_evictions",
                                                                               "srcport_evictions")}}
                                 for rid, c in run][:60]}
        findings.append(Finding("source_flood", None, None, None, lo, hi, float(max(new)),
                                float(cfg.source_flood_new_sources), details=details, source_count=sum(new),
                                covers=[(None, lo, hi)],
                                summary=f"flood of {sum(new)} new sources in rounds {lo}..{hi}: per-source "
                                        "counts there may be incomplete"))
    return findings


def mark_incomplete(batch: Batch, findings: Sequence[Finding]) -> None:
    """Give every finding that names sources and overlaps a round with source or (source, port) map
    evictions ``details['incomplete']``: its per-source counts there are lower bounds."""
    evicted = sorted(rid for rid, c in batch.round_counts.items()
                     if c.get("source_evictions", 0) > 0 or c.get("srcport_evictions", 0) > 0)
    if not evicted:
        return
    for f in findings:
        hit = [rid for rid in evicted if f.first_round_id <= rid <= f.last_round_id]
        if hit and (f.sources or f.source) and "incomplete" not in f.details:
            f.details["incomplete"] = {"rounds": hit[:60], "why": "source-map evictions in these rounds: "
                                       "per-source counts are lower bounds, a source may be missing"}
