"""Rule detectors that run beside the model, from the first evaluation on (no training needed).

  port_scan       a source reaching >= scan_ports distinct local (port, protocol) pairs within one
                  round (source_stats.distinct_ports) or within scan_span_seconds (source_ports and
                  flows evidence united across rounds)
  syn_flood       >= syn_flood_syns SYNs to one TCP port in a round, with an answered share below
                  syn_flood_completion (see :func:`completion_share`)
  new_listener    a local port held for the first time since occupancy data began
  process_changed a local port whose owning process name differs from its previous holder's
  unlistened_port traffic to a TCP/UDP port nothing held in that round (never the ephemeral bucket
                  -1, port 0 or ICMP types; ports a flagged scan touched are left to that finding)

Each :class:`Finding` carries ``reasons`` (JSON-ready, naming sources and ports) and ``covers``:
the (port_id, first_round_id, last_round_id) cells it implicates, which the evaluator keeps out of
the model's refit.
"""
from __future__ import annotations

import logging
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from app.config import Evaluator
from app.db import series as db
from app.services.ports import EPHEMERAL, PORTED, ephemeral_range

log = logging.getLogger(__name__)

MAX_LISTED_PORTS = 100        # ports named in one scan finding's reasons
MAX_UNLISTENED_FINDINGS = 200  # per evaluation; the rest is counted in the last finding's reasons


@dataclass
class Finding:
    """One anomaly before it is stored (rules and model alike).

    port_id/port/protocol: the local port, None for findings spanning many ports (port_scan).
    score/threshold: in the detector's units (SYNs per round, distinct ports, window error ...).
    source: the main source address when one is responsible, else None.
    """

    detector: str
    port_id: int | None
    port: int | None
    protocol: str | None
    first_round_id: int
    last_round_id: int
    score: float | None
    threshold: float | None
    source: str | None
    reasons: dict
    covers: list = field(default_factory=list)   # [(port_id | None, first_round_id, last_round_id)]

    @property
    def sources(self) -> list[str]:
        """Addresses the reasons name, main source first."""
        named = [s["address"] for s in self.reasons.get("sources", []) if "address" in s]
        if self.source and self.source not in named:
            named.insert(0, self.source)
        return named


def detect(conn: sqlite3.Connection, batch: Sequence[sqlite3.Row], cfg: Evaluator) -> list[Finding]:
    """All rule findings for the batch rounds (rows with id, end_time, seconds, scanner_status)."""
    if not batch:
        return []
    scans = port_scans(conn, batch, cfg)
    findings = scans + syn_floods(conn, batch, cfg) + listener_changes(conn, batch)
    findings += unlistened_traffic(conn, batch, scans, cfg)
    log.info("rules: %d finding(s) in rounds %d..%d (%s)", len(findings), batch[0]["id"], batch[-1]["id"],
             ", ".join(f"{k} {v}" for k, v in Counter(f.detector for f in findings).items()) or "none")
    return findings


# --- sources ---------------------------------------------------------------------------------------

def port_sources(conn: sqlite3.Connection, value: int, protocol: str, port_packets: int,
                 first: int, last: int, limit: int = 5) -> tuple[list[dict], str | None]:
    """Top sources of one local port over rounds first..last and the dominant one.

    Returns ([{address, packets, bytes, share}], dominant address or None). share = packets /
    port_packets; a source dominates with share >= 0.5. The ephemeral bucket has no per-source
    evidence (its real ports are many) and gets no sources.
    """
    if value == EPHEMERAL:
        return [], None
    rows = db.top_sources(conn, value, protocol, first, last, limit)
    out = [{"address": a, "packets": int(p), "bytes": int(b),
            "share": round(p / port_packets, 3) if port_packets else None} for a, p, b in rows]
    dominant = out[0]["address"] if out and out[0]["share"] is not None and out[0]["share"] >= 0.5 else None
    return out, dominant


# --- port scan -------------------------------------------------------------------------------------

def port_scans(conn: sqlite3.Connection, batch: Sequence[sqlite3.Row], cfg: Evaluator) -> list[Finding]:
    """One finding per scanning source over the batch (see module docstring)."""
    first, last = batch[0]["id"], batch[-1]["id"]
    earlier = db.rounds_since(conn, batch[0]["end_time"] - cfg.scan_span_seconds, first)
    rounds = list(earlier) + list(batch)
    end_of = {r["id"]: r["end_time"] for r in rounds}
    lo = rounds[0]["id"]
    per_round_count: dict[str, dict[int, int]] = defaultdict(dict)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"packets": 0, "syn": 0})
    for row in db.source_stats(conn, lo, last):
        per_round_count[row["address"]][row["round_id"]] = row["distinct_ports"]
        if row["round_id"] >= first:
            stats[row["address"]]["packets"] += row["packets"]
            stats[row["address"]]["syn"] += row["syn"]
    pairs: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for round_id, address, port, protocol, _packets in db.source_port_pairs(conn, lo, last):
        pairs[address][round_id].add((port, protocol))

    findings = []
    for address in sorted(set(per_round_count) | set(pairs)):
        by_round = pairs.get(address, {})
        seen_all = set().union(*by_round.values()) if by_round else set()
        if max(per_round_count[address].values(), default=0) < cfg.scan_ports and len(seen_all) < cfg.scan_ports:
            continue
        flagged, ports, best = [], set(), 0
        for r in batch:
            rid = r["id"]
            in_round = per_round_count[address].get(rid, 0)
            span = set()
            for other, other_ports in by_round.items():
                if other <= rid and end_of.get(other, 0) > r["end_time"] - cfg.scan_span_seconds:
                    span |= other_ports
            count = max(in_round, len(span))
            if count >= cfg.scan_ports and (in_round or rid in by_round):
                flagged.append(rid)
                ports |= span
                best = max(best, count)
        if not flagged:
            continue
        findings.append(_scan_finding(conn, address, flagged, ports, best, per_round_count[address],
                                      stats.get(address, {}), cfg))
    return findings


def _scan_finding(conn, address, flagged, ports, best, per_round_count, stats, cfg) -> Finding:
    by_proto: dict[str, list[int]] = defaultdict(list)
    for port, protocol in sorted(ports):
        by_proto[protocol].append(port)
    listed = {proto: values[:MAX_LISTED_PORTS] for proto, values in by_proto.items()}
    first_round, last_round = min(flagged), max(flagged)
    covers = []
    low, high = ephemeral_range()
    ids = _port_ids(conn, {(p, proto) for p, proto in ports} | {(EPHEMERAL, proto) for proto in by_proto})
    for (port, protocol), port_id in ids.items():
        covers.append((port_id, first_round, last_round))
    reasons = {
        "rule": f">= {cfg.scan_ports} distinct local ports within one round or {cfg.scan_span_seconds:g} s",
        "source": address, "sources": [{"address": address, **stats}],
        "distinct_ports": best, "ports_known": len(ports), "ports": listed,
        "ports_truncated": any(len(v) > MAX_LISTED_PORTS for v in by_proto.values()),
        "max_ports_in_one_round": max((per_round_count.get(r, 0) for r in flagged), default=0),
        "rounds": [first_round, last_round], "flagged_rounds": len(flagged),
        "ephemeral_range": [low, high],
    }
    return Finding("port_scan", None, None, None, first_round, last_round, float(best),
                   float(cfg.scan_ports), address, reasons, covers)


def _port_ids(conn: sqlite3.Connection, keys: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """(value, protocol) -> ports.id for the keys that have a row."""
    if not keys:
        return {}
    wanted = set(keys)
    values = sorted({v for v, _ in keys})
    found = {}
    for port_id, (value, protocol) in db.ports_by_value(conn, values).items():
        if (value, protocol) in wanted:
            found[(value, protocol)] = port_id
    return found


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


def syn_floods(conn: sqlite3.Connection, batch: Sequence[sqlite3.Row], cfg: Evaluator) -> list[Finding]:
    """One finding per TCP port per run of consecutive flooded rounds."""
    first, last = batch[0]["id"], batch[-1]["id"]
    order = {r["id"]: i for i, r in enumerate(batch)}
    hits: dict[int, list[tuple]] = defaultdict(list)
    for round_id, port_id, packets, _bytes, _payload, _max, syn, synack, rst in db.port_stats(conn, first, last):
        if syn >= cfg.syn_flood_syns:
            share = completion_share(packets, syn, synack, rst)
            if share < cfg.syn_flood_completion:
                hits[port_id].append((round_id, packets, syn, synack, rst, share))
    if not hits:
        return []
    names = db.ports_by_id(conn, hits)
    syn_senders = db.source_stats(conn, first, last)
    findings = []
    for port_id, rows in sorted(hits.items()):
        value, protocol = names[port_id]
        if protocol != "tcp":
            continue
        rows.sort()
        for run in _runs(rows, order):
            lo, hi = run[0][0], run[-1][0]
            syns = sum(r[2] for r in run)
            packets = sum(r[1] for r in run)
            senders = Counter()
            for s in syn_senders:
                if lo <= s["round_id"] <= hi and s["syn"]:
                    senders[s["address"]] += s["syn"]
            top_syn = [{"address": a, "syn": n, "share": round(n / syns, 3)} for a, n in senders.most_common(5)]
            sources, dominant = port_sources(conn, value, protocol, packets, lo, hi)
            if dominant is None and top_syn and top_syn[0]["share"] >= 0.5:
                dominant = top_syn[0]["address"]
            peak = max(run, key=lambda r: r[2])
            reasons = {
                "rule": f">= {cfg.syn_flood_syns} SYNs in a round with < {cfg.syn_flood_completion:g} answered",
                "port": value, "protocol": protocol, "rounds": [lo, hi], "flooded_rounds": len(run),
                "syn": syns, "packets": packets, "synack": sum(r[3] for r in run), "rst": sum(r[4] for r in run),
                "peak": {"round_id": peak[0], "syn": peak[2], "completion_share": round(peak[5], 3)},
                "sources": sources or top_syn, "top_syn_sources": top_syn,
            }
            findings.append(Finding("syn_flood", port_id, value, protocol, lo, hi, float(peak[2]),
                                    float(cfg.syn_flood_syns), dominant, reasons, [(port_id, lo, hi)]))
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

def listener_changes(conn: sqlite3.Connection, batch: Sequence[sqlite3.Row]) -> list[Finding]:
    """new_listener and process_changed findings, at most one of each per port per batch.

    A port is new when no earlier round held it and occupancy data existed before (the first
    round ever scanned is the baseline, never "new"). Unlistened-ephemeral UDP sockets (clients'
    bound ports) are ignored. A pid change with the same process name is a restart, not a change.
    """
    first, last = batch[0]["id"], batch[-1]["id"]
    baseline = db.first_occupancy_round(conn)
    if baseline is None:
        return []
    rows = db.occupancy_detail(conn, first, last)
    holders: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    keys: dict[int, tuple[int, str]] = {}
    for row in rows:
        holders[row["port_id"]][row["round_id"]].append((row["pid"], row["process"], row["user"], row["address"]))
        keys[row["port_id"]] = (row["value"], row["protocol"])
    previous = db.previous_holders(conn, list(holders), first)
    low, high = ephemeral_range()
    findings = []
    for port_id in sorted(holders):
        value, protocol = keys[port_id]
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
    reasons = {"port": value, "protocol": protocol, "round_id": round_id, "holders": [_holder(h) for h in now]}
    if before is not None:
        reasons["previous"] = {"round_id": before[0], "holders": [_holder(h) for h in before[1]]}
    return Finding(detector, port_id, value, protocol, round_id, round_id, None, None, None, reasons,
                   [(port_id, round_id, round_id)])


# --- traffic to unlistened ports -------------------------------------------------------------------

def unlistened_traffic(conn: sqlite3.Connection, batch: Sequence[sqlite3.Row], scans: list[Finding],
                       cfg: Evaluator) -> list[Finding]:
    """One finding per TCP/UDP port that received traffic in batch rounds where nothing held it.

    Only rounds with scanner data count (no occupancy rows: nothing is known). Rounds where a
    flagged scan touched the port are left to that finding.
    """
    first, last = batch[0]["id"], batch[-1]["id"]
    occ = db.occupancy(conn, first, last)
    scanned_rounds = {row[0] for row in occ}
    held = {(row[0], row[1]) for row in occ}
    covered = {(pid, lo, hi) for f in scans for pid, lo, hi in f.covers}
    stats = [r for r in db.port_stats(conn, first, last) if r[0] in scanned_rounds and (r[0], r[1]) not in held]
    if not stats:
        return []
    names = db.ports_by_id(conn, {r[1] for r in stats})
    per_port: dict[int, list[tuple]] = defaultdict(list)
    for row in stats:
        value, protocol = names[row[1]]
        if protocol not in PORTED or value <= 0:
            continue
        if any(pid == row[1] and lo <= row[0] <= hi for pid, lo, hi in covered):
            continue
        per_port[row[1]].append(row)
    findings, skipped = [], 0
    for port_id, rows in sorted(per_port.items(), key=lambda kv: -sum(r[2] for r in kv[1])):
        packets = sum(r[2] for r in rows)
        if packets < cfg.unlistened_min_packets:
            continue
        if len(findings) >= MAX_UNLISTENED_FINDINGS:
            skipped += 1
            continue
        value, protocol = names[port_id]
        lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
        sources, dominant = port_sources(conn, value, protocol, packets, lo, hi)
        reasons = {"port": value, "protocol": protocol, "rounds": [lo, hi], "unlistened_rounds": len(rows),
                   "packets": packets, "bytes": sum(r[3] for r in rows), "syn": sum(r[6] for r in rows),
                   "sources": sources}
        findings.append(Finding("unlistened_port", port_id, value, protocol, lo, hi, float(packets),
                                float(cfg.unlistened_min_packets), dominant, reasons, [(port_id, lo, hi)]))
    if skipped and findings:
        findings[-1].reasons["more_ports_not_reported"] = skipped
    return findings
