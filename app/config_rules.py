"""Ranges and kinds of the configuration values, checked when the settings are loaded (app/config.py).

    RULES: "section.key" -> check(value) returning None or what is wrong
    validate(settings) -> ["config key 'k' = v must ... (source)", ...]   every problem, not the first
    coerce(name, default, value, from_env): a file or environment value as the key's type (ConfigError)
    crowdsec_problems(section), fleet_problems(section, role): checks across a section's keys

Plain functions, no schema library: one line per key here is shorter than a schema's model classes
next to the dataclasses that already declare each key's type and default.
"""
from __future__ import annotations

import ipaddress
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from app import durations


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def _above(low):
    return lambda v: None if v > low else f"must be above {low}"


def _between(low, high):
    return lambda v: None if low <= v <= high else f"must be between {_num(low)} and {_num(high)}"


def _above_up_to(low, high):
    """low < v <= high (a positive duration or factor with a ceiling)."""
    return lambda v: None if low < v <= high else f"must be above {_num(low)} and at most {_num(high)}"


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
# ceilings: a value above any of these is a typo (1e12, 1e308), refused before arithmetic or a calendar meets it
DAY = 86400
YEAR = 366 * DAY                   # the longest block, span, retention unit or timeout portwatch accepts
MAX_ROUND_SECONDS = DAY
MAX_COUNT = 10 ** 9                # rounds, windows, packets, entries: any count setting
MAX_NUMBER = 2 ** 53               # any other number (exactly representable as a float and in SQLite)
DURATION = _above_up_to(0, YEAR)
DURATION_OR_ZERO = _between(0, YEAR)
COUNT = _between(0, MAX_COUNT)
TIMEOUT = _above_up_to(0, 3600)
FACTOR = _above_up_to(0, 1e6)

# "section.key" -> check(value) returning None or what is wrong; keys not listed accept any value of their type
RULES: dict[str, Callable[[Any], str | None]] = {
    "general.db": _non_empty, "general.state_dir": _non_empty, "general.run_dir": _non_empty,
    "general.pin_root": _non_empty, "general.max_db_mb": _between(0, 1 << 30),
    "general.log_level": _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold=True),
    "collector.round_seconds": _above_up_to(0, MAX_ROUND_SECONDS), "collector.rounds": COUNT,
    "collector.xdp_mode": _one_of("auto", "native", "generic"),
    "collector.top_flows": COUNT, "collector.many_ports_threshold": _between(1, 1 << 17),
    "collector.max_run_seconds": DURATION_OR_ZERO,
    **{f"collector.{m}_map_size": MAP_SIZE for m in ("port", "source", "srcport", "flow", "blacklist", "conn", "synack",
                                                     "scanner")},
    "collector.reply_idle_seconds": _between(1, DAY),
    "sniffer.window_fraction": _between(0, 0.95), "sniffer.max_packets": COUNT,
    "sniffer.drain_seconds": _between(0, 3600),
    "evaluator.window": _between(2, 10000), "evaluator.warmup_rounds": COUNT,
    "evaluator.alert_budget_per_day": FACTOR, "evaluator.keep_models": _between(1, 10000),
    "evaluator.epochs": _between(1, 100000), "evaluator.refit_epochs": _between(0, 100000),
    "evaluator.batch_size": _between(1, 1 << 20), "evaluator.max_ports": _between(1, 1 << 17),
    "evaluator.min_active_share": SHARE, "evaluator.seed": _between(0, 2 ** 32 - 1),
    "evaluator.max_batch_rounds": _between(1, MAX_COUNT), "evaluator.train_stride": _between(1, MAX_COUNT),
    "evaluator.max_train_windows": _between(1, MAX_COUNT), "evaluator.min_train_steps": COUNT,
    "evaluator.holdout_fraction": _between(0, 0.9), "evaluator.calibration_windows": _between(1, MAX_COUNT),
    "evaluator.lstm_units": _between(1, 4096), "evaluator.bottleneck": _between(1, 4096),
    "evaluator.top_features": _between(1, 1000), "evaluator.scan_ports": _between(1, 1 << 17),
    "evaluator.scan_span_seconds": DURATION, "evaluator.syn_flood_syns": _between(1, MAX_COUNT),
    "evaluator.syn_flood_completion": SHARE, "evaluator.unlistened_min_packets": _between(1, MAX_COUNT),
    "evaluator.outbound_scan_ports": _between(2, 1 << 17), "evaluator.outbound_scan_addresses": _between(2, MAX_COUNT),
    "evaluator.exfiltration_min_bytes": _between(1, MAX_NUMBER), "evaluator.exfiltration_factor": _above_up_to(1, 1e6),
    "evaluator.exfiltration_baseline_seconds": DURATION, "evaluator.exfiltration_min_history_rounds": _between(1, MAX_COUNT),
    "evaluator.exfiltration_warmup_rounds": COUNT, "evaluator.beacon_warmup_rounds": COUNT,
    "evaluator.beacon_span_seconds": DURATION, "evaluator.beacon_min_connections": _between(3, MAX_COUNT),
    "evaluator.beacon_min_rounds": _between(2, MAX_COUNT), "evaluator.beacon_max_cv": _between(0, 1),
    "evaluator.beacon_min_interval_seconds": DURATION_OR_ZERO, "evaluator.beacon_ignore_ports": _ports,
    "evaluator.dns_min_queries": _between(1, MAX_COUNT), "evaluator.dns_min_subdomains": _between(1, MAX_COUNT),
    "evaluator.dns_min_signals": _between(1, 4), "evaluator.dns_name_length": _between(1, 253),
    "evaluator.dns_label_entropy": _between(0, 8), "evaluator.dns_record_type_share": SHARE,
    "evaluator.dns_nxdomain_share": SHARE,
    "evaluator.flood_many_sources": _between(2, MAX_COUNT), "evaluator.source_flood_new_sources": _between(1, MAX_COUNT),
    "evaluator.threshold_max_change": _between(1, 1e6), "evaluator.calibration_min_expected": _between(0, 1e6),
    "blocklist.base_ttl_seconds": DURATION, "blocklist.max_ttl_seconds": DURATION,
    "blocklist.escalation": _between(1, 1000), "blocklist.max_new_per_evaluation": COUNT,
    "blocklist.max_entries": _between(1, 1 << 24), "blocklist.model_source_share": _between(0, 1),
    "blocklist.model_block_factor": FACTOR, "blocklist.model_source_surge": FACTOR,
    "blocklist.surge_baseline_rounds": _between(1, MAX_COUNT), "blocklist.allowlist": _networks,
    "blocklist.manual_remove_grace_seconds": DURATION_OR_ZERO, "blocklist.manual_ttl_seconds": DURATION,
    "blocklist.syn_limit_per_second": _between(1, MAX_COUNT), "blocklist.syn_limit_ttl_seconds": DURATION,
    "blocklist.peer_lookback_seconds": DURATION_OR_ZERO, "blocklist.ttl_tolerance": _between(0, 255),
    "blocklist.max_new_per_forged_flood": COUNT,
    "blocklist.rule_detectors": lambda v: None if set(v) <= set(RULE_DETECTORS) else
    "names unknown detectors " + ", ".join(repr(d) for d in v if d not in RULE_DETECTORS)
    + " (known: " + ", ".join(RULE_DETECTORS) + ")",
    "blocklist.simulate": lambda v: None if set(v) <= set(BLOCKING_DETECTORS) else
    "names detectors that never block " + ", ".join(repr(d) for d in v if d not in BLOCKING_DETECTORS)
    + " (detectors that can block: " + ", ".join(BLOCKING_DETECTORS) + ")",
    "alerts.cooldown_seconds": DURATION_OR_ZERO, "alerts.webhook_timeout": TIMEOUT,
    "alerts.webhook_retries": _between(0, 100), "alerts.smtp_port": _between(1, 65535),
    "alerts.smtp_timeout": TIMEOUT, "alerts.max_seconds": TIMEOUT,
    "alerts.syslog_facility": _one_of(*SYSLOG_FACILITIES),
    "alerts.webhook_url": lambda v: None if not v or v.startswith(("http://", "https://")) else
    "must start with http:// or https://",
    "metrics.file_name": lambda v: None if v.strip() and "/" not in v else "must be a file name (no /)",
    "reports.top_ports": _between(0, 1000), "reports.max_anomaly_figures": _between(0, 1000),
    "reports.since": lambda v: _since(v),
    "retention.keep_days": _above_up_to(0, 100 * 366),
    "crowdsec.timeout_seconds": TIMEOUT, "crowdsec.max_seconds": TIMEOUT, "crowdsec.resync_seconds": DURATION,
    "crowdsec.max_pending": _between(1, 10 ** 6),
    "fleet.aggregation": _one_of("trimmed-mean", "median", "krum", "fedavg"),
    "fleet.trim_fraction": _between(0, 0.49), "fleet.adopt_max_error_ratio": _above_up_to(1, 1e6),
    "fleet.adopt_budget_factor": FACTOR,
    "crowdsec.widest_prefix_ipv4": _between(0, 32), "crowdsec.widest_prefix_ipv6": _between(0, 128),
    "fleet.rounds": _between(1, 1000), "fleet.min_hosts": _between(1, 10 ** 6), "fleet.fraction": _above_up_to(0, 1),
    "fleet.round_timeout_seconds": _above_up_to(0, DAY), "fleet.interval_seconds": DURATION,
    "fleet.node_port": _between(1, 65535),
}


MAX_SINCE_SECONDS = 100 * YEAR


def _since(value: str) -> str | None:
    text = value.strip()
    if text.lower() in ("", "all"):
        return None
    try:
        durations.seconds(text, maximum=MAX_SINCE_SECONDS)
        return None
    except ValueError as exc:
        if "at most" in str(exc):
            return str(exc)
    try:
        datetime.fromisoformat(text)
        return None
    except ValueError:
        return "must be 'all', a span like 24h or 7d, or an ISO date/time"


def check(name: str, value) -> str | None:
    """What is wrong with ``value`` of setting ``name`` ("section.key"), or None: its rule, and for a number
    without one the general ceiling (finite, at most MAX_NUMBER in size)."""
    rule = RULES.get(name)
    why = rule(value) if rule else None
    if why is None and isinstance(value, (int, float)) and not isinstance(value, bool) and \
            not (abs(value) <= MAX_NUMBER):
        why = f"must be at most {MAX_NUMBER} in size"
    return why


def count_arg(low: int = 0, high: int = MAX_COUNT):
    """An argparse ``type=`` for a whole number flag within [low, high] (argparse names the flag, exit 2)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
        return value
    parse.__name__ = "count"
    return parse


def validate(settings) -> list[str]:
    """Every value out of range or of the wrong kind, as "config key 'k' = v must ... (source)"."""
    problems = []
    for section, key, value, source in settings.items():
        if source == "invalid":
            continue
        why = check(f"{section}.{key}", value)
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


# --- kinds, and the checks of whole sections --------------------------------------------------

class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key (every key, when several)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def coerce(name: str, default: Any, value: Any, from_env: bool) -> Any:
    """Convert ``value`` to the type of ``default``; raise ConfigError naming ``name``."""
    want = type(default)
    try:
        if want is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and str(value).strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if want is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if from_env:
                return int(str(value).strip())
            raise ValueError
        if want is float:
            if isinstance(value, bool):
                raise ValueError
            if name.endswith("_seconds") and (isinstance(value, str) or from_env):
                try:
                    return durations.seconds(value, allow_zero=True)
                except ValueError as exc:
                    raise ConfigError(f"config key {name!r} {exc}") from None
            if isinstance(value, (int, float)):
                number = float(value)
            elif from_env:
                number = float(str(value).strip())
            else:
                raise ValueError
            if not math.isfinite(number):
                raise ConfigError(f"config key {name!r} must be a finite number, got {value!r}")
            return number
        if want is list:
            if isinstance(value, list):
                return [str(v) for v in value]
            if from_env:
                return [v.strip() for v in str(value).split(",") if v.strip()]
            raise ValueError
        if want is str:
            if isinstance(value, str):
                return value
            raise ValueError
    except ConfigError:
        raise
    except ValueError:
        pass
    raise ConfigError(f"config key {name!r} must be {want.__name__}, got {value!r}")


def crowdsec_problems(crowdsec) -> list[str]:
    """One sentence per invalid value of a Crowdsec section (empty when it is valid or unused)."""
    out = []
    if crowdsec.lapi_url:
        from urllib.parse import urlsplit
        parts = urlsplit(crowdsec.lapi_url)
        try:
            parts.port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(f"crowdsec.lapi_url {crowdsec.lapi_url!r} must be http(s)://HOST[:PORT]")
        if not crowdsec.bouncer_key and not crowdsec.machine_id:
            out.append("crowdsec.lapi_url is set but neither crowdsec.bouncer_key (pull) nor "
                       "crowdsec.machine_id (push) is")
        if crowdsec.machine_id and not crowdsec.machine_password:
            out.append("crowdsec.machine_id is set without crowdsec.machine_password")
    for name in ("timeout_seconds", "max_seconds", "resync_seconds"):
        if not getattr(crowdsec, name) > 0:
            out.append(f"crowdsec.{name} must be a positive number of seconds")
    if crowdsec.max_pending < 1:
        out.append("crowdsec.max_pending must be at least 1")
    bad = [d for d in crowdsec.push_detectors if not d.replace("_", "").isalnum()]
    if bad:
        out.append(f"crowdsec.push_detectors holds names that are not detector names: {bad}")
    return out


def fleet_problems(fleet, role: str) -> list[str]:
    """One sentence per invalid value of a Fleet section for ``role`` 'serve' or 'node'."""
    out = []
    if role == "node" and not fleet.superlink:
        out.append("fleet.superlink is not set: give the coordinator's HOST:PORT")
    address = fleet.listen if role == "serve" else fleet.superlink
    host, _, port = address.rpartition(":")
    if address and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        out.append(f"fleet.{'listen' if role == 'serve' else 'superlink'} {address!r} must be HOST:PORT")
    if not fleet.insecure:
        need = ("ca_cert", "server_cert", "server_key") if role == "serve" else ("ca_cert",)
        for key in need:
            path = getattr(fleet, key)
            if not path:
                out.append(f"fleet.{key} is not set (TLS): give its PEM file, or fleet.insecure = true on a lab")
            elif not Path(path).is_file():
                out.append(f"fleet.{key} {path} does not exist")
    if fleet.rounds < 1 or fleet.min_hosts < 1:
        out.append("fleet.rounds and fleet.min_hosts must be at least 1")
    if not 0 < fleet.fraction <= 1:
        out.append("fleet.fraction must be in (0, 1]")
    if not (fleet.round_timeout_seconds > 0 and fleet.interval_seconds > 0):
        out.append("fleet.round_timeout_seconds and fleet.interval_seconds must be positive")
    return out
