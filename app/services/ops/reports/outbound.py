"""The report's section on what leaves the host: top destinations by bytes out, and the outbound
findings (outbound_scan, exfiltration, beaconing, dns_tunnel) each explained in a sentence from the
finding's own details. Plain data and HTML text; nothing here draws."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from app.db import outbound as queries
from app.services.evaluation.explain import summary
from app.services.evaluation.findings import Finding
from app.services.ops.reports.facts import fmt_time

SECTION = ("outbound", "What leaves the host",
           "Nothing sent by this host was counted in this window (the egress program may not be attached).")


@dataclass
class Outbound:
    destinations: list = field(default_factory=list)     # rows of app.db.outbound.top_destinations
    findings: list = field(default_factory=list)         # [(created_at, Finding)]

    @property
    def empty(self) -> bool:
        return not self.destinations and not self.findings


def load(conn, since: float | None, limit: int) -> Outbound:
    return Outbound(queries.top_destinations(conn, since, limit),
                    [(row["created_at"], Finding.from_row(row)) for row in queries.outbound_anomalies(conn, since, limit)])


def _ranges(ports: list[int], limit: int = 6) -> str:
    """[1000, 1001, 1002, 1500] -> '1000-1002, 1500'."""
    runs: list[list[int]] = []
    for p in sorted(ports):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def sentence(f: Finding) -> str:
    """The finding's one sentence (app/services/explain.py: the same on every surface), then what
    the table has room for: the ports or first destinations of a scan, the DNS signals, the rule."""
    d = f.details
    parts = [f.summary or summary(f)]
    if f.detector == "outbound_scan":
        if d.get("kind") == "addresses":
            parts.append(f"first: {', '.join(d.get('destinations', [])[:5])}")
        else:
            listed = d.get("remote_ports", {})
            ports = "; ".join(f"{proto} {_ranges(values)}" for proto, values in listed.items())
            if sum(len(v) for v in listed.values()) < (d.get("distinct_ports") or 0) and not ports.endswith("..."):
                ports += ", ..."
            parts.append(f"ports {ports}")
    if f.detector == "dns_tunnel":
        parts.append(f"mean length {d.get('mean_name_length')}, entropy {d.get('label_entropy')} bits/char, "
                     f"types {d.get('record_types')}, NXDOMAIN share {d.get('nxdomain_share')}")
    if d.get("rule"):
        parts.append(f"rule: {d['rule']}")
    return "; ".join(parts)


def section_html(outbound: Outbound, table: Callable[[list, list, str], str]) -> str:
    """The section's tables (``table(headers, rows, empty)`` renders one)."""
    parts = ["<h3>Top destinations by bytes out</h3>", table(
        ["address", "bytes out", "packets", "SYNs sent", "most ports in a round", "rounds", "last seen"],
        [[r["address"], r["bytes"], r["packets"], r["syn"], r["max_ports_in_a_round"], r["rounds"],
          fmt_time(r["last_time"])] for r in outbound.destinations],
        "No destination counted in this window.")]
    parts += ["<h3>Outbound findings, explained</h3>", table(
        ["id", "time", "detector", "destination / client", "what was seen"],
        [[f.id, fmt_time(at), f.detector, f.source or "-", sentence(f)] for at, f in outbound.findings],
        "No outbound scan, exfiltration, beacon or DNS tunnel in this window.")]
    return "\n".join(parts)
