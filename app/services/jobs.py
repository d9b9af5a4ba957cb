"""The job around one evaluation: evaluate, then block, alert, measure and report.

`python -m app evaluate` (and app/port_detector.py under cron, hourly) runs :func:`run`:
1. ``evaluation.run``: rules + model over the rounds not yet evaluated (stores the findings);
2. ``decisions.after_evaluation``: block decisions from those same findings objects, enforced on
   every pinned map;
3. ``alerts.send_alerts``: one event per new finding and per block decision (cooldown-suppressed);
4. ``metrics.write_metrics``: the evaluator's Prometheus textfile metrics;
5. ``reports.write_report`` when ``evaluator.report_after`` is on.
Steps 3–5 never fail the job: their problems are logged (the anomalies and blocks are already stored).
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
                "report": str(self.report) if self.report else None}

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
        return out


def run(settings) -> JobResult:
    from app.services.blocklist import decisions
    from app.services.evaluation import evaluation
    from app.services.ops import alerts, metrics
    started = time.monotonic()
    result = evaluation.run(settings)
    job = JobResult(result)
    conn = connect(settings.general.db)
    try:
        if settings.blocklist.enabled and result.evaluation_id is not None:
            job.decisions, _ = decisions.after_evaluation(conn, settings, result.anomalies)
        events = [alerts.anomaly_event(f) for f in result.anomalies]
        events += [alerts.block_event(d.address, d.reason, expires_at=d.expires_at, dry_run=d.action == "would-block")
                   for d in job.decisions if d.action in ("block", "would-block")]
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
                                      max_anomaly_figures=settings.reports.max_anomaly_figures)
        except (PortwatchError, OSError, sqlite3.Error) as exc:
            log.warning("the report after this evaluation failed: %s", exc)
    return job
