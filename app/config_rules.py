"""Ranges and kinds of the configuration values, checked when the settings are loaded (app/config.py).

    RULES: "section.key" -> check(value) returning None or what is wrong
    validate(settings) -> ["config key 'k' = v must ... (source)", ...]   every problem, not the first

Plain functions, no schema library: one line per key here is shorter than a schema's model classes
next to the dataclasses that already declare each key's type and default.
"""
from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any, Callable

from app import durations


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def _above(low):
    return lambda v: None if v > low else f"must be above {low}"


def _between(low, high):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _one_of(*choices, fold=False):
    def check(v):
        if (v.upper() if fold else v) in choices:
            return None
        return "must be one of " + ", ".join(choices)
    return check


def _non_empty(v):
    return None if v.strip() else "must not be empty"


def _networks(values):
    bad = []
    for text in values:
        try:
            if "%" in text:
                raise ValueError
            ipaddress.ip_network(text, strict=True)
        except ValueError:
            bad.append(text)
    return None if not bad else "holds entries that are not IPv4/IPv6 networks (ADDR or ADDR/LEN, host bits " \
        "clear, no %zone): " + ", ".join(repr(b) for b in bad)


def _ports(values):
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535]
    return None if not bad else "holds entries that are not port numbers 0-65535: " + ", ".join(repr(b) for b in bad)


RULE_DETECTORS = ("port_scan", "syn_flood", "unlistened_port", "new_listener")
BLOCKING_DETECTORS = (*RULE_DETECTORS, "model")   # what blocklist.simulate may name
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
                     "authpriv", "ftp", *(f"local{i}" for i in range(8)))
POSITIVE, NON_NEGATIVE = _above(0), _at_least(0)
SHARE = _between(0, 1)
MAP_SIZE = _between(1, 1 << 24)

# "section.key" -> check(value) returning None or what is wrong; keys not listed accept any value of their type
RULES: dict[str, Callable[[Any], str | None]] = {
    "general.db": _non_empty, "general.state_dir": _non_empty, "general.run_dir": _non_empty,
    "general.pin_root": _non_empty, "general.max_db_mb": _at_least(0),
    "general.log_level": _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold=True),
    "collector.round_seconds": POSITIVE, "collector.rounds": NON_NEGATIVE,
    "collector.xdp_mode": _one_of("auto", "native", "generic"),
    "collector.top_flows": NON_NEGATIVE, "collector.many_ports_threshold": _at_least(1),
    "collector.max_run_seconds": NON_NEGATIVE,
    **{f"collector.{m}_map_size": MAP_SIZE for m in ("port", "source", "srcport", "flow", "blacklist")},
    "sniffer.window_fraction": _between(0, 0.95), "sniffer.max_packets": NON_NEGATIVE,
    "sniffer.drain_seconds": NON_NEGATIVE,
    "evaluator.window": _at_least(2), "evaluator.warmup_rounds": NON_NEGATIVE,
    "evaluator.alert_budget_per_day": POSITIVE, "evaluator.keep_models": _at_least(1),
    "evaluator.epochs": _at_least(1), "evaluator.refit_epochs": NON_NEGATIVE,
    "evaluator.batch_size": _at_least(1), "evaluator.max_ports": _at_least(1),
    "evaluator.min_active_share": SHARE, "evaluator.seed": NON_NEGATIVE,
    "evaluator.max_batch_rounds": _at_least(1), "evaluator.train_stride": _at_least(1),
    "evaluator.max_train_windows": _at_least(1), "evaluator.min_train_steps": NON_NEGATIVE,
    "evaluator.holdout_fraction": _between(0, 0.9), "evaluator.calibration_windows": _at_least(1),
    "evaluator.lstm_units": _at_least(1), "evaluator.bottleneck": _at_least(1),
    "evaluator.top_features": _at_least(1), "evaluator.scan_ports": _at_least(1),
    "evaluator.scan_span_seconds": POSITIVE, "evaluator.syn_flood_syns": _at_least(1),
    "evaluator.syn_flood_completion": SHARE, "evaluator.unlistened_min_packets": _at_least(1),
    "evaluator.outbound_scan_ports": _at_least(2), "evaluator.outbound_scan_addresses": _at_least(2),
    "evaluator.exfiltration_min_bytes": _at_least(1), "evaluator.exfiltration_factor": _above(1),
    "evaluator.exfiltration_baseline_seconds": POSITIVE, "evaluator.exfiltration_min_history_rounds": _at_least(1),
    "evaluator.beacon_span_seconds": POSITIVE, "evaluator.beacon_min_connections": _at_least(3),
    "evaluator.beacon_min_rounds": _at_least(2), "evaluator.beacon_max_cv": _between(0, 1),
    "evaluator.beacon_min_interval_seconds": NON_NEGATIVE, "evaluator.beacon_ignore_ports": _ports,
    "evaluator.dns_min_queries": _at_least(1), "evaluator.dns_min_subdomains": _at_least(1),
    "evaluator.dns_min_signals": _between(1, 4), "evaluator.dns_name_length": _between(1, 253),
    "evaluator.dns_label_entropy": _between(0, 8), "evaluator.dns_record_type_share": SHARE,
    "evaluator.dns_nxdomain_share": SHARE,
    "evaluator.flood_many_sources": _at_least(2), "evaluator.source_flood_new_sources": _at_least(1),
    "evaluator.threshold_max_change": _at_least(1), "evaluator.calibration_min_expected": NON_NEGATIVE,
    "blocklist.base_ttl_seconds": POSITIVE, "blocklist.max_ttl_seconds": POSITIVE,
    "blocklist.escalation": _at_least(1), "blocklist.max_new_per_evaluation": NON_NEGATIVE,
    "blocklist.max_entries": _at_least(1), "blocklist.model_source_share": _between(0, 1),
    "blocklist.model_block_factor": POSITIVE, "blocklist.model_source_surge": POSITIVE,
    "blocklist.surge_baseline_rounds": _at_least(1), "blocklist.allowlist": _networks,
    "blocklist.manual_remove_grace_seconds": NON_NEGATIVE, "blocklist.manual_ttl_seconds": POSITIVE,
    "blocklist.syn_limit_per_second": _at_least(1), "blocklist.syn_limit_ttl_seconds": POSITIVE,
    "blocklist.peer_lookback_seconds": NON_NEGATIVE, "blocklist.ttl_tolerance": _between(0, 255),
    "blocklist.max_new_per_forged_flood": NON_NEGATIVE,
    "blocklist.rule_detectors": lambda v: None if set(v) <= set(RULE_DETECTORS) else
    "names unknown detectors " + ", ".join(repr(d) for d in v if d not in RULE_DETECTORS)
    + " (known: " + ", ".join(RULE_DETECTORS) + ")",
    "blocklist.simulate": lambda v: None if set(v) <= set(BLOCKING_DETECTORS) else
    "names detectors that never block " + ", ".join(repr(d) for d in v if d not in BLOCKING_DETECTORS)
    + " (detectors that can block: " + ", ".join(BLOCKING_DETECTORS) + ")",
    "alerts.cooldown_seconds": NON_NEGATIVE, "alerts.webhook_timeout": POSITIVE,
    "alerts.webhook_retries": NON_NEGATIVE, "alerts.smtp_port": _between(1, 65535),
    "alerts.smtp_timeout": POSITIVE, "alerts.max_seconds": POSITIVE,
    "alerts.syslog_facility": _one_of(*SYSLOG_FACILITIES),
    "alerts.webhook_url": lambda v: None if not v or v.startswith(("http://", "https://")) else
    "must start with http:// or https://",
    "metrics.file_name": lambda v: None if v.strip() and "/" not in v else "must be a file name (no /)",
    "reports.top_ports": _at_least(1), "reports.max_anomaly_figures": NON_NEGATIVE,
    "reports.since": lambda v: _since(v),
    "retention.keep_days": POSITIVE,
    "crowdsec.widest_prefix_ipv4": _between(0, 32), "crowdsec.widest_prefix_ipv6": _between(0, 128),
}


def _since(value: str) -> str | None:
    text = value.strip()
    if text.lower() in ("", "all"):
        return None
    try:
        durations.seconds(text)
        return None
    except ValueError:
        pass
    try:
        datetime.fromisoformat(text)
        return None
    except ValueError:
        return "must be 'all', a span like 24h or 7d, or an ISO date/time"


def validate(settings) -> list[str]:
    """Every value out of range or of the wrong kind, as "config key 'k' = v must ... (source)"."""
    problems = []
    for section, key, value, source in settings.items():
        if source == "invalid":
            continue
        check = RULES.get(f"{section}.{key}")
        why = check(value) if check else None
        if why:
            problems.append(f"config key '{section}.{key}' = {value!r} {why} ({source})")
    b = settings.blocklist
    if not any(p.startswith("config key 'blocklist.") for p in problems):
        for key in ("base_ttl_seconds", "manual_ttl_seconds"):
            if getattr(b, key) > b.max_ttl_seconds:
                problems.append(f"config key 'blocklist.{key}' = {_num(getattr(b, key))} must be at most "
                                f"blocklist.max_ttl_seconds ({_num(b.max_ttl_seconds)}) "
                                f"({settings.sources.get('blocklist.' + key, 'default')})")
    return problems
