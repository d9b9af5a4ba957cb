"""Rule detectors for what leaves the host — outbound_scan, exfiltration, beaconing: pure functions of
the loaded batch. They ALERT (none is a blocklist.rule_detectors choice; blocking a destination is the
separate egress switch). Gates, the meaning of "opened" and the stable ``details`` keys of each finding:
the README's "Outbound and DNS rules". Called by the evaluation; imports the batch and findings types.
"""
from __future__ import annotations

import logging
import statistics
from collections import defaultdict

from app.config import Evaluator
from app.services.evaluation.batch import Batch
from app.services.evaluation import warmup
from app.services.evaluation.explain import summary
from app.services.evaluation.findings import ONE_WAY, Finding, Source
from app.services.ports import EPHEMERAL, ephemeral_range

log = logging.getLogger(__name__)

MAX_LISTED = 100           # ports or addresses listed in one finding's details
TCP_SYN, TCP_ACK = 0x02, 0x10


def detect(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """Every outbound finding for the batch rounds: scans, and exfiltration and beacons once each has
    its baseline (app/services/evaluation/warmup.py: on a fresh store there is no usual rate to exceed)."""
    if not batch.rounds:
        return []
    warmups = warmup.of_batch(batch, cfg)
    findings = outbound_scans(batch, cfg)
    for w in warmup.pending(warmups):
        log.info("%s", w.text())
    if warmup.ready(warmups, "exfiltration"):
        findings += exfiltrations(batch, cfg)
    if warmup.ready(warmups, "beaconing"):
        findings += beacons(batch, cfg)
    return findings


def _said(finding: Finding) -> Finding:
    """The finding with its one line (app/services/explain.py: the same sentence on every surface)."""
    finding.summary = summary(finding)
    return finding


def _destination(address: str, **numbers) -> Source:
    return Source(address, evidence=ONE_WAY, note="destination", **numbers)


def _served_ports(batch: Batch) -> dict[int, set[tuple[int, str]]]:
    """round_id -> local (port, protocol) this host served: listening TCP, bound UDP outside the
    ephemeral range (a client's bound UDP socket is not a service)."""
    low, high = ephemeral_range()
    out: dict[int, set] = defaultdict(set)
    for round_id, port_id, _pid, _process, _established, _user, _address in batch.occupancy:
        value, protocol = batch.ports.get(port_id, (None, None))
        if value is None or value == EPHEMERAL or (protocol == "udp" and low <= value <= high):
            continue
        out[round_id].add((value, protocol))
    return out


def _holders(batch: Batch) -> dict[tuple[int, int, str], list[tuple]]:
    """(round_id, port value, protocol) -> [(pid, process)] from the scanner's occupancy."""
    out: dict[tuple, list] = defaultdict(list)
    for round_id, port_id, pid, process, _established, _user, _address in batch.occupancy:
        value, protocol = batch.ports.get(port_id, (None, None))
        if value is not None and (pid, process) not in out[(round_id, value, protocol)]:
            out[(round_id, value, protocol)].append((pid, process))
    return out


def initiated_flows(batch: Batch, first: int, last: int, *, syn_sent_only: bool = False) -> list[tuple]:
    """Outbound flow rows of rounds first..last that this host opened (see module docstring).

    syn_sent_only: a TCP flow counts only in a round where this host sent SYNs without ACK to that
    address (destination_stats.syn, batch rounds): this host's SYN-ACKs and RSTs answering someone
    else's scan leave from many local ports to many remote ports, but they open nothing."""
    served = _served_ports(batch)
    syn_sent = {(r[0], r[1]) for r in batch.destination_stats if r[4]} if syn_sent_only else None
    return [f for f in batch.outbound_flows
            if first <= f[0] <= last and (f[4], f[3]) not in served.get(f[0], ())
            and (syn_sent is None or f[3] != "tcp" or (f[0], f[1]) in syn_sent)]


def _local_covers(batch: Batch, flows: list[tuple], first: int, last: int) -> list[tuple]:
    """(port_id, first, last) cells of the local ports the flows left from (or their ephemeral bucket)."""
    ids = set()
    for f in flows:
        port_id = batch.port_id(f[4], f[3])
        ids.add(port_id if port_id is not None else batch.port_id(EPHEMERAL, f[3]))
    return [(pid, first, last) for pid in sorted(i for i in ids if i is not None)]


# --- outbound scan ---------------------------------------------------------------------------------

def outbound_scans(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per scanned remote address (many ports), plus one for a sweep of many addresses."""
    last = batch.last
    rounds = list(batch.scan_rounds) + list(batch.rounds)
    end_of = {r["id"]: r["end_time"] for r in rounds}
    lo = rounds[0]["id"]
    flows = initiated_flows(batch, lo, last, syn_sent_only=True)
    ports_by: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))   # address -> round -> ports
    for f in flows:
        ports_by[f[1]][f[0]].add((f[2], f[3]))
    counted: dict[str, dict[int, int]] = defaultdict(dict)                       # address -> round -> opened ports
    syn_to: dict[int, set[str]] = defaultdict(set)                               # round -> addresses sent SYNs
    for round_id, address, _packets, _bytes, syn, distinct in batch.destination_stats:
        if lo <= round_id <= last:
            counted[address][round_id] = min(distinct, syn)
            if syn:
                syn_to[round_id].add(address)
    findings = []
    for address in sorted(set(ports_by) | set(counted)):
        by_round = ports_by.get(address, {})
        flagged, best, ports = [], 0, set()
        for r in batch.rounds:
            rid = r["id"]
            span = set()
            for other, other_ports in by_round.items():
                if other <= rid and end_of.get(other, 0) > r["end_time"] - cfg.scan_span_seconds:
                    span |= other_ports
            count = max(counted[address].get(rid, 0), len(span))
            if count >= cfg.outbound_scan_ports and (rid in by_round or rid in counted[address]):
                flagged.append(rid)
                best = max(best, count)
                ports |= span
        if flagged:
            mine = [f for f in flows if f[1] == address and f[0] <= max(flagged)]
            findings.append(_scan_finding(batch, cfg, "ports", flagged, best, [address], ports, mine))

    # a sweep: many addresses opened within the span (flows evidence, or SYNs sent)
    opened: dict[int, set[str]] = defaultdict(set)
    for f in flows:
        opened[f[0]].add(f[1])
    for rid, addresses in syn_to.items():
        opened[rid] |= addresses
    flagged, best, swept = [], 0, set()
    for r in batch.rounds:
        span = set()
        for other, addresses in opened.items():
            if other <= r["id"] and end_of.get(other, 0) > r["end_time"] - cfg.scan_span_seconds:
                span |= addresses
        if len(span) >= cfg.outbound_scan_addresses and r["id"] in opened:
            flagged.append(r["id"])
            best = max(best, len(span))
            swept |= span
    if flagged:
        mine = [f for f in flows if f[1] in swept]
        findings.append(_scan_finding(batch, cfg, "addresses", flagged, best, sorted(swept), set(), mine))
    return findings


def _scan_finding(batch, cfg, kind, flagged, best, addresses, ports, flows) -> Finding:
    first_round, last_round = min(flagged), max(flagged)
    holders = _holders(batch)
    local = sorted({(f[4], f[3]) for f in flows})
    processes = []
    for f in flows:
        for pid, process in holders.get((f[0], f[4], f[3]), ()):
            entry = {"pid": pid, "process": process, "port": f[4], "protocol": f[3]}
            if entry not in processes:
                processes.append(entry)
    by_proto: dict[str, list[int]] = defaultdict(list)
    for port, protocol in sorted(ports):
        by_proto[protocol].append(port)
    sent = defaultdict(lambda: [0, 0, 0])
    for round_id, address, packets, nbytes, syn, _distinct in batch.destination_stats:
        if first_round <= round_id <= last_round and address in set(addresses):
            sent[address][0] += packets
            sent[address][1] += nbytes
            sent[address][2] += syn
    if kind == "ports":
        rule = f">= {cfg.outbound_scan_ports} remote ports of one address opened within {cfg.scan_span_seconds:g} s"
        threshold = cfg.outbound_scan_ports
        facts = {"destination": addresses[0], "distinct_ports": best,
                 "remote_ports": {p: v[:MAX_LISTED] for p, v in by_proto.items()}}
    else:
        rule = f">= {cfg.outbound_scan_addresses} remote addresses opened within {cfg.scan_span_seconds:g} s"
        threshold = cfg.outbound_scan_addresses
        facts = {"destination": None, "distinct_addresses": best, "destinations": addresses[:MAX_LISTED]}
    who = ", ".join(sorted({f"{p['process'] or '?'} (pid {p['pid']})" for p in processes})) or "a process the scanner did not see"
    where = addresses[0] if kind == "ports" else f"{best} addresses"
    details = {"kind": kind, "rule": rule, **facts, "local_ports": [p for p, _ in local][:MAX_LISTED],
               "processes": processes[:20], "rounds": [first_round, last_round]}
    ranked = sorted(addresses, key=lambda a: (-sent[a][1], a))[:10]
    sources = [_destination(a, packets=sent[a][0], bytes=sent[a][1], syn=sent[a][2]) for a in ranked]
    del where, who          # the sentence is explain's, from these details (one home for it)
    return _said(Finding("outbound_scan", None, None, None, first_round, last_round, float(best), float(threshold),
                   source=addresses[0] if kind == "ports" else None, sources=sources, details=details,
                   covers=_local_covers(batch, flows, first_round, last_round), source_count=len(addresses)))


# --- exfiltration ----------------------------------------------------------------------------------

def host_usual_bytes(batch: Batch) -> float:
    """The host's median outbound bytes per round over the baseline rounds BEFORE the batch (rounds
    that sent nothing count as 0); 0 without any. The batch itself is left out: a burst must not
    raise the bar it is judged against."""
    values = [nbytes for _round_id, nbytes in batch.host_out_bytes]
    values += [0] * max(0, batch.baseline_rounds - len(values))
    return float(statistics.median(values)) if values else 0.0


def exfiltrations(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per remote address whose outbound bytes (a round or the batch) exceed its usual rate."""
    first, last = batch.first, batch.last
    per_address: dict[str, dict[int, tuple[int, int]]] = defaultdict(dict)
    for round_id, address, packets, nbytes, _syn, _distinct in batch.destination_stats:
        if first <= round_id <= last:
            per_address[address][round_id] = (packets, nbytes)
    host_usual = None
    findings = []
    for address in sorted(per_address):
        rows = per_address[address]
        total = sum(b for _, b in rows.values())
        peak_round, (_, peak) = max(rows.items(), key=lambda kv: (kv[1][1], -kv[0]))
        if max(total, peak) < cfg.exfiltration_min_bytes:
            continue
        seen, base_bytes, _base_max = batch.destination_baseline.get(address, (0, 0, 0))
        if seen >= cfg.exfiltration_min_history_rounds and batch.baseline_rounds:
            usual, usual_from = base_bytes / batch.baseline_rounds, "destination"
        else:
            if host_usual is None:
                host_usual = host_usual_bytes(batch)
            usual, usual_from = host_usual, "host"
        by_round = peak >= cfg.exfiltration_min_bytes and peak >= cfg.exfiltration_factor * usual
        by_batch = total >= cfg.exfiltration_min_bytes and total >= cfg.exfiltration_factor * usual * len(rows)
        if not (by_round or by_batch):
            continue
        flagged_by = "round" if by_round else "batch"
        factor = (peak / usual if by_round else total / (usual * len(rows))) if usual > 0 else None
        lo, hi = (peak_round, peak_round) if by_round else (min(rows), max(rows))
        flows = [f for f in batch.outbound_flows if f[1] == address and lo <= f[0] <= hi]
        details = {
            "rule": f">= {cfg.exfiltration_min_bytes} bytes out to one address and >= "
                    f"{cfg.exfiltration_factor:g}x its usual rate (the host's when it has < "
                    f"{cfg.exfiltration_min_history_rounds} rounds of history)",
            "destination": address, "bytes": total, "peak_round": {"round_id": peak_round, "bytes": peak},
            "rounds": [min(rows), max(rows)], "usual_bytes_per_round": round(usual, 1), "usual_from": usual_from,
            "factor": round(factor, 1) if factor is not None else None, "flagged_by": flagged_by,
            "remote_ports": sorted({f[2] for f in flows})[:MAX_LISTED],
        }
        packets = sum(p for p, _ in rows.values())
        score = float(factor) if factor is not None else float(max(peak, total))
        findings.append(_said(Finding("exfiltration", None, None, None, min(rows), max(rows), score,
                                float(cfg.exfiltration_factor), source=address,
                                sources=[_destination(address, packets=packets, bytes=total)], details=details,
                                covers=_local_covers(batch, flows, lo, hi))))
    return findings


# --- beaconing -------------------------------------------------------------------------------------

def connection_starts(batch: Batch) -> dict[str, list[tuple[float, int, int]]]:
    """remote address -> sorted distinct connection starts [(first_seen, round_id, remote port)] of the
    outbound flows this host opened (a flow seen in several rounds keeps its first_seen: one start)."""
    flows = initiated_flows(batch, min([batch.first, *(r["id"] for r in batch.beacon_rounds[:1])]), batch.last)
    starts: dict[str, dict[tuple, tuple]] = defaultdict(dict)
    for round_id, address, port, protocol, src_port, _p, _b, first_seen, _last_seen, _flags in flows:
        if first_seen is None:
            continue
        key = (round(first_seen, 3), src_port, port, protocol)
        if key not in starts[address]:
            starts[address][key] = (float(first_seen), round_id, port)
    return {a: sorted(v.values()) for a, v in starts.items()}


def beacons(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per remote address contacted at a near-constant interval (see module docstring)."""
    ignore = set(cfg.beacon_ignore_ports)
    findings = []
    for address, starts in sorted(connection_starts(batch).items()):
        starts = [s for s in starts if s[2] not in ignore]
        if len(starts) < cfg.beacon_min_connections or not any(batch.first <= s[1] for s in starts):
            continue
        rounds_seen = len({s[1] for s in starts})
        if rounds_seen < cfg.beacon_min_rounds:
            continue
        gaps = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
        mean = statistics.fmean(gaps)
        if mean < cfg.beacon_min_interval_seconds or mean <= 0:
            continue
        cv = statistics.pstdev(gaps) / mean
        if cv > cfg.beacon_max_cv:
            continue
        lo, hi = starts[0][1], starts[-1][1]
        details = {
            "rule": f">= {cfg.beacon_min_connections} connections over >= {cfg.beacon_min_rounds} rounds, "
                    f"inter-arrival CV <= {cfg.beacon_max_cv:g}, mean >= {cfg.beacon_min_interval_seconds:g} s",
            "destination": address, "connections": len(starts), "rounds_seen": rounds_seen,
            "interval_seconds": round(mean, 3), "interval_cv": round(cv, 4),
            "remote_ports": sorted({s[2] for s in starts})[:MAX_LISTED],
            "first_seen": starts[0][0], "last_seen": starts[-1][0],
        }
        findings.append(_said(Finding("beaconing", None, None, None, lo, hi, round(cv, 6), float(cfg.beacon_max_cv),
                                source=address, sources=[_destination(address)], details=details)))
    return findings
