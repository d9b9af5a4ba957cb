"""Typed settings: defaults < TOML file < PORTWATCH_* environment variables (README: Configuration).

One dataclass per section of the TOML file (top-level keys belong to "general"); :func:`load` builds the
effective :class:`Settings` and records where each value came from (``config show``). Every value is
checked at load by app/config_rules.py, which reports every problem at once (:class:`ConfigError`).
Imported by everything above app.errors; imports only app.resources and app.config_rules.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from app import resources
from app.config_rules import ConfigError, coerce, crowdsec_problems, fleet_problems, validate

DEFAULT_CONFIG_PATH = Path("/etc/portwatch/config.toml")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class General:
    db: str = "/var/lib/portwatch/ports.db"
    state_dir: str = "/var/lib/portwatch"        # models, sniffer temp files
    run_dir: str = "/run/portwatch"              # lock files (root-only, 0700)
    group: str = ""                              # group allowed to read the database, models, reports and logs
                                                 # (0640/0750); empty: root only (0600/0700)
    pin_root: str = "/sys/fs/bpf/portwatch"       # pins live in <pin_root>/<interface>/
    interface: str = ""                           # empty: the default-route interface
    log_level: str = "INFO"
    max_db_mb: float = 4096.0                    # `status` is unhealthy above this database size (MiB; 0: no limit)


def map_size_defaults(header: Path = resources.BPF_DIR / "common.h") -> dict[str, int]:
    """{'PORT_MAP_SIZE': 65536, ...}: the default map sizes, read from their one home in bpf/common.h."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^#define (\w+_MAP_SIZE) (\d+)$", header.read_text(), re.M)}


MAP_SIZE_DEFAULTS = map_size_defaults()
REPLY_IDLE_DEFAULT = int(re.search(r"^#define REPLY_IDLE_SECONDS (\d+)$", (resources.BPF_DIR / "common.h").read_text(),
                                   re.M).group(1))      # its one home too


@dataclass
class Collector:
    round_seconds: float = 60.0
    rounds: int = 1
    xdp_mode: str = "auto"                       # 'auto' (native, else generic), 'native', 'generic'
    fold_ephemeral: bool = True                  # fold unlistened ephemeral ports into one bucket per protocol
    top_flows: int = 200                         # flows kept per round by bytes
    many_ports_threshold: int = 10               # a source reaching this many local ports keeps all its flows/ports
    max_run_seconds: float = 0.0                 # 0: rounds * round_seconds + 60
    # kernel map sizes (-D flags at compile time; a change reloads the program)
    port_map_size: int = MAP_SIZE_DEFAULTS["PORT_MAP_SIZE"]
    source_map_size: int = MAP_SIZE_DEFAULTS["SOURCE_MAP_SIZE"]
    srcport_map_size: int = MAP_SIZE_DEFAULTS["SRCPORT_MAP_SIZE"]
    flow_map_size: int = MAP_SIZE_DEFAULTS["FLOW_MAP_SIZE"]
    blacklist_map_size: int = MAP_SIZE_DEFAULTS["BLACKLIST_MAP_SIZE"]
    conn_map_size: int = MAP_SIZE_DEFAULTS["CONN_MAP_SIZE"]        # conversations this host opened (answers pass)
    synack_map_size: int = MAP_SIZE_DEFAULTS["SYNACK_MAP_SIZE"]    # SYN-ACKs this host sent (handshake proofs)
    scanner_map_size: int = MAP_SIZE_DEFAULTS["SCANNER_MAP_SIZE"]  # promoted scanners (never evicted)
    reply_idle_seconds: float = float(REPLY_IDLE_DEFAULT)   # an opened conversation idle longer is not answered (whole s)
    extra_cflags: str = ""                       # more -D flags for the XDP build (a change reloads it)


@dataclass
class Scanner:
    enabled: bool = True


@dataclass
class Sniffer:
    enabled: bool = True
    window_fraction: float = 0.75                # 45 s of a 60 s round
    max_packets: int = 5000
    bpf_filter: str = ""                         # capture filter (tshark -f)
    tshark_path: str = ""                        # empty: found on PATH or in /usr/bin
    drain_seconds: float = 2.0                   # after the window, tshark may flush this long before it is killed
    store_payload: bool = False


@dataclass
class Evaluator:
    window: int = 15                             # rounds per window
    warmup_rounds: int = 360                     # 6 h of minute rounds before the model may raise anything
    alert_budget_per_day: float = 1.0            # expected false model alerts per day, whole host
    keep_models: int = 5
    epochs: int = 8
    refit_epochs: int = 2
    batch_size: int = 128
    max_ports: int = 2000
    min_active_share: float = 0.1                # unheld ports need traffic in this share of a batch's rounds
    seed: int = 0
    max_batch_rounds: int = 1440                 # rounds judged per run; older backlogs take several runs
    train_stride: int = 3                        # rounds between training windows' ends
    max_train_windows: int = 20000               # random subsample above this per fit
    min_train_steps: int = 500                   # gradient steps at least, on a first fit (small hosts)
    holdout_fraction: float = 0.2                # normal windows kept out of training to calibrate
    calibration_windows: int = 4000              # held-out windows kept with the model
    lstm_units: int = 32
    bottleneck: int = 8
    top_features: int = 5                        # features named in a model anomaly's reasons
    scan_ports: int = 25                         # distinct local ports ...
    scan_span_seconds: float = 300.0             # ... within this span (Zeek's default: 25 in 5 min)
    syn_flood_syns: int = 200                    # SYNs per round on one port ...
    syn_flood_completion: float = 0.2            # ... with fewer than this share answered (non-SYN packets per SYN)
    unlistened_min_packets: int = 1              # packets in a batch to a port nothing holds
    # what leaves the host (app/services/evaluation/outbound_rules.py, dns_rules.py): these findings alert, never block
    outbound_scan_ports: int = 25                # remote ports of one address this host opened within scan_span_seconds
    outbound_scan_addresses: int = 100           # remote addresses this host opened connections to within the span
                                                 # (a busy browser opens dozens in 5 min: set above what it does)
    exfiltration_min_bytes: int = 20_000_000     # bytes out to one address (a round, or the batch) at least ...
    exfiltration_factor: float = 10.0            # ... and this many times the usual rate (the address's, else the host's)
    exfiltration_baseline_seconds: float = 86400.0  # the usual rates: rounds in this span before the batch
    exfiltration_min_history_rounds: int = 30    # rounds an address needs in the baseline for its own usual rate
    exfiltration_warmup_rounds: int = 30         # rounds in the baseline span before exfiltration raises anything
    beacon_span_seconds: float = 7200.0          # connections to one address looked at, back from the batch's end
    beacon_min_connections: int = 8              # connections (distinct outbound flow starts) at least ...
    beacon_min_rounds: int = 4                   # ... spread over this many rounds at least
    beacon_max_cv: float = 0.1                   # inter-arrival standard deviation / mean at most
    beacon_min_interval_seconds: float = 5.0     # mean inter-arrival at least (bursts are not beacons)
    beacon_ignore_ports: list = field(default_factory=lambda: [53, 123])  # remote ports of periodic protocols (DNS, NTP)
    beacon_warmup_rounds: int = 30               # rounds in the beaconing span before beaconing raises anything
    dns_min_queries: int = 50                    # queries from one client for one registered domain in a batch ...
    dns_min_subdomains: int = 30                 # ... naming this many distinct names below it
    dns_min_signals: int = 2                     # ... with at least this many of the four signals below:
    dns_name_length: float = 40.0                # mean query name length (characters)
    dns_label_entropy: float = 3.5               # mean Shannon entropy of the names' subdomain part (bits per character)
    dns_record_type_share: float = 0.5           # share of TXT/NULL/CNAME questions
    dns_nxdomain_share: float = 0.5              # share of responses that are NXDOMAIN
    flood_many_sources: int = 100                # a SYN flood from this many sources, none dominant: judged forged
    source_flood_new_sources: int = 5000         # new sources in one round that make a source_flood finding
    threshold_max_change: float = 2.0            # one refit moves the model's threshold at most x/÷ this factor
    calibration_min_expected: float = 1.0        # the model alerts only once its held-out pool is big enough to
                                                 # expect this many false alerts at the budget's rate (0: at once)
    report_after: bool = True


@dataclass
class Blocklist:
    enabled: bool = True
    dry_run: bool = False
    base_ttl_seconds: float = 3600.0
    max_ttl_seconds: float = 7 * 86400.0
    escalation: float = 2.0
    max_new_per_evaluation: int = 20
    max_entries: int = 10000
    model_source_share: float = 0.5              # a source with this share of an anomalous port's packets is blocked
    model_block_factor: float = 2.0              # ... when the model's score is at least this many times its threshold
                                                 # (weaker model findings alert only: blocking needs stronger evidence)
    model_source_surge: float = 3.0              # ... and the source itself sent this many times its usual rate
    surge_baseline_rounds: int = 60              # rounds before the anomaly that make a source's usual rate
    allowlist: list = field(default_factory=list)  # CIDR prefixes never blocked automatically
    manual_remove_grace_seconds: float = 86400.0
    manual_ttl_seconds: float = 7 * 86400.0       # `blacklist add` without --ttl
    rule_detectors: list = field(default_factory=lambda: ["port_scan", "syn_flood"])  # rule findings that block their source
    simulate: list = field(default_factory=list)  # detectors whose blocks are recorded as would-block, not enforced
    # optional per-port SYN rate limit in XDP (app/services/kernel/synlimit.py); off unless enabled
    syn_limit_enabled: bool = False
    syn_limit_per_second: int = 100              # SYNs per second to one port let through; the rest are dropped
    syn_limit_ttl_seconds: float = 3600.0        # a limit expires like a block
    egress_block_enabled: bool = False           # may destinations be blocked in TC egress (enforcement fills eg_block)
    egress_detectors: list = field(default_factory=lambda: ["outbound_scan", "exfiltration", "beaconing"])
                                                 # outbound findings that block their destination (only with the switch on)
    peer_lookback_seconds: float = 86400.0       # a two-way peer within this span is never blocked on one-way evidence
    ttl_tolerance: int = 2                       # one-way evidence whose IP TTL leaves the source's usual range by more: forged
    max_new_per_forged_flood: int = 0            # blocklist entries one SYN flood judged forged may add
    model_needs_corroboration: bool = True       # a model finding blocks a source only when a rule finding of
                                                 # the same evaluation names it, not forged (else it alerts only)


@dataclass
class Alerts:
    cooldown_seconds: float = 3600.0
    webhook_url: str = ""
    webhook_timeout: float = 5.0
    webhook_retries: int = 2
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = True
    mail_from: str = ""
    mail_to: str = ""
    syslog: bool = False
    syslog_address: str = "/dev/log"             # a unix socket path, or host:port (UDP)
    syslog_facility: str = "daemon"
    smtp_password_file: str = ""                 # read the SMTP password from this file (e.g. a container secret)
    smtp_cafile: str = ""                        # CA bundle to verify the SMTP server (empty: the system's)
    smtp_timeout: float = 10.0                   # seconds per SMTP connection (within max_seconds)
    max_seconds: float = 20.0                    # total time one send_alerts call may take, all channels


@dataclass
class Metrics:
    textfile_dir: str = ""                       # e.g. /var/lib/prometheus/node-exporter
    file_name: str = "portwatch.prom"            # one file shared by all jobs (label task="<job>")


@dataclass
class Reports:
    out_dir: str = "/var/lib/portwatch/reports"
    top_ports: int = 6
    since: str = "7d"                            # default report window: ISO time, relative (24h, 7d) or "all"
    max_anomaly_figures: int = 12                # per-feature contribution figures, most recent model anomalies


@dataclass
class Retention:
    keep_days: float = 14.0


@dataclass
class Crowdsec:
    """A CrowdSec Local API shared by many hosts (app/services/fleet/crowdsec.py). Empty lapi_url: off."""
    lapi_url: str = ""                           # http://127.0.0.1:8080 (https with ca_file for a remote LAPI)
    bouncer_key: str = ""                        # pull: `cscli bouncers add portwatch-<host>` (ONE key per host)
    machine_id: str = ""                         # push: `cscli machines add <id> --password ...`; empty: no push
    machine_password: str = ""
    push_detectors: list = field(default_factory=lambda: ["port_scan", "syn_flood"])  # 'manual' pushes hand blocks
    timeout_seconds: float = 2.0                 # per HTTP request
    max_seconds: float = 5.0                     # all LAPI work in one collector round
    max_pending: int = 1000                      # pushes queued while the LAPI is unreachable (oldest dropped)
    resync_seconds: float = 3600.0               # a full decision list (startup=true) at least this often
    ca_file: str = ""                            # CA bundle for an https LAPI (empty: the system's)
    widest_prefix_ipv4: int = 16                 # a decision on a wider range (a shorter prefix) is refused
    widest_prefix_ipv6: int = 32                 # ... and for IPv6

    def problems(self) -> list[str]:
        """One sentence per invalid value (empty when the section is valid or unused)."""
        return crowdsec_problems(self)


@dataclass
class Fleet:
    """The federated model (Flower; app/services/fleet/flower.py): coordinator and per-host node."""
    superlink: str = ""                          # node: the coordinator's SuperLink as HOST:PORT
    listen: str = "0.0.0.0:9092"                 # serve: where the SuperLink's API listens
    rounds: int = 1                              # federation rounds per federation
    min_hosts: int = 2                           # hosts that must take part in a round
    fraction: float = 1.0                        # share of the connected hosts asked to train each round
    round_timeout_seconds: float = 600.0         # a round waits this long for the hosts' replies
    interval_seconds: float = 86400.0            # serve: one federation this often
    ca_cert: str = ""                            # the CA that signed the SuperLink's certificate (both sides)
    server_cert: str = ""                        # serve: the SuperLink's certificate (PEM) ...
    server_key: str = ""                         # ... and key
    insecure: bool = False                       # no TLS (tests on the loopback only; never across hosts)
    node_port: int = 9094                        # node: its local Runtime API on 127.0.0.1
    aggregation: str = "trimmed-mean"            # serve: trimmed-mean, median, krum or fedavg (aggregation.py)
    trim_fraction: float = 0.25                  # serve: trimmed-mean drops this share each side (>= 1 host)
    adopt_max_error_ratio: float = 3.0           # node: a fleet model erring more than this x the local one on
                                                 # this host's recent benign windows is kept, not adopted
    adopt_budget_factor: float = 2.0             # node: ... or raising more false alerts a day there than this
                                                 # x evaluator.alert_budget_per_day

    def problems(self, role: str) -> list[str]:
        """One sentence per invalid value for ``role`` 'serve' or 'node'."""
        return fleet_problems(self, role)


SECTIONS: dict[str, type] = {
    "general": General, "collector": Collector, "scanner": Scanner, "sniffer": Sniffer,
    "evaluator": Evaluator, "blocklist": Blocklist, "alerts": Alerts, "metrics": Metrics,
    "reports": Reports, "retention": Retention, "crowdsec": Crowdsec,
    "fleet": Fleet,
}


@dataclass
class Settings:
    general: General = field(default_factory=General)
    collector: Collector = field(default_factory=Collector)
    scanner: Scanner = field(default_factory=Scanner)
    sniffer: Sniffer = field(default_factory=Sniffer)
    evaluator: Evaluator = field(default_factory=Evaluator)
    blocklist: Blocklist = field(default_factory=Blocklist)
    alerts: Alerts = field(default_factory=Alerts)
    metrics: Metrics = field(default_factory=Metrics)
    reports: Reports = field(default_factory=Reports)
    retention: Retention = field(default_factory=Retention)
    crowdsec: Crowdsec = field(default_factory=Crowdsec)
    fleet: Fleet = field(default_factory=Fleet)
    # "section.key" -> "default" | "file:<path>" | "env:<NAME>" | "command line"
    sources: dict = field(default_factory=dict)
    config_path: str | None = None

    def items(self):
        """Yield (section, key, value, source) for every setting."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                name = f"{section}.{f.name}"
                yield section, f.name, getattr(obj, f.name), self.sources.get(name, "default")

    def override(self, section: str, key: str, value: Any, source: str = "command line") -> None:
        """Set one value (from the command line); ``None`` leaves the setting as it is. A value out of the
        key's range raises ConfigError naming the flag (``--round-seconds`` for collector.round_seconds)."""
        if value is None:
            return
        from app.config_rules import check
        why = check(f"{section}.{key}", value)
        if why:
            name = f"--{key.replace('_', '-')}" if source == "command line" else f"config key '{section}.{key}'"
            raise ConfigError(f"{name} {value!r} {why}")
        setattr(getattr(self, section), key, value)
        self.sources[f"{section}.{key}"] = source

    @property
    def state_path(self) -> Path:
        return Path(self.general.state_dir)


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the effective settings.

    ``path``: a TOML file; None uses ``$PORTWATCH_CONFIG`` or /etc/portwatch/config.toml when present.
    An explicitly named file that does not exist is an error; the default one may be absent.
    Every problem (unknown key, wrong type, out of range) is collected; one ConfigError lists them all.
    """
    environ = os.environ if environ is None else environ
    settings = Settings()
    explicit = path is not None or "PORTWATCH_CONFIG" in environ
    cfg_path = Path(path if path is not None else environ.get("PORTWATCH_CONFIG", DEFAULT_CONFIG_PATH))
    data: dict = {}
    if cfg_path.exists():
        try:
            with open(cfg_path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {cfg_path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start}): save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"config file {cfg_path} cannot be read: {exc.strerror}") from None
        settings.config_path = str(cfg_path)
    elif explicit:
        raise ConfigError(f"config file {cfg_path} does not exist")

    problems: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                problems.append(f"unknown config section [{key}] in {cfg_path}")
                continue
            for sub, subval in value.items():
                _apply(settings, key, sub, subval, f"file:{cfg_path}", False, problems)
        else:
            _apply(settings, "general", key, value, f"file:{cfg_path}", False, problems)

    known_env = set()
    for section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            names = [f"PORTWATCH_{section.upper()}_{f.name.upper()}"]
            if section == "general":
                names.insert(0, f"PORTWATCH_{f.name.upper()}")
            for env_name in names:
                known_env.add(env_name)
                if env_name in environ:
                    _apply(settings, section, f.name, environ[env_name], f"env:{env_name}", True, problems)
    for env_name in environ:
        if env_name.startswith("PORTWATCH_") and env_name not in known_env and env_name != "PORTWATCH_CONFIG":
            problems.append(f"unknown environment setting {env_name}")
    problems += validate(settings)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the configuration: " + "; ".join(problems), problems)
    return settings


def _apply(settings: Settings, section: str, key: str, value: Any, source: str, from_env: bool,
           problems: list[str]) -> None:
    obj = getattr(settings, section)
    names = {f.name: f for f in dataclasses.fields(obj)}
    if key not in names:
        where = key if section == "general" else f"{section}.{key}"
        problems.append(f"unknown config key {where!r} ({source})")
        return
    default = getattr(SECTIONS[section](), key)
    try:
        setattr(obj, key, coerce(f"{section}.{key}", default, value, from_env))
    except ConfigError as exc:
        problems.append(f"{exc} ({source})")
        settings.sources[f"{section}.{key}"] = "invalid"   # the default stays; validate() skips it
        return
    settings.sources[f"{section}.{key}"] = source
