"""DNS tunnelling (dns_tunnel), from the sniffer's DNS names: a pure function of the loaded batch, judged
per (client, registered domain) and per (client, server address) for names under no registered domain.
It alerts; it never blocks. Measures, gates and the stable ``details`` keys: the README's "Outbound and
DNS rules". Called by the evaluation; registered domains from the offline ``publicsuffixlist`` package.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict

from app.config import Evaluator
from app.services.evaluation.batch import Batch
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


@functools.lru_cache(maxsize=65536)
def unregistered(name: str) -> bool:
    """True when ``name`` ends in no known public suffix (an unknown top-level label: 'a.b.ff', 'x.local')."""
    name = name.strip().rstrip(".").lower()
    return bool(name) and _suffix_list().publicsuffix(name, accept_unknown=False) is None


def _new_stats() -> dict:
    return {"queries": 0, "names": set(), "length": 0, "entropy": 0.0, "types": Counter(), "resolvers": set(),
            "responses": 0, "nxdomain": 0, "rounds": set()}


def _add_question(s: dict, round_id: int, dst: str | None, name: str, qtype: int, random_part: str) -> None:
    s["queries"] += 1
    s["names"].add(name.lower().rstrip("."))
    s["length"] += len(name.rstrip("."))
    s["entropy"] += entropy(random_part)
    s["types"][qtype] += 1
    s["rounds"].add(round_id)
    if dst is not None:
        s["resolvers"].add(dst)


def _batch_questions(batch: Batch):
    """(round_id, src, dst, name, qtype, rcode, response) of the batch rounds' named DNS rows."""
    for round_id, _ts, src, dst, name, qtype, rcode, response in batch.dns_queries:
        if batch.first <= round_id <= batch.last and name:
            yield round_id, src, dst, name, qtype, rcode, response


def client_domains(batch: Batch) -> dict[tuple[str, str], dict]:
    """(client, registered domain) -> the measures of the module docstring (not yet judged)."""
    stats: dict[tuple[str, str], dict] = defaultdict(_new_stats)
    for round_id, src, dst, name, qtype, rcode, response in _batch_questions(batch):
        domain = registered_domain(name)
        if response:
            if dst is not None:
                stats[(dst, domain)]["responses"] += 1
                stats[(dst, domain)]["nxdomain"] += rcode == NXDOMAIN
        elif src is not None:
            _add_question(stats[(src, domain)], round_id, dst, name, qtype, subdomain(name, domain))
    return stats


def client_servers(batch: Batch, judged: set[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """(client, server address) -> the measures of the questions under no registered domain whose
    (client, registered domain) is not in ``judged`` (the domain conversations that reached the
    volume gate); the entropy is over the labels left of the (unknown) top-level one."""
    stats: dict[tuple[str, str], dict] = defaultdict(_new_stats)
    for round_id, src, dst, name, qtype, rcode, response in _batch_questions(batch):
        if src is None or dst is None or not unregistered(name):
            continue
        client, server = (dst, src) if response else (src, dst)
        if (client, registered_domain(name)) in judged:
            continue
        if response:
            stats[(client, server)]["responses"] += 1
            stats[(client, server)]["nxdomain"] += rcode == NXDOMAIN
        else:
            _add_question(stats[(client, server)], round_id, dst, name, qtype, _without_top_label(name))
    return stats


def _without_top_label(name: str) -> str:
    """The labels of ``name`` left of its top-level one, without dots ('dnscat.ab.cd' -> 'dnscatab')."""
    return name.strip().rstrip(".").lower().rpartition(".")[0].replace(".", "")


def _signals(s: dict, cfg: Evaluator) -> tuple[list[str], dict]:
    """The signals a conversation's measures meet, and the measures: (signals, {mean_length, ...})."""
    n = s["queries"]
    measures = {"mean_length": s["length"] / n, "label_entropy": s["entropy"] / n,
                "odd": sum(c for t, c in s["types"].items() if t in ODD_TYPES) / n,
                "nx": s["nxdomain"] / s["responses"] if s["responses"] else None}
    signals = [name for name, hit in (
        ("name_length", measures["mean_length"] >= cfg.dns_name_length),
        ("label_entropy", measures["label_entropy"] >= cfg.dns_label_entropy),
        ("record_types", measures["odd"] >= cfg.dns_record_type_share),
        ("nxdomain", measures["nx"] is not None and measures["nx"] >= cfg.dns_nxdomain_share)) if hit]
    return signals, measures


def _at_volume(s: dict, cfg: Evaluator) -> bool:
    return s["queries"] >= cfg.dns_min_queries and len(s["names"]) >= cfg.dns_min_subdomains


def _finding(batch: Batch, cfg: Evaluator, client: str, domain: str | None, s: dict, signals: list[str],
             m: dict, minutes: float) -> Finding:
    n, rounds = s["queries"], sorted(s["rounds"])
    dns_port = batch.port_id(53, "udp")
    nx = m["nx"]
    details = {
        "rule": f">= {cfg.dns_min_queries} queries naming >= {cfg.dns_min_subdomains} names under one domain "
                f"(or under no registered domain, to one server) and >= {cfg.dns_min_signals} of: mean name >= "
                f"{cfg.dns_name_length:g} chars, label entropy >= {cfg.dns_label_entropy:g} bits/char, "
                f"TXT/NULL/CNAME >= {cfg.dns_record_type_share:g}, NXDOMAIN >= {cfg.dns_nxdomain_share:g}",
        "client": client, "domain": domain, "grouped_by": "domain" if domain is not None else "server",
        "resolvers": sorted(s["resolvers"])[:10], "queries": n,
        "query_rate": round(n / minutes, 2), "mean_name_length": round(m["mean_length"], 1),
        "label_entropy": round(m["label_entropy"], 3), "subdomains": len(s["names"]),
        "record_types": {TYPE_NAMES.get(t, str(t)): c for t, c in sorted(s["types"].items(), key=lambda kv: -kv[1])},
        "odd_type_share": round(m["odd"], 3), "responses": s["responses"],
        "nxdomain_share": round(nx, 3) if nx is not None else None, "signals": signals,
        "examples": sorted(s["names"], key=len, reverse=True)[:MAX_EXAMPLES],
    }
    finding = Finding("dns_tunnel", dns_port, 53 if dns_port else None, "udp" if dns_port else None,
                      rounds[0], rounds[-1], float(len(signals)), float(cfg.dns_min_signals),
                      source=client, sources=[Source(client, packets=n, evidence=ONE_WAY, note="dns client")],
                      details=details)
    finding.summary = summary(finding)           # explain's sentence, the same on every surface
    return finding


def dns_tunnels(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """One finding per (client, registered domain), then per (client, server) for the questions under
    no registered domain, that looks like a tunnel (see module docstring)."""
    if not batch.rounds or not batch.dns_queries:
        return []
    minutes = batch_minutes(batch) or 1.0
    domains = client_domains(batch)
    judged = {key for key, s in domains.items() if _at_volume(s, cfg)}
    findings = []
    servers = client_servers(batch, judged)
    conversations = [(client, domain, domains[(client, domain)]) for client, domain in sorted(judged)]
    conversations += [(client, None, s) for (client, _server), s in sorted(servers.items()) if _at_volume(s, cfg)]
    for client, domain, s in conversations:
        signals, measures = _signals(s, cfg)
        if len(signals) >= cfg.dns_min_signals:
            findings.append(_finding(batch, cfg, client, domain, s, signals, measures, minutes))
    return findings


def detect(batch: Batch, cfg: Evaluator) -> list[Finding]:
    """The dns_tunnel findings of the batch."""
    return dns_tunnels(batch, cfg)
