"""The model step of an evaluation: load the active model, judge the new rounds' windows with it
(after its warm-up), and refit on the windows no detector flagged, saving the next model version.
Its findings are built by model_findings.py. TensorFlow is imported only where a model is fitted,
loaded or scored (model.py).
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field

import numpy as np

from app.config import Evaluator, Settings
from app.db import evaluations as dbe
from app.services.evaluation import model_versions, series, warmup
from app.services.evaluation.batch import Batch
from app.services.evaluation.findings import Finding
from app.services.evaluation.model_findings import model_findings

log = logging.getLogger(__name__)

MIN_FIT_WINDOWS = 16    # a first fit needs at least this many training windows


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
