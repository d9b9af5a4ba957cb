"""One evaluation end to end: the rounds not yet judged → rules + model → anomalies → safe refit.

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

:func:`run` returns an :class:`EvaluationResult` whose ``anomalies`` are the stored
:class:`~app.services.evaluation.findings.Finding` objects (id and evaluation_id set; ``anomalies.reasons`` is
each one's ``to_json()``): what the block decisions and the alerts take, as they are.

Model findings' ``details`` keys (stable: reports read them): port, protocol, model_version, window,
rounds [first, last], peak_round_id, score, threshold, score_unit, hot_rounds [{round_id, error}],
features [{feature, observed, reconstructed, error, share}], packets (the port's, over the rounds).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field

import numpy as np

from app.config import Evaluator, Settings
from app.db import evaluations as dbe
from app.db import series as dbs
from app.db.connection import connect
from app.services import locks
from app.services.evaluation import (dns_rules, finding_sources, forged, model_versions, outbound_rules, rules,
                                     series, warmup)
from app.services.evaluation.batch import Batch, load_batch
from app.services.evaluation.explain import fill_summaries
from app.services.evaluation.findings import Finding

log = logging.getLogger(__name__)

MIN_FIT_WINDOWS = 16    # a first fit needs at least this many training windows


@dataclass(frozen=True)
class EvaluationResult:
    """What one evaluation did. status: 'ok', 'warm-up' or 'no-rounds'."""

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
    cfg = settings.evaluator
    after = dbe.last_evaluated_round(conn)
    batch = dbs.rounds_after(conn, after, cfg.max_batch_rounds)
    if not batch:
        with conn:
            eid = dbe.insert_evaluation(conn, started_at=started, finished_at=clock(), first_round_id=None,
                                        last_round_id=None, model_version=None, threshold=None, windows=0,
                                        anomalies=0, duration_s=clock() - started, status="no-rounds")
        return EvaluationResult(eid, "no-rounds", None, after or None, 0, 0, 0, None, None, None, (),
                                clock() - started)
    first, last = batch[0]["id"], batch[-1]["id"]
    remaining = dbs.count_rounds_after(conn, last)
    history = dbs.count_rounds(conn, last)
    # a first fit learns from all recent history (small hosts would wait for many batches otherwise)
    has_model = has_loadable_model(conn)
    context = cfg.window - 1 if has_model else max(cfg.window - 1, cfg.max_batch_rounds - len(batch))
    loaded = load_batch(conn, batch, cfg, context, peers_since=started - settings.blocklist.peer_lookback_seconds)
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

    seconds = loaded.nominal_seconds or 60.0
    judged_days = len(batch) * seconds / 86400.0
    warm = step.model_version is not None or (
        not data.ports and history >= cfg.warmup_rounds and dbe.active_model(conn) is not None)
    status = "ok" if warm else "warm-up"
    note = {"rule_anomalies": len(findings), "model_anomalies": len(step.findings),
            "trained_version": step.trained_version, "remaining_rounds": remaining, "history_rounds": history,
            "warmup": {w.detector: {"rounds": w.rounds, "needed": w.needed} for w in warmups}}
    if step.pool is not None:
        note["model_pool"] = step.pool
    now = clock()
    with conn:
        if step.new_model is not None:
            dbe.insert_model(conn, **{**step.new_model, "created_at": now})    # the store's clock
        forged.judge_sources(conn, settings, all_findings, loaded, now)
        eid = dbe.insert_evaluation(
            conn, started_at=started, finished_at=now, first_round_id=first, last_round_id=last,
            model_version=step.model_version, threshold=step.threshold, windows=step.windows,
            anomalies=len(all_findings), duration_s=now - started, status=status, note=json.dumps(note),
            rounds=len(batch), ports=len(data.ports),
            observed_rate_per_day=(len(step.findings) / judged_days) if warm and judged_days > 0 else None)
        if step.round_errors:
            dbe.insert_round_errors(conn, eid, step.model_version, step.threshold, step.round_errors)
        fill_summaries(conn, all_findings)      # the one line every consumer reads
        for f in all_findings:
            if f.id is not None:                # a stored scan that went on: the same finding, grown
                dbe.update_anomaly(conn, f.id, score=f.score, reasons=f.to_json(), first_round_id=f.first_round_id,
                                   last_round_id=f.last_round_id, updated_at=now)
                continue
            f.evaluation_id = eid
            f.id = dbe.insert_anomaly(conn, evaluation_id=eid, port_id=f.port_id, detector=f.detector,
                                      score=f.score, threshold=f.threshold, reasons=f.to_json(),
                                      first_round_id=f.first_round_id, last_round_id=f.last_round_id,
                                      source=f.source, created_at=now)
        pruned = dbe.prunable_models(conn, cfg.keep_models)
        dbe.mark_pruned(conn, [r["version"] for r in pruned])
    for row in pruned:
        model_versions.remove_model_dir(settings, conn, row["path"])
    duration = clock() - started
    log.info("evaluation %d: rounds %d..%d, %s, %d anomalies, %.1f s", eid, first, last, status,
             len(all_findings), duration)
    return EvaluationResult(eid, status, first, last, len(batch), len(data.ports), step.windows,
                            step.model_version, step.trained_version, step.threshold, tuple(all_findings), duration,
                            remaining, history, cfg.warmup_rounds, tuple(warmups))


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


# --- model -----------------------------------------------------------------------------------------

@dataclass
class ModelStep:
    model_version: int | None       # judged with
    trained_version: int | None
    threshold: float | None
    windows: int
    findings: list
    new_model: dict | None = None   # models row to insert
    pool: dict | None = None        # the judging model's held-out pool: {windows, needed, alerting, suppressed}
    round_errors: list = field(default_factory=list)   # [(round_id, max, median, ports)] per judged round
    trained_windows: np.ndarray | None = field(default=None, repr=False)   # (N, W, F) passed to fit
    trained_index: np.ndarray | None = field(default=None, repr=False)     # (N, 2) [port, last t]


def has_loadable_model(conn: sqlite3.Connection) -> bool:
    """An active model this portwatch can load (a model of another format version needs a fresh fit)."""
    from app.services.evaluation.model import not_loadable
    row = dbe.active_model(conn)
    return row is not None and not_loadable(row["path"]) is None


def model_config(cfg: Evaluator):
    from app.services.evaluation.model import ModelConfig
    return ModelConfig(window=cfg.window, lstm_units=cfg.lstm_units, bottleneck=cfg.bottleneck,
                       epochs=cfg.epochs, refit_epochs=cfg.refit_epochs, min_train_steps=cfg.min_train_steps,
                       batch_size=cfg.batch_size, max_train_windows=cfg.max_train_windows,
                       calibration_windows=cfg.calibration_windows,
                       alert_budget_per_day=cfg.alert_budget_per_day,
                       max_threshold_change=cfg.threshold_max_change, seed=cfg.seed)


def load_active_model(conn: sqlite3.Connection, cfg: Evaluator):
    """(model, row) of the active version, or (None, None) when none is usable."""
    from app.services.evaluation.model import CnnLstmAutoencoder
    from app.services.evaluation.model import not_loadable
    row = dbe.active_model(conn)
    if row is None:
        return None, None
    why = not_loadable(row["path"])
    if why:
        log.warning("model v%d is not loadable (%s): fitting a new one from scratch", row["version"], why)
        return None, None
    try:
        model = CnnLstmAutoencoder.load(row["path"])
    except (OSError, ValueError, KeyError) as exc:
        log.error("model v%d at %s cannot be loaded (%s): training a new one (python -m app model list)",
                  row["version"], row["path"], exc)
        return None, None
    if model.config.window != cfg.window or list(model.config.features) != list(series.FEATURES):
        log.warning("model v%d was built for other windows or features: training a new one", row["version"])
        return None, None
    fresh = model_config(cfg)
    for key in ("epochs", "refit_epochs", "batch_size", "max_train_windows", "calibration_windows",
                "alert_budget_per_day", "min_train_steps", "max_threshold_change"):
        setattr(model.config, key, getattr(fresh, key))
    return model, row


def model_step(conn: sqlite3.Connection, settings: Settings, batch: Batch, data: series.Series,
               first_new: int, findings: list[Finding], history: int) -> ModelStep:
    """Judge (after warm-up) and refit; returns the model findings and the new models row."""
    cfg = settings.evaluator
    model, row = load_active_model(conn, cfg)
    # a fleet model was learned on many hosts' history: it judges from the first evaluation
    warm = model is not None and warmup.of_model(history, cfg, row["origin"]).ready
    round_ids = data.round_ids
    flagged = series.cell_mask(data, [c for f in findings for c in f.covers])
    flagged |= series.cell_mask(data, dbe.anomaly_spans(conn, int(round_ids[0]), int(round_ids[-1])))
    step = ModelStep(model_version=None, trained_version=None, threshold=None, windows=0, findings=[])
    if warm:
        _judge(step, model, row, batch, data, first_new, flagged, cfg)
    batch.release()     # judged and explained: the rows go before training (peak memory)
    train, train_index, held = _training_windows(data, flagged, first_new if model is not None else 0, cfg)
    step.trained_windows, step.trained_index = train, train_index
    if model is None and len(train) < MIN_FIT_WINDOWS:
        log.info("%d training windows: not enough for a first fit yet", len(train))
        return step
    _refit(step, conn, settings, model, row, train, held, data, first_new, flagged, batch.nominal_seconds or 60.0)
    return step


def _judge(step: ModelStep, model, row, batch: Batch, data: series.Series, first_new: int, flagged, cfg) -> None:
    """Score the new rounds' windows with the active model: the step's findings, scores and per-round
    errors; the cells of its findings join ``flagged`` (kept out of the refit). A model whose held-out
    pool is short of what the alert budget needs raises nothing (counted as suppressed)."""
    judge = series.judge_windows(data.values, cfg.window, first_new)
    errors, recon = model.feature_errors(judge.windows)
    scores = model.window_scores(errors, judge.judged)
    hot = scores > model.threshold_
    step.model_version, step.threshold, step.windows = row["version"], model.threshold_, len(scores)
    step.round_errors = series.round_errors(judge, errors.mean(axis=2), data.round_ids)
    step.findings = model_findings(batch, data, judge, errors, recon, hot, model.threshold_, row["version"],
                            cfg.top_features)
    for f in step.findings:
        flagged |= series.cell_mask(data, f.covers)
    log.info("model v%d judged %d windows: %d above %.4g", row["version"], len(scores), int(hot.sum()),
             model.threshold_)
    step.pool = pool_state(model, cfg)
    # a fleet model on a host with too few rounds for a pool has a deliberately conservative
    # threshold (twice the largest error its rounds gave: fleet/adoption.py): it alerts at once
    if row["origin"] == "fleet" and model.calibration_.method == "fallback":
        step.pool["alerting"] = True
    if not step.pool["alerting"] and step.findings:
        step.pool["suppressed"] = len(step.findings)
        log.warning("model v%d: %d finding(s) not raised: its held-out pool holds %d of the %d windows the alert "
                    "budget needs (evaluator.calibration_min_expected); their rounds stay out of the refit",
                    row["version"], len(step.findings), step.pool["windows"], step.pool["needed"])
        step.findings = []


def _training_windows(data: series.Series, flagged, train_from: int, cfg) -> tuple:
    """(training windows, their (port, end) index, held-out windows) from the unflagged rounds from
    ``train_from`` on (context rounds were trained on or held out before; a first fit uses every
    round loaded, earlier anomalies flagged). Held-out tiles are drawn with a seed of the batch."""
    window, round_ids = cfg.window, data.round_ids
    rng = np.random.default_rng(cfg.seed + int(round_ids[-1]))
    usable = ~flagged
    usable[:, :train_from] = False
    held_index = series.holdout_tiles(len(data.ports), len(round_ids), window, cfg.holdout_fraction, rng,
                                      start=train_from)
    held_ok = [i for i, (p, t) in enumerate(held_index) if usable[p, t - window + 1:t + 1].all()]
    held_index = held_index[held_ok]
    usable_train = usable & ~series.tile_mask(usable.shape, held_index, window)
    train, train_index = series.sliding_windows(data.values, window, cfg.train_stride, usable=usable_train)
    return train, train_index, series.gather_windows(data.values, held_index, window)


def _refit(step: ModelStep, conn, settings: Settings, model, row, train, held, data: series.Series,
           first_new: int, flagged, seconds: float) -> None:
    """Fit a first model or continue the active one, save it as the next version, and put its
    ``models`` row (stored by the caller's transaction) in ``step.new_model``."""
    from app.services.evaluation.model import CnnLstmAutoencoder
    cfg = settings.evaluator
    port_rounds_per_day = len(data.ports) * 86400.0 / seconds
    if model is None:
        model = CnnLstmAutoencoder(model_config(cfg)).fit(train, held, port_rounds_per_day)
        parent = None
    else:
        model.partial_fit(train, held, port_rounds_per_day)
        parent = row["version"]
    version = dbe.next_model_version(conn)
    path = model_versions.model_dir(settings, conn, version)
    model.save(path)
    cal = model.calibration_
    step.trained_version = version
    if step.threshold is None:
        step.threshold = model.threshold_
    step.new_model = {
        "version": version, "created_at": time.time(), "parent_version": parent, "path": str(path),
        "threshold": model.threshold_, "train_windows": len(train),
        "metadata": {"calibration": cal.__dict__, "pool": pool_state(model, cfg),
                     "rounds": [int(data.round_ids[first_new]), int(data.round_ids[-1])],
                     "ports": len(data.ports), "held_out_windows_added": len(held),
                     "excluded_cells": int(flagged[:, first_new:].sum()), "window": cfg.window,
                     "round_seconds": seconds, "n_fits": model.n_fits_},
        "budget_per_day": cal.budget_per_day, "held_out_rate_per_day": cal.observed_rate_per_day,
    }


def pool_state(model, cfg: Evaluator) -> dict:
    """The model's held-out pool against what its alert budget needs: {windows, needed, alerting}
    (alerting: the pool is big enough for the model to raise findings; see Calibration.windows_needed)."""
    windows, capacity = int(len(model.calibration_windows_)), int(model.config.calibration_windows)
    wanted = model.calibration_.windows_needed(model.config.window, cfg.calibration_min_expected)
    # a pool can never hold more than its capacity: a full pool alerts (status says it is short of the budget)
    needed = min(wanted, capacity)
    return {"windows": windows, "needed": needed, "alerting": windows >= needed, "capacity": capacity,
            "budget_needs": wanted}


def model_findings(batch: Batch, data: series.Series, judge: series.JudgeWindows, errors: np.ndarray,
                   recon: np.ndarray, hot: np.ndarray, threshold: float, version: int,
                   top_features: int) -> list[Finding]:
    """Model findings from flagged windows: one per port per run of hot rounds.

    errors (N, W, F) per-feature squared errors; recon (N, W, F) reconstruction in original units;
    hot (N,) bool flagged windows. A round is hot when its judged per-round error exceeds the
    threshold; hot rounds of one port at most one window apart form one finding.
    """
    window = judge.windows.shape[1]
    per_round = errors.mean(axis=2)
    by_port: dict[int, list[tuple[int, int, int]]] = {}     # port -> [(t, window i, position j)]
    for i in np.flatnonzero(hot):
        p, end = judge.index[i]
        for j in np.flatnonzero(judge.judged[i] & (per_round[i] > threshold)):
            by_port.setdefault(int(p), []).append((int(end) - window + 1 + int(j), int(i), int(j)))
    findings = []
    for p, cells in sorted(by_port.items()):
        cells.sort()
        groups: list[list[tuple[int, int, int]]] = [[cells[0]]]
        for cell in cells[1:]:
            if cell[0] - groups[-1][-1][0] <= window:
                groups[-1].append(cell)
            else:
                groups.append([cell])
        for group in groups:
            findings.append(_model_finding(batch, data, p, group, errors, recon, per_round, threshold,
                                           version, top_features, window))
    return findings


def _model_finding(batch, data, p, group, errors, recon, per_round, threshold, version, top_features, window):
    key = data.ports[p]
    first_id, last_id = int(data.round_ids[group[0][0]]), int(data.round_ids[group[-1][0]])
    t, i, j = max(group, key=lambda c: per_round[c[1], c[2]])
    score = float(per_round[i, j])
    feature_error = errors[i, j]
    order = np.argsort(feature_error)[::-1][:top_features]
    total = float(feature_error.sum()) or 1.0
    features = [{"feature": series.FEATURES[f], "observed": round(float(data.values[p, t, f]), 3),
                 "reconstructed": round(float(recon[i, j, f]), 3), "error": round(float(feature_error[f]), 4),
                 "share": round(float(feature_error[f]) / total, 3)} for f in order]
    packets, _, _ = finding_sources.port_totals(batch, key.port_id, first_id, last_id)
    sources, dominant = finding_sources.port_sources(batch, key.value, key.protocol, packets, first_id, last_id)
    details = {
        "port": key.value, "protocol": key.protocol, "model_version": version, "window": window,
        "rounds": [first_id, last_id], "peak_round_id": int(data.round_ids[t]),
        "score": round(score, 5), "threshold": round(float(threshold), 5),
        "score_unit": "mean squared error of the scaled features in the worst judged round",
        "hot_rounds": [{"round_id": int(data.round_ids[c[0]]), "error": round(float(per_round[c[1], c[2]]), 5)}
                       for c in group][:30],
        "features": features, "packets": packets,
    }
    return Finding("model", key.port_id, key.value, key.protocol, first_id, last_id, score, float(threshold),
                   source=dominant, sources=sources, details=details, covers=[(key.port_id, first_id, last_id)])
