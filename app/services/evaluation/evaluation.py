"""One evaluation end to end: the rounds not yet judged → rules + model → anomalies → safe refit.

:func:`run` holds the evaluate lock and records a failure; :func:`_evaluate` names the steps. The model
step (judge, refit) is model_step.py; the model's findings are model_findings.py. Imported by
app/services/jobs.py (the evaluate job) and the fleet (which reuses :func:`model_ports`); it never
imports the collector or the kernel.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass

import numpy as np

from app.config import Evaluator, Settings
from app.db import evaluations as dbe
from app.db import series as dbs
from app.db.connection import connect
from app.services import locks
from app.services.evaluation import dns_rules, forged, model_versions, outbound_rules, rules, series, warmup
from app.services.evaluation.batch import Batch, load_batch
from app.services.evaluation.explain import fill_summaries
from app.services.evaluation.findings import Finding
from app.services.evaluation.model_step import ModelStep, has_loadable_model, model_step

log = logging.getLogger(__name__)

PEERS_MARGIN_SECONDS = 3600.0


@dataclass(frozen=True)
class EvaluationResult:
    """What one evaluation did. status: 'ok', 'warm-up' or 'no-rounds'.

    ``anomalies`` are the stored :class:`~app.services.evaluation.findings.Finding` objects (id and
    evaluation_id set; ``anomalies.reasons`` is each one's ``to_json()``): what the block decisions and
    the alerts take, as they are."""

    evaluation_id: int
    status: str
    first_round_id: int | None
    last_round_id: int | None
    rounds: int
    ports: int
    windows: int                    # windows the model judged (0 in warm-up)
    model_version: int | None       # the model that judged the batch (None in warm-up)
    trained_version: int | None     # the version this evaluation trained and saved, if any
    threshold: float | None
    anomalies: tuple[Finding, ...]   # stored: each has its id and evaluation_id
    duration_s: float
    remaining_rounds: int = 0
    history_rounds: int = 0
    warmup_rounds: int = 0
    warmups: tuple = ()              # warmup.Warmup of each detector that compares with usual

    @property
    def model_anomalies(self) -> tuple[Finding, ...]:
        return tuple(a for a in self.anomalies if a.detector == "model")

    def summary(self) -> str:
        """One sentence for the command line."""
        if self.status == "no-rounds":
            return f"no new rounds to evaluate (last judged round: {self.last_round_id or 0})."
        counts: dict[str, int] = {}
        for a in self.anomalies:
            counts[a.detector] = counts.get(a.detector, 0) + 1
        found = ", ".join(f"{n} {d}" for d, n in sorted(counts.items())) or "none"
        head = (f"evaluated rounds {self.first_round_id}..{self.last_round_id} ({self.rounds} rounds, "
                f"{self.ports} ports")
        if self.status == "warm-up":
            trained = f"trained model v{self.trained_version}" if self.trained_version else "no model trained yet"
            head += f"; warm-up: {trained}"
        elif self.model_version is None:
            head += ", no port traffic for the model"
        else:
            head += f", {self.windows} windows, model v{self.model_version}, threshold {self.threshold:.4g}"
            if self.trained_version:
                head += f", refit as v{self.trained_version}"
        tail = "".join(f"; {w.text()}" for w in warmup.pending(list(self.warmups)))
        tail += f"; {self.remaining_rounds} rounds remain for the next run" if self.remaining_rounds else ""
        return f"{head}): {len(self.anomalies)} anomalies ({found}){tail}."


# --- entry point -----------------------------------------------------------------------------------

def run(settings: Settings, conn: sqlite3.Connection | None = None, *, clock=time.time) -> EvaluationResult:
    """Evaluate the rounds not yet judged in ``settings.general.db`` (or ``conn``).

    Holds the ``evaluate`` lock (LockedError when another evaluation runs). A failure is
    recorded as an evaluations row with status 'error: ...' and re-raised; its rounds stay unjudged.
    """
    own = conn is None
    if own:
        conn = connect(settings.general.db, create=False)
    try:
        with locks.holding(settings, "evaluate", "another evaluation is running: wait for it to finish"):
            started = clock()
            try:
                return _evaluate(conn, settings, started, clock)
            except Exception as exc:
                if isinstance(exc, sqlite3.DatabaseError):     # nothing more is written into a failing database
                    raise
                with conn:
                    dbe.insert_evaluation(conn, started_at=started, finished_at=clock(), first_round_id=None,
                                          last_round_id=None, model_version=None, threshold=None, windows=0,
                                          anomalies=0, duration_s=clock() - started,
                                          status=f"error: {type(exc).__name__}: {exc}"[:500])
                raise
    finally:
        if own:
            conn.close()


def _evaluate(conn: sqlite3.Connection, settings: Settings, started: float, clock) -> EvaluationResult:
    """The steps of one evaluation:

    batch      rounds with id > the last judged round (at most evaluator.max_batch_rounds)
    rules      app/services/evaluation/rules.py over the batch (from the first evaluation on), and what leaves
               the host: outbound_rules.py (outbound_scan, exfiltration, beaconing), dns_rules.py (dns_tunnel)
    series     per-port features over the batch plus window-1 earlier rounds of context
    score      the active model judges each new round once (series.judge_windows), when at least
               evaluator.warmup_rounds rounds exist; before that it trains only and raises nothing
               (every detector that compares with usual waits for its baseline: warmup.py; the
               summary and evaluations.note name those still warming up)
    refit      training continues from the current weights on batch windows that no detector
               flagged (nor any earlier anomaly covers); a random share of unflagged tiles is held
               out to recalibrate the threshold; the result is a new model version (keep_models kept)
    store      models row, evaluations row, anomalies rows and the model's error per judged round
               (model_round_errors: max and median over ports, the threshold in force) in one transaction
    """
    cfg = settings.evaluator
    after = dbe.last_evaluated_round(conn)
    batch = dbs.rounds_after(conn, after, cfg.max_batch_rounds)
    if not batch:
        return _no_rounds(conn, started, clock, after)
    first, last = batch[0]["id"], batch[-1]["id"]
    remaining = dbs.count_rounds_after(conn, last)
    history = dbs.count_rounds(conn, last)
    # a first fit learns from all recent history (small hosts would wait for many batches otherwise)
    context = cfg.window - 1 if has_loadable_model(conn) else max(cfg.window - 1, cfg.max_batch_rounds - len(batch))
    # the peers the forged-source judge compares with, from its look-back as of the store step (an hour
    # earlier: a clock stepped back while the evaluation ran still finds them all loaded)
    peers_since = started - settings.blocklist.peer_lookback_seconds - PEERS_MARGIN_SECONDS
    loaded = load_batch(conn, batch, cfg, context, peers_since=peers_since)
    model_row = dbe.active_model(conn)
    warmups = warmup.of_batch(loaded, cfg) + [warmup.of_model(history, cfg, model_row["origin"] if model_row else None)]
    findings = rules.detect(loaded, cfg) + outbound_rules.detect(loaded, cfg) + dns_rules.detect(loaded, cfg)
    data = series.batch_series(loaded, model_ports(loaded, cfg))
    loaded.keep_port_indexes_only()      # all the model step reads (its findings' sources), compact
    first_new = len(data.round_ids) - len(batch)
    step = ModelStep(model_version=None, trained_version=None, threshold=None, windows=0, findings=[])
    if data.ports:
        step = model_step(conn, settings, loaded, data, first_new, findings, history)
    rules.mark_incomplete(loaded, step.findings)
    all_findings = step.findings + findings

    judged_days = len(batch) * (loaded.nominal_seconds or 60.0) / 86400.0
    warm = step.model_version is not None or (
        not data.ports and history >= cfg.warmup_rounds and dbe.active_model(conn) is not None)
    status = "ok" if warm else "warm-up"
    note = {"rule_anomalies": len(findings), "model_anomalies": len(step.findings),
            "trained_version": step.trained_version, "remaining_rounds": remaining, "history_rounds": history,
            "warmup": {w.detector: {"rounds": w.rounds, "needed": w.needed} for w in warmups}}
    if step.pool is not None:
        note["model_pool"] = step.pool
    now = clock()
    evaluation_row = dict(
        started_at=started, finished_at=now, first_round_id=first, last_round_id=last,
        model_version=step.model_version, threshold=step.threshold, windows=step.windows,
        anomalies=len(all_findings), duration_s=now - started, status=status, note=json.dumps(note),
        rounds=len(batch), ports=len(data.ports),
        observed_rate_per_day=(len(step.findings) / judged_days) if warm and judged_days > 0 else None)
    eid = _store(conn, settings, loaded, step, all_findings, evaluation_row, now)
    duration = clock() - started
    log.info("evaluation %d: rounds %d..%d, %s, %d anomalies, %.1f s", eid, first, last, status,
             len(all_findings), duration)
    return EvaluationResult(eid, status, first, last, len(batch), len(data.ports), step.windows,
                            step.model_version, step.trained_version, step.threshold, tuple(all_findings), duration,
                            remaining, history, cfg.warmup_rounds, tuple(warmups))


def _no_rounds(conn: sqlite3.Connection, started: float, clock, after: int) -> EvaluationResult:
    """Record an evaluation that found no new rounds."""
    with conn:
        eid = dbe.insert_evaluation(conn, started_at=started, finished_at=clock(), first_round_id=None,
                                    last_round_id=None, model_version=None, threshold=None, windows=0,
                                    anomalies=0, duration_s=clock() - started, status="no-rounds")
    return EvaluationResult(eid, "no-rounds", None, after or None, 0, 0, 0, None, None, None, (),
                            clock() - started)


def _store(conn: sqlite3.Connection, settings: Settings, loaded: Batch, step: ModelStep, findings: list[Finding],
           evaluation_row: dict, now: float) -> int:
    """One transaction: the new models row, the sources judged (possibly forged), the evaluations row
    (``evaluation_row``: its columns), the model's per-round errors and the findings (new ones inserted,
    a stored scan that went on updated); then the pruned models' files go. Returns the evaluation id."""
    with conn:
        if step.new_model is not None:
            dbe.insert_model(conn, **{**step.new_model, "created_at": now})    # the store's clock
        forged.judge_sources(conn, settings, findings, loaded, now)
        eid = dbe.insert_evaluation(conn, **evaluation_row)
        if step.round_errors:
            dbe.insert_round_errors(conn, eid, step.model_version, step.threshold, step.round_errors)
        fill_summaries(conn, findings)      # the one line every consumer reads
        _store_findings(conn, findings, eid, now)
        pruned = dbe.prunable_models(conn, settings.evaluator.keep_models)
        dbe.mark_pruned(conn, [r["version"] for r in pruned])
    for row in pruned:
        model_versions.remove_model_dir(settings, conn, row["path"])
    return eid


def _store_findings(conn: sqlite3.Connection, findings: list[Finding], eid: int, now: float) -> None:
    """Insert each new finding as an anomalies row of evaluation ``eid`` (its id and evaluation_id set);
    update a stored one that grew (a scan that went on: the same finding, same id)."""
    for f in findings:
        if f.id is not None:
            dbe.update_anomaly(conn, f.id, score=f.score, reasons=f.to_json(), first_round_id=f.first_round_id,
                               last_round_id=f.last_round_id, updated_at=now)
            continue
        f.evaluation_id = eid
        f.id = dbe.insert_anomaly(conn, evaluation_id=eid, port_id=f.port_id, detector=f.detector,
                                  score=f.score, threshold=f.threshold, reasons=f.to_json(),
                                  first_round_id=f.first_round_id, last_round_id=f.last_round_id,
                                  source=f.source, created_at=now)


# --- the ports the model judges ------------------------------------------------------------------

def model_ports(batch: Batch, cfg: Evaluator) -> list[series.PortKey]:
    """The ports the model judges, busiest first, at most cfg.max_ports.

    A port qualifies with traffic in the batch and either something holding it (scanner) or
    traffic in at least cfg.min_active_share of the batch rounds, and never fewer than two. Stray
    packets to idle, unheld ports (background probes, scans) are the rules' business: as series
    they are single blips, however short the batch.
    """
    need = max(2, int(np.ceil(cfg.min_active_share * len(batch.rounds))))
    held = series.held_ports(batch)
    active = [series.PortKey(pid, value, proto) for pid, value, proto, _packets, rounds in series.port_activity(batch)
              if rounds >= need or pid in held]
    if len(active) > cfg.max_ports:
        log.warning("%d active ports; the model judges the %d busiest (evaluator.max_ports)",
                    len(active), cfg.max_ports)
    return active[:cfg.max_ports]
