"""Prometheus text-format metrics for node_exporter's textfile collector.

Every job (``collector``, ``evaluator``, ``cleanup``, ...) calls :func:`write_metrics` at the end of a
run (or wraps the run in :func:`job_metrics`); all share ONE file (``metrics.textfile_dir`` /
``metrics.file_name``), the job in the ``task`` label, each write a read-merge-write under an flock
(:func:`_update`). The samples are COUNTERS, GAUGES, RUN_METRICS, the health checks and FLEET_GAUGES;
the README's metrics lines list them. Writing metrics never fails a run: problems are logged.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


log = logging.getLogger(__name__)

PREFIX = "portwatch_"
LABEL = "task"

# values written by callers: key -> help text (counters are added up across runs)
COUNTERS = {
    "rounds": "Rounds written to the database.",
    "packets": "Packets counted by the XDP program in the rounds written.",
    "bytes": "Frame bytes counted by the XDP program in the rounds written.",
    "dropped_packets": "Packets dropped by the XDP blocklist, as counted in the rounds written.",
    "unparsed_packets": "Packets the XDP program could not parse (passed, never dropped).",
    "anomalies": "Anomalies raised by the evaluator (model and rules).",
    "blocks": "Blocklist entries added.",
    "alerts": "Alerts delivered (all channels).",
    "alert_failures": "Alerts that could not be delivered.",
    "deleted_rounds": "Rounds deleted by retention.",
    "deleted_packets": "Sniffer packets deleted by retention.",
}
GAUGES = {
    "blocklist_entries": "Blocklist entries in force after the last run.",
    "database_bytes": "Size of the SQLite database with its WAL, in bytes.",
    "model_version": "Version of the active model.",
    "threshold": "Anomaly threshold of the active model (reconstruction error).",
    "windows": "Windows scored by the last evaluation.",
    "listeners": "Local ports with a listener in the last round.",
    "sources": "Distinct source addresses in the last round.",
    "health_check": "1 when the health check named in 'check' passed, 0 when it failed, NaN when unknown.",
    "healthy": "1 when every health check passed (python -m app status exits 0), else 0.",
}
FLEET_GAUGES = {
    "fleet_model_version": "Version of the latest model adopted from the fleet (NaN: none yet).",
    "fleet_last_contribution_timestamp_seconds": "Unix time this host last took part in a federation (NaN: never).",
    "fleet_models": "Model versions in this host's database by origin (local or fleet).",
    "fleet_hosts": "Hosts in the coordinator's last federation (NaN: not the coordinator).",
    "fleet_superlink_up": "1 when the fleet coordinator's SuperLink accepted a connection, else 0.",
    "crowdsec_pulled_total": "Decisions pulled from the CrowdSec LAPI (all rounds).",
    "crowdsec_pushed_total": "Alerts with a decision accepted by the CrowdSec LAPI (all rounds).",
    "crowdsec_dropped_total": "Queued pushes dropped because the queue was full (crowdsec.max_pending).",
    "crowdsec_pending": "Pushes waiting for the CrowdSec LAPI.",
    "crowdsec_decisions": "LAPI ban decisions mirrored here.",
    "crowdsec_enforced": "Blocklist entries in force of origin crowdsec.",
    "crowdsec_refused": "Mirrored LAPI decisions refused by an interlock.",
    "crowdsec_lapi_up": "0 when the last CrowdSec sync ended in an error (the LAPI down), else 1.",
    "crowdsec_last_pull_timestamp_seconds": "Unix time of the last successful pull from the LAPI (NaN: never).",
    "crowdsec_last_push_timestamp_seconds": "Unix time of the last successful push to the LAPI (NaN: never).",
}
HEALTH_JOB = "health"        # the samples write_health replaces (they carry no task label)
RUN_METRICS = {
    "runs_total": ("counter", "Runs of the job."),
    "run_failures_total": ("counter", "Runs of the job that failed."),
    "run_duration_seconds": ("gauge", "Duration of the job's last run in seconds."),
    "last_run_timestamp_seconds": ("gauge", "Unix time the job's last run ended."),
    "last_success_timestamp_seconds": ("gauge", "Unix time the job's last successful run ended."),
    "last_run_success": ("gauge", "1 when the job's last run succeeded, else 0."),
}
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_JOB = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


def metric_name(key: str) -> tuple[str, str, str]:
    """(full name, type, help) for a value key or a run metric."""
    if key in RUN_METRICS:
        kind, help_text = RUN_METRICS[key]
        return PREFIX + key, kind, help_text
    if key in COUNTERS:
        return f"{PREFIX}{key}_total", "counter", COUNTERS[key]
    if key in GAUGES:
        return PREFIX + key, "gauge", GAUGES[key]
    if key in FLEET_GAUGES:
        return PREFIX + key, "counter" if key.endswith("_total") else "gauge", FLEET_GAUGES[key]
    if key.endswith("_total"):
        return PREFIX + key, "counter", f"portwatch {key[:-6].replace('_', ' ')} (accumulated across runs)."
    return PREFIX + key, "gauge", f"portwatch {key.replace('_', ' ')} (last run)."


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted label pairs): value} from Prometheus text (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    except ValueError as exc:          # a hand-edited or truncated file: start over rather than fail the run
        log.warning("ignoring the unreadable metrics textfile (%s)", exc)
        return {}
    return samples


class _Samples:
    """A prometheus_client collector over merged samples: each family once, HELP and TYPE first."""

    def __init__(self, samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]):
        self.samples = samples

    def collect(self):
        from prometheus_client.core import Metric
        families: dict[str, list] = {}
        for (name, labels), value in self.samples.items():
            families.setdefault(name, []).append((labels, value))
        for name in sorted(families):
            key = name[len(PREFIX):] if name.startswith(PREFIX) else name
            if key.endswith("_total") and key[:-6] in COUNTERS:
                key = key[:-6]
            _, kind, help_text = metric_name(key)
            family = Metric(name[:-6] if kind == "counter" and name.endswith("_total") else name, help_text, kind)
            for labels, value in sorted(families[name], key=lambda item: item[0]):
                family.add_sample(name, dict(labels), value)
            yield family


def render(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    """Prometheus text format of ``samples`` (prometheus_client's exposition)."""
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Samples(samples))
    return generate_latest(registry).decode()


def _write(path: Path, samples) -> None:
    from prometheus_client import CollectorRegistry, write_to_textfile
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Samples(samples))
    write_to_textfile(str(path), registry)
    os.chmod(path, 0o644)           # node_exporter runs as its own user; the counts name no address


def _merge(previous: dict, job: str, values: Mapping[str, float], duration_seconds: float | None,
           success: bool, now: float) -> dict:
    labels = ((LABEL, job),)
    samples = {k: v for k, v in previous.items() if dict(k[1]).get(LABEL) != job}
    mine = {k: v for k, v in previous.items() if dict(k[1]).get(LABEL) == job}

    def put(key: str, value: float, accumulate: bool) -> None:
        name, kind, _ = metric_name(key)
        if accumulate or kind == "counter":
            value = mine.get((name, labels), 0.0) + value
        samples[(name, labels)] = value

    for key, value in values.items():
        if not _NAME.match(key):
            raise ValueError(f"metric key {key!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise ValueError(f"metric {key!r} must be a number, got {value!r}")
        put(key, float(value), accumulate=False)
    put("runs_total", 1, accumulate=True)
    put("run_failures_total", 0 if success else 1, accumulate=True)
    if duration_seconds is not None:
        samples[(PREFIX + "run_duration_seconds", labels)] = float(duration_seconds)
    samples[(PREFIX + "last_run_timestamp_seconds", labels)] = float(now)
    samples[(PREFIX + "last_run_success", labels)] = 1.0 if success else 0.0
    last_ok = (PREFIX + "last_success_timestamp_seconds", labels)
    if success:
        samples[last_ok] = float(now)
    elif last_ok in mine:
        samples[last_ok] = mine[last_ok]
    # what this run did not mention keeps its last value (counters their totals)
    for key, value in mine.items():
        samples.setdefault(key, value)
    return samples


def write_metrics(settings, job: str, values: Mapping[str, float] | None = None, *,
                  duration_seconds: float | None = None, success: bool = True, now: float | None = None) -> Path | None:
    """Merge this run's metrics for ``job`` into the textfile; return its path, or None when
    ``metrics.textfile_dir`` is not set or the file could not be written (logged).

    values: {key: number}; keys in COUNTERS are added to their ``_total`` counter, other keys are
    gauges holding the last value. ``success`` False keeps the last success timestamp as it was.
    """
    if not _JOB.match(job):
        raise ValueError(f"job name {job!r} must match [a-zA-Z0-9_.-]{{1,64}}")
    now = time.time() if now is None else now
    path = _update(settings, lambda previous: _merge(previous, job, dict(values or {}), duration_seconds,
                                                      success, now))
    if path is not None:
        log.debug("metrics for %s written to %s", job, path)
    return path


def _update(settings, change) -> Path | None:
    """Read the textfile's samples, ``change(samples) -> samples``, write them back, all under the
    flock of the hidden lock file beside it (the one read-merge-write of every writer). None when
    ``metrics.textfile_dir`` is not set or the file could not be written (logged).

    Each writer replaces only its own samples and renames a new file over the old one (:func:`_write`),
    so node_exporter never sees a half-written file and two jobs never lose each other's samples.
    Samples are ``portwatch_<counter>_total`` and ``portwatch_<gauge>`` per task, run counts, durations
    and timestamps; the health checks (:func:`write_health`) and the fleet's gauges (:func:`write_fleet`)
    carry no ``task``."""
    directory = getattr(settings.metrics, "textfile_dir", "")
    if not directory:
        return None
    path = Path(directory) / (getattr(settings.metrics, "file_name", "portwatch.prom") or "portwatch.prom")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                previous = parse_samples(path.read_text())
            except FileNotFoundError:
                previous = {}
            _write(path, change(previous))
    except OSError as exc:
        log.warning("cannot write metrics to %s: %s (metrics.textfile_dir)", path, exc.strerror or exc)
        return None
    return path


def _replace(settings, drop, new: Mapping) -> Path | None:
    """Drop the samples ``drop(name)`` selects from the textfile and add ``new`` (see :func:`_update`)."""
    def change(samples: dict) -> dict:
        kept = {k: v for k, v in samples.items() if not drop(k[0])}
        kept.update(new)
        return kept
    return _update(settings, change)


def write_health(settings, health) -> Path | None:
    """Replace the health samples (app.services.ops.health.Health) in the textfile; None when
    metrics.textfile_dir is not set or the file could not be written (logged)."""
    from app.services.ops.health import metric_values
    new = {(PREFIX + key, (("check", check),)): value for (key, check), value in metric_values(health).items()}
    new[(PREFIX + "healthy", ())] = 1.0 if health.healthy else 0.0
    return _replace(settings, lambda name: name in (PREFIX + "health_check", PREFIX + "healthy"), new)


def write_fleet(settings, values: Mapping[str, float], keep_missing: bool = True) -> Path | None:
    """Write the fleet samples ``values`` ({FLEET_GAUGES key, or (key, ((label, value), ...)): number}).
    keep_missing: a fleet metric not in ``values`` keeps its last sample (the collector writes the
    CrowdSec ones only, ``fleet status`` all of them)."""
    new = {}
    for key, value in values.items():
        key, labels = key if isinstance(key, tuple) else (key, ())
        if key not in FLEET_GAUGES:
            raise ValueError(f"unknown fleet metric {key!r}")
        new[(PREFIX + key, tuple(sorted(labels)))] = float("nan") if value is None else float(value)
    names = {name for name, _ in new}
    fleet = tuple(PREFIX + k for k in FLEET_GAUGES)
    return _replace(settings, lambda name: name in names or (not keep_missing and name in fleet), new)


@contextmanager
def job_metrics(settings, job: str) -> Iterator[dict]:
    """Time a run and write its metrics at the end, failed or not::

        with job_metrics(settings, "collector") as values:
            values["rounds"] = 1
            values["packets"] = summary.total_packets

    An exception marks the run failed (last success timestamp unchanged) and propagates.
    """
    values: dict = {}
    started = time.monotonic()
    try:
        yield values
    except BaseException:
        write_metrics(settings, job, values, duration_seconds=time.monotonic() - started, success=False)
        raise
    write_metrics(settings, job, values, duration_seconds=time.monotonic() - started, success=True)
