"""Whether a host takes the fleet's model (:func:`judge`), and how a host with too few rounds can take
it at all (:func:`early_model`). Used by the fleet node's learning step (learning.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from app.db import rounds as rounds_db
from app.db import series as dbs
from app.services.evaluation import evaluation, model_step, series
from app.services.evaluation.batch import load_batch

log = logging.getLogger(__name__)

@dataclass
class Verdict:
    """The host's check of a fleet model (counts and ratios, in its metadata and the evaluate reply)."""
    adopted: bool
    why: str | None                 # one sentence when not adopted
    refusal: int                    # 0 adopted, else a key of view.REFUSALS (numbers only leave the host)
    error_ratio: float | None       # fleet / local median per-round error on the check windows
    false_alerts_per_day: float     # on the check windows, at the fleet model's threshold
    check_windows: int


def median_error(model, windows: np.ndarray) -> float | None:
    """Median per-round error of ``model`` on ``windows`` (N, W, F); None without windows."""
    if model is None or not len(windows):
        return None
    return float(np.median(model.round_errors(windows)))


def false_alerts_per_day(model, windows: np.ndarray, per_day: float) -> float:
    """Per-round errors of ``windows`` above the model's threshold, as alerts a day on this host."""
    if not len(windows):
        return 0.0
    errors = model.round_errors(windows).ravel()
    return float(np.sum(errors > model.threshold_) / len(errors) * per_day)


def judge(model, check: np.ndarray, local_error: float | None, per_day: float, settings) -> Verdict:
    """Adopt the fleet ``model`` (threshold set) or not, from ``check`` windows (N, W, F) of this host.

    A host checks a fleet model on its own recent benign windows (held-out tiles of its latest rounds
    that no detector flagged and that this federation did not train on) before it becomes active:

        error ratio   median per-round error of the fleet model / the local model's, on those windows;
                      above fleet.adopt_max_error_ratio the fleet model describes this host far worse
        false alerts  alerts a day the fleet model's (locally calibrated) threshold raises on them;
                      above fleet.adopt_budget_factor x evaluator.alert_budget_per_day it would be noisy

    A model failing either is stored (origin 'fleet', status 'not-adopted', the reason in its metadata)
    and the local model stays active: `model list` and `fleet status` say why.
    """
    cfg, budget = settings.fleet, settings.evaluator.alert_budget_per_day
    fleet_error = median_error(model, check)
    ratio = fleet_error / max(local_error, 1e-12) if fleet_error is not None and local_error is not None else None
    alerts = false_alerts_per_day(model, check, per_day)
    if ratio is not None and ratio > cfg.adopt_max_error_ratio:
        why = (f"its error on this host's recent benign windows is {ratio:.3g} x the local model's "
               f"(fleet.adopt_max_error_ratio = {cfg.adopt_max_error_ratio:g})")
        return Verdict(False, why, 1, ratio, alerts, len(check))
    if alerts > cfg.adopt_budget_factor * budget:
        why = (f"it raises {alerts:.3g} false alerts a day on this host's recent benign windows, above "
               f"{cfg.adopt_budget_factor:g} x the budget of {budget:g} (fleet.adopt_budget_factor)")
        return Verdict(False, why, 2, ratio, alerts, len(check))
    return Verdict(True, None, 0, ratio, alerts, len(check))


def early_rounds(conn, settings) -> tuple[np.ndarray, np.ndarray, float]:
    """A host with fewer rounds than the window: (windows (P, W, F) its rounds padded in front,
    judged (P, W) bool (the real rounds), port-rounds per day); empty arrays without rounds."""
    cfg = settings.evaluator
    empty = (np.zeros((0, cfg.window, len(series.FEATURES)), np.float32), np.zeros((0, cfg.window), bool), 0.0)
    newest = rounds_db.last_round(conn)
    if newest is None:
        return empty
    batch = dbs.rounds_before(conn, newest["id"] + 1, cfg.window)
    loaded = load_batch(conn, batch, cfg, 0)
    data = series.batch_series(loaded, evaluation.model_ports(loaded, cfg))
    if not data.ports:
        return empty
    judged = series.judge_windows(data.values, cfg.window, 0)
    seconds = dbs.median_round_seconds(conn, int(data.round_ids[-1])) or 60.0
    return judged.windows, judged.judged, len(data.ports) * 86400.0 / seconds


def early_model(conn, settings, weights: list[np.ndarray]):
    """(model with the fleet weights, a scaler fitted here and a conservative threshold; its note),
    or (None, None) when this host has no rounds with traffic yet.

    A host with fewer rounds than the model's window (a new host) has no full window to fit a scaler or
    calibrate a threshold on: its rounds are padded in front to one window (the evaluator judges such a
    host the same way), the scaler is fitted on those, and the threshold is twice the largest per-round
    error they give (conservative: it alerts from the first evaluation without a held-out pool).
    """
    from app.services.evaluation.model import CnnLstmAutoencoder, LevelDeviationScaler, calibrate_threshold
    windows, judged, per_day = early_rounds(conn, settings)
    if not len(windows):
        return None, None
    model = CnnLstmAutoencoder(model_step.model_config(settings.evaluator))
    model.scaler_ = LevelDeviationScaler().fit(windows)
    model.network_ = model._build()
    model.network_.set_weights(weights)
    model.n_fits_, model.history_, model.train_windows_ = 0, [], 0
    model.calibration_windows_ = windows
    errors = model.round_errors(windows)[judged]
    # min_tail above the count: the 'fallback' rule, twice the largest error seen
    model.calibration_ = calibrate_threshold(errors, per_day, settings.evaluator.alert_budget_per_day,
                                             min_tail=len(errors) + 1)
    model.threshold_ = model.calibration_.threshold
    rounds = int(judged.sum(axis=1).max())
    note = (f"scaler fitted here on {rounds} round(s), fewer than the window of {settings.evaluator.window}; "
            "threshold twice the largest error they give")
    log.info("fleet: %s (%.4g)", note, model.threshold_)
    return model, note
