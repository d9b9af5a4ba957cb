"""The flood rules: syn_flood (a TCP port receiving SYNs that go unanswered) and source_flood (rounds
with a flood of new sources or source-map evictions, which could hide a scanner). Pure functions of the
evaluation's loaded Batch (no SQL); their ``details`` keys (stable) are in their docstrings.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from app.config import Evaluator
from app.services.evaluation.batch import Batch
from app.services.evaluation.finding_sources import evidence_class, port_sources
from app.services.evaluation.findings import Finding, Source


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
    order = {r["id"]: i for i, r in enumerate(batch.rounds)}
    hits = _flooded_rounds(batch, cfg)
    if not hits:
        return []
    syn_senders = [s for s in batch.source_stats if batch.first <= s[0] <= batch.last and s[4]]
    findings = []
    for port_id, rows in sorted(hits.items()):
        value, protocol = batch.ports[port_id]
        if protocol != "tcp":
            continue
        rows.sort()
        for run in _runs(rows, order):
            findings.append(_flood_finding(batch, cfg, port_id, value, protocol, run, syn_senders))
    return findings


def _flooded_rounds(batch: Batch, cfg: Evaluator) -> dict[int, list[tuple]]:
    """port_id -> [(round_id, packets, syn, synack, rst, completion share)] of the batch rounds with
    >= syn_flood_syns SYNs and an answered share below syn_flood_completion."""
    hits: dict[int, list[tuple]] = defaultdict(list)
    for round_id, port_id, packets, _bytes, _payload, _max, syn, synack, rst in batch.port_stats:
        if batch.first <= round_id <= batch.last and syn >= cfg.syn_flood_syns:
            share = completion_share(packets, syn, synack, rst)
            if share < cfg.syn_flood_completion:
                hits[port_id].append((round_id, packets, syn, synack, rst, share))
    return hits


def _one_way_syn_senders(batch: Batch, syn_senders: list[tuple], value: int, protocol: str, lo: int,
                         hi: int) -> Counter:
    """address -> SYNs it sent in rounds lo..hi, for the one-way SYN senders toward this port: a sender
    whose ports are known (flows, source_ports) counts when this port is among them; one whose ports
    are not (a one-SYN source outside the kept flows) counts too; one that completed a handshake in
    those rounds does not."""
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
    return senders


def _flood_sources(batch: Batch, value: int, protocol: str, packets: int, lo: int, hi: int, senders: Counter,
                   top_syn: list[dict]) -> tuple[list[Source], str | None]:
    """(the sources a flood names, its dominant source or None): only its own SYN senders (the port's
    busiest source may be a live peer), the main source first, each with its flood evidence class."""
    sources, dominant = port_sources(batch, value, protocol, packets, lo, hi)
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
    return sources, dominant


def _flood_finding(batch: Batch, cfg: Evaluator, port_id: int, value: int, protocol: str, run: list[tuple],
                   syn_senders: list[tuple]) -> Finding:
    """The syn_flood finding of one run of flooded rounds of one port (rows as in _flooded_rounds)."""
    lo, hi = run[0][0], run[-1][0]
    syns = sum(r[2] for r in run)
    packets = sum(r[1] for r in run)
    senders = _one_way_syn_senders(batch, syn_senders, value, protocol, lo, hi)
    top_syn = [{"address": a, "syn": n, "share": round(n / syns, 3)} for a, n in senders.most_common(5)]
    sources, dominant = _flood_sources(batch, value, protocol, packets, lo, hi, senders, top_syn)
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
    return Finding("syn_flood", port_id, value, protocol, lo, hi, float(peak[2]), float(cfg.syn_flood_syns),
                   source=dominant, sources=sources, details=details, covers=[(port_id, lo, hi)],
                   source_count=len(senders), summary=summary)


def _runs(rows: list[tuple], order: dict[int, int]) -> list[list[tuple]]:
    """Split rows (round_id first, ascending) into runs of consecutive batch rounds."""
    runs: list[list[tuple]] = []
    for row in rows:
        if runs and order[row[0]] == order[runs[-1][-1][0]] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


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
