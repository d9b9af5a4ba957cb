"""Findings in words: the ONE summary line of a finding (:func:`summary`), and the full explanation
`anomalies show` prints (:func:`explain`), with port lists as compact ranges (:func:`ports_text`).

Pure functions of a :class:`~app.services.evaluation.findings.Finding` except where a connection is passed
(the queries live in app/db/anomalies.py).
"""
from __future__ import annotations

from typing import Iterable

from app.db import anomalies as db
from app.services.evaluation.findings import Finding, anomaly_key
from app.services.text import counted, inert, inert_lines, utc

# units of the model's features (app/services/evaluation/series.py FEATURES): counts are per nominal round
FEATURE_UNITS = {
    "packets": "packets/round", "bytes": "bytes/round", "mean_payload": "bytes/packet",
    "max_payload": "bytes", "syn": "SYNs/round", "syn_share": "of packets", "syn_synack_ratio": "SYN per SYN-ACK",
    "rst": "RSTs/round", "sources": "sources/round", "listening": "(1 = held)", "process_changed": "(1 = changed)",
    "established": "connections", "dns_packets": "DNS packets/round (sample)",
}
DETECTOR_NAMES = {"port_scan": "port scan", "syn_flood": "SYN flood", "new_listener": "new listener",
                  "process_changed": "process changed", "unlistened_port": "traffic to an unlistened port",
                  "model": "unusual traffic (model)", "exfiltration": "exfiltration", "outbound_scan": "outbound scan",
                  "beaconing": "beaconing", "dns_tunnel": "DNS tunnel", "source_flood": "source flood"}


# --- ports ---------------------------------------------------------------------------------------------

def port_ranges(ports: Iterable[int]) -> str:
    """Sorted ports as compact ranges: [1, 2, 3, 80] -> '1-3,80'."""
    values = sorted(set(int(p) for p in ports))
    parts: list[str] = []
    start = prev = None
    for value in values:
        if prev is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = value
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def expand_ranges(ranges: Iterable) -> list[int]:
    """[[lo, hi], ...] (as stored in a scan's ``port_ranges``) -> every port."""
    out: list[int] = []
    for lo, hi in ranges:
        out.extend(range(int(lo), int(hi) + 1))
    return out


def scan_ports(finding: Finding) -> dict[str, list[int]]:
    """Every port a scan finding reached, by protocol (``port_ranges`` when stored, else the listed ports)."""
    ranges = finding.details.get("port_ranges")
    if ranges:
        return {proto: expand_ranges(r) for proto, r in sorted(ranges.items())}
    return {proto: list(v) for proto, v in sorted((finding.details.get("ports") or {}).items())}


def ports_text(by_protocol: dict[str, list[int]], limit: int | None = None) -> str:
    """'tcp 1-1024 (1024), udp 53 (1)'; with ``limit`` at most that many ranges per protocol ('…' after)."""
    parts = []
    for proto, ports in sorted(by_protocol.items()):
        if not ports:
            continue
        ranges = port_ranges(ports).split(",")
        shown = ",".join(ranges if limit is None or len(ranges) <= limit else ranges[:limit] + ["…"])
        parts.append(f"{proto} {shown} ({len(set(ports))})")
    return ", ".join(parts)


# --- the one line ------------------------------------------------------------------------------------

def _n(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{int(value):,}" if value.is_integer() else f"{value:,.3g}"


def _rounds(n) -> str:
    """'1 round', '3 rounds' ('- rounds' when unknown)."""
    return counted(int(n), "round") if isinstance(n, (int, float)) else "- rounds"


def _who(finding: Finding, limit: int = 2) -> str:
    if finding.details.get("many_one_way_sources") and finding.source_count:      # a flood judged forged
        example = f" (e.g. {finding.sources[0].address})" if finding.sources else ""
        return f"{finding.source_count} one-way sources, possibly forged{example}"
    named = []
    for s in finding.sources[:limit]:
        bits = [f"{s.share:.0%}" if s.share is not None else f"{_n(s.packets)} packets", s.evidence]
        if s.forged:
            bits.append("possibly forged")
        named.append(f"{s.address} ({', '.join(bits)})")
    if not named and finding.source:
        named.append(finding.source)
    more = (finding.source_count or len(finding.sources)) - len(named)
    text = ", ".join(named)
    if more > 0:
        text += f" and {more} more"
    return text


def _where(finding: Finding, holders: list[dict] | None) -> str:
    label = finding.port_label
    names = sorted({h.get("process") for h in holders or [] if h.get("process")})
    if names:
        return f"{label} ({', '.join(names)})"
    if holders is not None and finding.port is not None and finding.port != -1:
        return f"{label} (nothing listening)"
    return label


def summary(finding: Finding, holders: list[dict] | None = None) -> str:
    """One line about ``finding`` for people: what, where (port and process), who (sources with share
    and evidence class), how much. ``holders``: who held its port in its rounds ([{pid, process, user,
    address}], from occupancy), None when unknown. Names in it (processes, users, DNS names) came from
    other users or the network: the line is made inert (text.inert).

    Stored as the finding's ``summary`` (reasons ``$.summary``) when the evaluation stores it
    (:func:`fill_summaries`), so the CLI, the alerts (webhook, mail, syslog), ``blacklist list`` and the
    CrowdSec push all read the same line."""
    return inert(_summary(finding, holders))


def _summary(finding: Finding, holders: list[dict] | None) -> str:
    f, d = finding, finding.details
    rounds = (f"round {f.first_round_id}" if f.first_round_id == f.last_round_id
              else f"rounds {f.first_round_id}-{f.last_round_id}")
    if f.detector == "port_scan":
        text = f"port scan from {_who(f, 1) or '?'}: {ports_text(scan_ports(f), limit=4)}"
        text += f", up to {_n(d.get('max_ports_in_one_round'))} ports in one round, {rounds}"
        return text
    if f.detector == "syn_flood":
        peak = d.get("peak") or {}
        answered = peak.get("completion_share")
        text = f"SYN flood on {_where(f, holders)}: {_n(d.get('syn'))} SYNs in {_rounds(d.get('flooded_rounds'))}"
        if answered is not None:
            text += f", peak {_n(peak.get('syn'))} SYNs with {answered:.0%} answered"
        who = _who(f)
        mitigated = ": mitigated per port, no source blocked" if d.get("many_one_way_sources") else ""
        return text + (f", from {who}" if who else "") + f", {rounds}{mitigated}"
    if f.detector in ("new_listener", "process_changed"):
        now = d.get("holders") or holders or []
        named = dict.fromkeys(f"{h.get('process') or '?'} (pid {h.get('pid', '?')}, user {h.get('user', '?')})"
                              for h in now)          # one per process: a socket on IPv4 and IPv6 is one
        procs = ", ".join(list(named)[:3]) or "an unknown process"
        if f.detector == "new_listener":
            return f"new listener on {f.port_label}: {procs}, round {d.get('round_id', f.first_round_id)}"
        before = ", ".join(sorted({h.get("process") or "?" for h in (d.get("previous") or {}).get("holders", [])}))
        return f"{f.port_label} changed owner: {before or '?'} -> {procs}, round {d.get('round_id', f.first_round_id)}"
    if f.detector == "unlistened_port":
        text = (f"traffic to {f.port_label}, where nothing listens: {_n(d.get('packets'))} packets "
                f"in {_rounds(d.get('unlistened_rounds'))}")
        who = _who(f)
        return text + (f" from {who}" if who else "") + f", {rounds}"
    if f.detector == "model":
        feats = d.get("features") or []
        top = ", ".join(f"{x['feature']} {_n(x['observed'])} vs usual {_n(x['reconstructed'])}"
                        for x in feats[:2])
        text = f"unusual traffic on {_where(f, holders)}"
        if top:
            text += f": {top}"
        if f.score is not None and f.threshold:
            text += f" (error {f.score / f.threshold:.1f}x the threshold)"
        who = _who(f)
        return text + (f", from {who}" if who else "") + f", {rounds}"
    if f.outbound:
        return _outbound(f, rounds)
    if f.detector == "source_flood":
        return (f"source flood: {_n(f.source_count)} new sources reached this host in {rounds} (at most "
                f"{_n(f.score)} in one round): per-source counts there may be incomplete")
    # a detector this module does not know yet: the generic form
    text = f"{DETECTOR_NAMES.get(f.detector, f.detector.replace('_', ' '))} on {_where(f, holders)}"
    if f.score is not None:
        text += f", score {_n(f.score)}" + (f" (threshold {_n(f.threshold)})" if f.threshold is not None else "")
    who = _who(f)
    return text + (f", from {who}" if who else "") + f", {rounds}"


def _outbound(f: Finding, rounds: str) -> str:
    """What this host sent, to whom, in the detector's own words (app/services/outbound_rules.py,
    dns_rules.py write the details): destinations, never "from", and no evidence class."""
    d = f.details
    to = d.get("destination") or f.source or "?"
    ports = d.get("remote_ports") if isinstance(d.get("remote_ports"), list) else []   # a scan's: by protocol
    on = f" (remote port{'s' if len(ports) != 1 else ''} {port_ranges(ports)})" if ports else ""
    if f.detector == "exfiltration":
        usual, factor = d.get("usual_bytes_per_round"), d.get("factor")
        times = "far above" if factor is None else (f"{factor:,.0f}x" if factor >= 10 else f"{factor:.1f}x")
        return (f"exfiltration: this host sent {_n(d.get('bytes'))} bytes out to {to}{on}, {times} the usual "
                f"{_n(round(usual) if usual is not None else None)} bytes/round of the {d.get('usual_from', 'host')}, {rounds}")
    if f.detector == "outbound_scan":
        who = ", ".join(sorted({f"{p.get('process') or '?'} (pid {p.get('pid', '?')})"
                                for p in d.get("processes") or []})) or "a process the scanner did not see"
        if d.get("kind") == "addresses":
            what = f"{_n(d.get('distinct_addresses'))} addresses"
        else:
            what = f"{_n(d.get('distinct_ports'))} ports of {to}"
        return f"outbound scan: this host scanned {what}, from {who}, {rounds}"
    if f.detector == "beaconing":
        return (f"beaconing: this host contacted {to}{on} {_n(d.get('connections'))} times every "
                f"{_n(d.get('interval_seconds'))} s (CV {_n(d.get('interval_cv'))}) over "
                f"{_n(d.get('rounds_seen'))} rounds, {rounds}")
    client = d.get("client") or f.source or "?"
    resolvers = d.get("resolvers") or []
    via = f" {', '.join(resolvers[:2])}" if resolvers else ""
    under = d.get("domain") or ("no registered domain" if d.get("grouped_by") == "server" else "?")
    return (f"DNS tunnel suspected: {client} asked{via} {_n(d.get('queries'))} names under {under} "
            f"({_n(d.get('subdomains'))} distinct, {', '.join(d.get('signals') or [])}), {rounds}")


def holders_of(conn, finding: Finding) -> list[dict] | None:
    """Who held the finding's port in its rounds (occupancy), None for a finding without a port."""
    if finding.port_id is None or finding.port is None:
        return None
    return [dict(r) for r in db.port_holders(conn, finding.port_id, finding.first_round_id, finding.last_round_id)]


def fill_summaries(conn, findings: Iterable[Finding]) -> None:
    """Set each finding's ``summary`` (before it is stored or updated)."""
    for f in findings:
        f.summary = summary(f, holders_of(conn, f))


# --- the full explanation ------------------------------------------------------------------------------

def _time(t: float | None) -> str | None:
    return None if t is None else utc(t)


def explain(conn, finding: Finding, settings=None) -> dict:
    """Everything `anomalies show` prints about a stored finding (JSON-ready): round times, process
    (occupancy), sources, scanned ports as compact ranges, model features (observed vs usual, in units),
    what was done."""
    f = finding
    span = db.round_span(conn, f.first_round_id, f.last_round_id)
    holders = holders_of(conn, f)
    out: dict = {
        "id": f.id, "detector": f.detector, "summary": f.summary or summary(f, holders),
        "evaluation_id": f.evaluation_id, "port": f.port, "protocol": f.protocol, "port_label": f.port_label,
        "rounds": [f.first_round_id, f.last_round_id],
        "started": _time(span[0]) if span else None, "ended": _time(span[1]) if span else None,
        "start_time": span[0] if span else None, "end_time": span[1] if span else None,
        "score": f.score, "threshold": f.threshold, "holders": holders,
        "sources": [s.to_dict() for s in f.sources], "source_count": f.source_count,
        "direction": "out" if f.outbound else "in",
    }
    if f.detector == "port_scan":
        ports = scan_ports(f)
        out["ports"] = {proto: port_ranges(v) for proto, v in ports.items()}
        out["ports_text"] = ports_text(ports)
    if f.detector == "model":
        out["features"] = [{**x, "unit": FEATURE_UNITS.get(x["feature"], "")} for x in f.details.get("features", [])]
    out["details"] = f.details
    # what was done: blocks that name this finding, and the alerts sent for it
    blocks = []
    for row in db.blocks_of(conn, f.id):
        blocks.append({"address": row["address"], "status": row["status"], "origin": row["origin"],
                       "expires_at": row["expires_at"],
                       "until": _time(row["expires_at"]) if row["expires_at"] else "never",
                       "drops": row["drops"]})
    out["blocks"] = blocks
    out["block_events"] = [{"at": _time(r["at"]), "address": r["address"], "action": r["action"], "detail": r["detail"]}
                           for r in db.block_events_of(conn, f.id)]
    created = db.created_at(conn, f.id)
    out["alerts"] = [{"channel": r["channel"], "at": _time(r["sent_at"])}
                     for r in db.alerts_sent(conn, anomaly_key(f)) if created is None or r["sent_at"] >= created]
    return out


def lines(explained: dict) -> list[str]:
    """The explanation as text lines (what `anomalies show` prints)."""
    e = explained
    out = [f"anomaly {e['id']}: {e['summary']}",
           f"  detector   {e['detector']} (evaluation {e['evaluation_id']})"]
    first, last = e["rounds"]
    when = f"round {first}" if first == last else f"rounds {first}-{last}"
    if e["started"]:
        when += f", {e['started']} to {e['ended']}"
    out.append(f"  when       {when}")
    if e["port"] is not None:
        procs = ", ".join(f"{inert(h.get('process') or '?')} (pid {h.get('pid', '?')}, user {inert(h.get('user', '?'))}"
                          + (f", on {h['address']}" if h.get("address") else "") + ")"
                          for h in (e["holders"] or [])) or "nothing listening (occupancy)"
        out.append(f"  port       {e['port_label']}: {procs}")
    if e["score"] is not None:
        limit = f" (threshold {_n(e['threshold'])})" if e["threshold"] is not None else ""
        out.append(f"  score      {_n(e['score'])}{limit}")
    if e.get("ports_text"):
        out.append(f"  ports      {e['ports_text']}")
    if e["sources"] and e.get("direction") == "out":        # destinations: what this host sent them
        out.append("  to         ADDRESS                         PACKETS        BYTES")
        for s in e["sources"]:
            out.append(f"             {s['address']:<30}  {_n(s.get('packets', 0)):>9}  {_n(s.get('bytes', 0)):>11}")
        if e["source_count"] and e["source_count"] > len(e["sources"]):
            out.append(f"             ... {e['source_count'] - len(e['sources'])} more")
    elif e["sources"]:
        out.append("  sources    ADDRESS                         PACKETS      SHARE  EVIDENCE")
        for s in e["sources"]:
            share = f"{s['share']:.1%}" if s.get("share") is not None else "-"
            forged = "  (possibly forged)" if s.get("forged") else ""
            out.append(f"             {s['address']:<30}  {_n(s.get('packets', 0)):>9}  {share:>7}  "
                       f"{s.get('evidence', '-')}{forged}")
        if e["source_count"] and e["source_count"] > len(e["sources"]):
            out.append(f"             ... {counted(e['source_count'] - len(e['sources']), 'more source', 'more sources')}")
    if e.get("features"):
        out.append("  features   FEATURE            OBSERVED      USUAL  UNIT                  SHARE OF ERROR")
        for x in e["features"]:
            out.append(f"             {x['feature']:<17} {_n(x['observed']):>9}  {_n(x['reconstructed']):>9}  "
                       f"{x['unit']:<20}  {x.get('share', 0):.0%}")
    done = []
    for b in e["blocks"]:
        verb = "would block (dry run)" if b["status"] == "dry-run" else f"blocked ({b['status']})"
        done.append(f"{verb} {b['address']} until {b['until']}, {b['drops']} drops")
    done += [f"alerted on {a['channel']} at {a['at']}" for a in e["alerts"]]
    if not e["blocks"]:
        done += [f"{ev['action']} {ev['address']} at {ev['at']}: {ev['detail']}" for ev in e["block_events"]
                 if ev["action"] in ("refused", "would-block")][:5]
    out.append("  done       " + ("\n             ".join(inert(d) for d in done) if done else "nothing (no block, no alert)"))
    return [inert_lines(line) for line in out]
