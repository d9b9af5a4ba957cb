"""Rule detectors beside the model, from the first evaluation on (no training needed): port_scan
(scan_rules.py), syn_flood and source_flood (flood_rules.py), and here new_listener, process_changed,
unlistened_port — each described, with the ``details`` keys it writes (stable: reports and alerts read
them), in its function's docstring. Every detector is a pure function of the evaluation's loaded Batch
(no SQL) returning Findings whose ``covers`` cells the evaluator keeps out of the model's refit.
Per-source findings in rounds with map evictions get ``details.incomplete`` {rounds, why} (their
counts are lower bounds). :func:`detect` runs them all.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Sequence

from app.config import Evaluator
from app.services.evaluation.batch import Batch
from app.services.evaluation.finding_sources import port_sources
from app.services.evaluation.findings import Finding
from app.services.evaluation.flood_rules import source_floods, syn_floods
from app.services.evaluation.scan_rules import SCAN_PROBES_PER_PORT, port_scans
from app.services.ports import PORTED, ephemeral_range

log = logging.getLogger(__name__)

MAX_UNLISTENED_FINDINGS = 200  # per evaluation; the rest is counted in the last finding's details


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


# --- what map evictions make incomplete ------------------------------------------------------------

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
