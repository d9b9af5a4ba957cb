"""DNS tunnelling, from the sniffer's DNS names: a pure function of the loaded batch (issue 12).

Both directions the sniffer sees: a remote client asking this host's resolver, and this host (or a
client behind it) asking a resolver. Per (client, registered domain) over the batch rounds:

  queries          questions the client asked under that domain (rows with a name and no response)
  query_rate       queries per minute of the batch rounds' time
  mean_name_length mean query name length (characters)
  label_entropy    mean Shannon entropy of the subdomain part (the labels left of the registered
                   domain, dots removed), bits per character
  subdomains       distinct query names under the domain
  record_types     {type name: count}; odd_type_share: TXT/NULL/CNAME questions / queries
  nxdomain_share   NXDOMAIN responses / responses to that client for that domain (None without responses)

A (client, domain) is flagged with >= dns_min_queries queries naming >= dns_min_subdomains distinct
names, and at least dns_min_signals of four signals: mean_name_length >= dns_name_length,
label_entropy >= dns_label_entropy, odd_type_share >= dns_record_type_share, nxdomain_share >=
dns_nxdomain_share. Ordinary browsing asks many domains a few names each (below the volume gate);
a CDN's long hashed names are one signal, not two. One finding per (client, domain), naming both;
score = signals met, threshold = dns_min_signals. It alerts; it never blocks.

Registered domain: the Public Suffix List as shipped inside the ``publicsuffixlist`` package
(offline: it never fetches) - ``a.b.example.co.uk`` -> ``example.co.uk``; a name under an unknown
top-level label (``.test``, ``.internal``) counts its last two labels, as the list's default rule does.

``details`` keys (stable): rule, client, domain, resolvers [address, ...], queries, query_rate,
mean_name_length, label_entropy, subdomains, record_types, odd_type_share, responses, nxdomain_share,
signals [name, ...], examples [name, ...]
"""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict

from app.config import Evaluator
from app.db.series import Batch
from app.services.evaluation.explain import summary
from app.services.evaluation.findings import ONE_WAY, Finding, Source

log = logging.getLogger(__name__)

ODD_TYPES = {5: "CNAME", 10: "NULL", 16: "TXT"}
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
              33: "SRV", 65: "HTTPS", 255: "ANY"}
NXDOMAIN = 3
MAX_EXAMPLES = 5


@functools.lru_cache(maxsize=1)
def _suffix_list():
    from publicsuffixlist import PublicSuffixList  # noqa: PLC0415 - the list is parsed once, on first use
    return PublicSuffixList()


@functools.lru_cache(maxsize=65536)
def registered_domain(name: str) -> str:
    """The registered domain of a DNS name ('x1.t.example.co.uk.' -> 'example.co.uk'), lower case;
    a name that is itself a public suffix (or a single label) is returned as it is."""
    name = name.strip().rstrip(".").lower()
    return _suffix_list().privatesuffix(name) or name


def subdomain(name: str, domain: str) -> str:
    """The labels of ``name`` left of ``domain``, without dots ('' when none)."""
    name = name.strip().rstrip(".").lower()
    head = name[: -len(domain)].rstrip(".") if name.endswith(domain) else ""
    return head.replace(".", "")


def entropy(text: str) -> float:
    """Shannon entropy of the characters of ``text``, bits per character (0.0 for '')."""
    if not text:
        return 0.0
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def batch_minutes(batch: Batch) -> float:
    """The batch rounds' time in minutes (nominal round length where a round's own is unknown)."""
    nominal = batch.nominal_seconds or 60.0
    return sum((r["seconds"] if r["seconds"] and r["seconds"] > 0 else nominal) for r in batch.rounds) / 60.0


def client_domains(batch: Batch) -> dict[tuple[str, str], dict]:
    """(client, registered domain) -> the measures of the module docstring (not yet judged)."""
    stats: dict[tuple[str, str], dict] = defaultdict(lambda: {
        "queries": 0, "names": set(), "length": 0, "entropy": 0.0, "types": Counter(), "resolvers": set(),
        "responses": 0, "nxdomain": 0, "rounds": set()})
    for round_id, _ts, src, dst, name, qtype, rcode, response in batch.dns_queries:
        if not (batch.first <= round_id <= batch.last) or not name:
            continue
        domain = registered_domain(name)
        if response:
            if dst is None:
                continue
            s = stats[(dst, domain)]
            s["responses"] += 1
            s["nxdomain"] += rcode == NXDOMAIN
            continue
        if src is None:
            continue
        s = stats[(src, domain)]
        s["queries"] += 1
        s["names"].add(name.lower().rstrip("."))
        s["length"] += len(name.rstrip("."))
        s["entropy"] += entropy(subdomain(name, domain))
        s["types"][qtype] += 1
        s["rounds"].add(round_id)
        if dst is not None:
            s["resolvers"].add(dst)
    return stats


def dns_tunnels(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per (client, registered domain) that looks like a tunnel (see module docstring)."""
    if not batch.rounds or not batch.dns_queries:
        return []
    minutes = batch_minutes(batch) or 1.0
    dns_port = batch.port_id(53, "udp")
    findings = []
    for (client, domain), s in sorted(client_domains(batch).items()):
        n = s["queries"]
        if n < cfg.dns_min_queries or len(s["names"]) < cfg.dns_min_subdomains:
            continue
        mean_length = s["length"] / n
        label_entropy = s["entropy"] / n
        odd = sum(c for t, c in s["types"].items() if t in ODD_TYPES) / n
        nx = s["nxdomain"] / s["responses"] if s["responses"] else None
        signals = [name for name, hit in (
            ("name_length", mean_length >= cfg.dns_name_length),
            ("label_entropy", label_entropy >= cfg.dns_label_entropy),
            ("record_types", odd >= cfg.dns_record_type_share),
            ("nxdomain", nx is not None and nx >= cfg.dns_nxdomain_share)) if hit]
        if len(signals) < cfg.dns_min_signals:
            continue
        rounds = sorted(s["rounds"])
        details = {
            "rule": f">= {cfg.dns_min_queries} queries naming >= {cfg.dns_min_subdomains} names under one domain "
                    f"and >= {cfg.dns_min_signals} of: mean name >= {cfg.dns_name_length:g} chars, label entropy >= "
                    f"{cfg.dns_label_entropy:g} bits/char, TXT/NULL/CNAME >= {cfg.dns_record_type_share:g}, "
                    f"NXDOMAIN >= {cfg.dns_nxdomain_share:g}",
            "client": client, "domain": domain, "resolvers": sorted(s["resolvers"])[:10], "queries": n,
            "query_rate": round(n / minutes, 2), "mean_name_length": round(mean_length, 1),
            "label_entropy": round(label_entropy, 3), "subdomains": len(s["names"]),
            "record_types": {TYPE_NAMES.get(t, str(t)): c for t, c in sorted(s["types"].items(), key=lambda kv: -kv[1])},
            "odd_type_share": round(odd, 3), "responses": s["responses"],
            "nxdomain_share": round(nx, 3) if nx is not None else None, "signals": signals,
            "examples": sorted(s["names"], key=len, reverse=True)[:MAX_EXAMPLES],
        }
        finding = Finding("dns_tunnel", dns_port, 53 if dns_port else None, "udp" if dns_port else None,
                          rounds[0], rounds[-1], float(len(signals)), float(cfg.dns_min_signals),
                          source=client, sources=[Source(client, packets=n, evidence=ONE_WAY, note="dns client")],
                          details=details)
        finding.summary = summary(finding)           # explain's sentence, the same on every surface
        findings.append(finding)
    return findings


def detect(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """The dns_tunnel findings of the batch."""
    return dns_tunnels(batch, cfg)
