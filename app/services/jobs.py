"""The job around one evaluation: evaluate, then block, alert, measure and report.

`python -m app evaluate` (and app/port_detector.py under cron, hourly) runs :func:`run`; a replay runs
the same job at capture-time boundaries (:class:`ClosedLoop`). It sits above the evaluation, blocklist
and ops services it strings together; like every service it never imports threads or commands.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.db import blacklist as blacklist_db
from app.db.connection import connect
from app.errors import PortwatchError

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    evaluation: object                      # evaluation.EvaluationResult
    decisions: list = field(default_factory=list)
    report: Path | None = None
    alerts: dict | None = None              # a replay's alerts: {"written": n, "suppressed": n} (never sent)
    alerts_path: Path | None = None

    def as_dict(self) -> dict:
        """What ``evaluate --json`` prints: the evaluation, its findings (id, detector, summary), the
        block decisions and the report written (times: Unix seconds)."""
        e = self.evaluation
        return {"evaluation_id": e.evaluation_id, "status": e.status, "rounds": [e.first_round_id, e.last_round_id],
                "round_count": e.rounds, "ports": e.ports, "windows": e.windows, "model_version": e.model_version,
                "trained_version": e.trained_version, "threshold": e.threshold, "duration_seconds": e.duration_s,
                "remaining_rounds": e.remaining_rounds, "summary": e.summary(),
                "anomalies": [{"id": f.id, "detector": f.detector, "port": f.port, "protocol": f.protocol,
                               "source": f.source, "summary": f.summary} for f in e.anomalies],
                "decisions": [{"address": d.address, "action": d.action, "reason": d.reason,
                               "anomaly_id": d.anomaly_id, "expires_at": d.expires_at,
                               "detail": getattr(d, "detail", "")} for d in self.decisions],
                "report": str(self.report) if self.report else None,
                "replayed_alerts": self.alerts and dict(self.alerts, path=str(self.alerts_path))}

    def lines(self) -> list[str]:
        out = [self.evaluation.summary()]
        blocked = [d for d in self.decisions if d.action == "block"]
        would = [d for d in self.decisions if d.action == "would-block"]
        refused = [d for d in self.decisions if d.action == "refused"]
        if blocked:
            out.append("blocked: " + ", ".join(f"{d.address} ({d.reason})" for d in blocked))
        if would:
            out.append("would block (dry run): " + ", ".join(d.address for d in would))
        if refused:
            out.append("not blocked: " + ", ".join(f"{d.address} ({d.detail})" for d in refused))
        if self.report:
            out.append(f"report: {self.report}")
        if self.alerts and (self.alerts["written"] or self.alerts["suppressed"]):
            out.append(f"alerts (replayed, never sent): {self.alerts['written']} written to {self.alerts_path}"
                       + (f", {self.alerts['suppressed']} within the cooldown" if self.alerts["suppressed"] else ""))
        return out


def run(settings) -> JobResult:
    """One evaluation job:

    1. ``evaluation.run``: rules + model over the rounds not yet evaluated (stores the findings);
    2. ``decisions.after_evaluation``: block decisions from those same findings objects, enforced on
       every pinned map;
    3. ``alerts.send_alerts``: one event per new finding and per block decision (cooldown-suppressed);
    4. ``metrics.write_metrics``: the evaluator's Prometheus textfile metrics;
    5. ``reports.write_report`` when ``evaluator.report_after`` is on.

    Steps 3–5 never fail the job: their problems are logged (the anomalies and blocks are already stored)."""
    from app.services.blocklist import decisions
    from app.services.evaluation import evaluation
    from app.services import store_clock
    from app.services.ops import alerts, metrics
    started = time.monotonic()
    clock = store_clock.clock(settings.general.db)      # a replayed store is judged in its capture's time
    result = evaluation.run(settings, clock=clock)
    job = JobResult(result)
    conn = connect(settings.general.db, create=False)
    try:
        if settings.blocklist.enabled and result.evaluation_id is not None:
            job.decisions, _ = decisions.after_evaluation(conn, settings, result.anomalies, clock())
        events = alert_events(job)
        if events:
            alerts.send_alerts(conn, settings, events)
        values = {"anomalies": len(result.anomalies), "windows": result.windows or 0,
                  "blocks": sum(1 for d in job.decisions if d.action == "block"),
                  "blocklist_entries": blacklist_db.count_status(conn, "active")}
        if result.model_version is not None:
            values["model_version"] = result.model_version
        if result.threshold is not None:
            values["threshold"] = result.threshold
        metrics.write_metrics(settings, "evaluator", values, duration_seconds=time.monotonic() - started)
        if settings.metrics.textfile_dir:
            from app.services.ops import health
            metrics.write_health(settings, health.check(settings))
    finally:
        conn.close()
    if settings.evaluator.report_after and result.status in ("ok", "warm-up"):     # a report during warm-up too
        try:
            from app.services.ops.reports import write_report
            job.report = write_report(settings.general.db, settings.reports.out_dir, settings.reports.since,
                                      top_ports=settings.reports.top_ports,
                                      max_anomaly_figures=settings.reports.max_anomaly_figures, now=clock())
        except (PortwatchError, OSError, sqlite3.Error) as exc:
            log.warning("the report after this evaluation failed: %s", exc)
    return job


def alert_events(job: JobResult) -> list:
    """The alerts.AlertEvent of a job: one per new finding and one per block decision."""
    from app.services.ops import alerts
    events = [alerts.anomaly_event(f) for f in job.evaluation.anomalies]
    return events + [alerts.block_event(d.address, d.reason, expires_at=d.expires_at, dry_run=d.action == "would-block")
                     for d in job.decisions if d.action in ("block", "would-block")]


class ClosedLoop:
    """A replay's evaluations at capture-time boundaries (``python -m app replay --evaluate-every``).

    Called after every replayed round with the store's clock (the round's end, capture time): the
    blocklist's expiries are reconciled with the replay's own map at that time; every ``every_seconds``
    of capture time (and after the last round) the rounds so far are evaluated and the decisions enforced
    on the maps under ``settings.general.pin_root`` — the replay's private pins, never the host's. Every
    time-dependent step (TTL expiry, peer look-back, "now" of findings, blocks and alerts) reads the same clock.

    What would have been alerted is written, never sent: JSON lines in ``alerts_path`` (default: beside the
    store, ``<db>.replay-alerts.jsonl``), each marked ``"replayed": true`` with the capture's name, and the
    store's cooldown ledger (channel ``replay``). The host's webhook, mail and syslog are never called and
    no metrics textfile is written: node_exporter would publish a replay's figures as the host's own.
    """

    def __init__(self, every_seconds: float, capture: str = "", alerts_path: Path | None = None):
        self.every_seconds = every_seconds
        self.capture = capture
        self.alerts_path = alerts_path
        self.next_at: float | None = None
        self.jobs: list[JobResult] = []

    def __call__(self, conn, settings, start: float, now: float, last: bool = False) -> None:
        """After the round (start, now] (capture-time Unix seconds); ``last``: the capture's last round."""
        from app.services.kernel import enforcement
        from app.services.collector.replay import INTERFACE
        enforcement.reconcile(conn, settings, Path(settings.general.pin_root) / INTERFACE, now)
        if self.next_at is None:
            self.next_at = start + self.every_seconds
        if now >= self.next_at or last:
            from app.services.ops import alerts
            job = run_at(conn, settings, now)
            self.alerts_path = self.alerts_path or Path(f"{settings.general.db}.replay-alerts.jsonl")
            job.alerts = alerts.record_replayed(conn, settings, alert_events(job), self.alerts_path, self.capture, now)
            job.alerts_path = self.alerts_path
            self.jobs.append(job)
            while self.next_at <= now:
                self.next_at += self.every_seconds


def run_at(conn, settings, now: float) -> JobResult:
    """One evaluation judged at store time ``now``, its decisions enforced (no alerts, metrics, report)."""
    from app.services.blocklist import decisions
    from app.services.evaluation import evaluation
    result = evaluation.run(settings, conn, clock=lambda: now)
    job = JobResult(result)
    if settings.blocklist.enabled and result.evaluation_id is not None:
        job.decisions, _ = decisions.after_evaluation(conn, settings, result.anomalies, now)
    return job
