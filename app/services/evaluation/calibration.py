"""How the autoencoder's threshold is chosen (:func:`calibrate_threshold`: an empirical quantile, or a
peaks-over-threshold tail when the budget's probability is beyond what the scores can show), and how
far that choice can be trusted (:func:`out_of_sample`: false alerts on a fold of the pool the threshold
was not chosen on, per day with an exact Poisson 95 % upper bound).

No TensorFlow here (scipy only, imported where a tail is fitted): app/services/evaluation/model.py
scores the windows and calls these.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

OUT_OF_SAMPLE_FOLDS = 2


@dataclass
class Calibration:
    """How a threshold was chosen (stored in config.json and models.metadata)."""

    threshold: float
    method: str                  # 'quantile', 'pot' (peaks over threshold, GPD tail), 'fallback'
    held_out_scores: int         # held-out normal per-round errors the threshold was chosen on
    trials_per_day: float        # per-round errors per day on the whole host (port-rounds per day)
    budget_per_day: float
    target_probability: float    # per-round false-alert probability the budget allows
    held_out_exceedances: int    # held-out normal per-round errors above the threshold
    observed_rate_per_day: float # held_out_exceedances / held_out_scores × trials_per_day
    tail: dict = field(default_factory=dict)
    unbounded_threshold: float | None = None   # what the pool alone gave, before the per-refit bound
    previous_threshold: float | None = None    # the threshold before this refit (None: a first fit)
    pool_windows: int = 0                      # held-out windows in the pool (persisted with the model)
    # the calibration's own out-of-sample check (see out_of_sample): a threshold chosen on some folds
    # of the pool, its false alerts counted on the fold it never saw; per day of the whole host
    out_of_sample_scores: int = 0
    out_of_sample_exceedances: int = 0
    out_of_sample_rate_per_day: float | None = None
    out_of_sample_upper_per_day: float | None = None   # 95 % upper bound (exact Poisson)

    def windows_needed(self, window: int, min_expected: float) -> int:
        """Held-out windows the pool must hold before the threshold is trusted to alert: enough
        per-round errors (``window`` per window) to expect ``min_expected`` false alerts at the
        budget's per-round probability (0: none needed)."""
        if min_expected <= 0:
            return 0
        return int(math.ceil(min_expected / (max(self.target_probability, 1e-12) * window)))


def calibrate_threshold(scores: np.ndarray, trials_per_day: float, budget_per_day: float,
                        min_tail: int = 20) -> Calibration:
    """Threshold on held-out normal scores (N,) for ``budget_per_day`` expected false alerts.

    trials_per_day: how many such scores the host produces per day (the evaluator passes per-round
    errors and port-rounds per day). p = budget / trials_per_day is the false-alert probability
    allowed per trial. With at least
    10 held-out scores above the (1-p) quantile the empirical quantile is used; otherwise the tail
    is extrapolated by peaks over threshold: a generalised Pareto fit (scipy) to the excesses over
    the top max(min_tail, 10 %) scores, threshold = u + GPD⁻¹(1 - p / tail share). The shape is
    clipped to [-0.5, 0.5] so a few points cannot explode the threshold. Fewer than ``min_tail``
    scores: max(score) × 2 ('fallback', deliberately conservative).
    """
    scores = np.asarray(scores, np.float64).ravel()
    scores = np.sort(scores[np.isfinite(scores)])
    n = len(scores)
    trials_per_day = max(float(trials_per_day), 1.0)
    p = min(max(budget_per_day / trials_per_day, 1e-12), 0.5)
    tail: dict = {}
    if n < min_tail:
        threshold = float(scores[-1] * 2.0) if n else float("inf")
        method = "fallback"
    elif n * p >= 10:
        threshold = float(np.quantile(scores, 1.0 - p, method="higher"))
        method = "quantile"
    else:
        from scipy.stats import genpareto  # noqa: PLC0415
        k = max(min_tail, int(0.1 * n))
        u = float(scores[n - k - 1])
        excess = scores[n - k:] - u
        shape, scale = 0.0, float(np.mean(excess)) or 1e-9
        try:
            fitted_shape, _, fitted_scale = genpareto.fit(excess, floc=0.0)
            if np.isfinite(fitted_shape) and np.isfinite(fitted_scale) and fitted_scale > 0:
                shape, scale = float(np.clip(fitted_shape, -0.5, 0.5)), float(fitted_scale)
        except Exception as exc:  # scipy's optimiser can fail on degenerate tails: exponential then
            log.debug("GPD fit failed (%s); using an exponential tail", exc)
        q = 1.0 - p * n / k
        threshold = u + float(genpareto.ppf(q, shape, loc=0.0, scale=scale))
        method = "pot"
        tail = {"u": u, "tail_windows": k, "shape": shape, "scale": scale}
    exceed = int(np.sum(scores > threshold))
    rate = exceed / n * trials_per_day if n else 0.0
    return Calibration(threshold=float(threshold), method=method, held_out_scores=n,
                       trials_per_day=trials_per_day, budget_per_day=float(budget_per_day),
                       target_probability=p, held_out_exceedances=exceed,
                       observed_rate_per_day=float(rate), tail=tail)


def out_of_sample(cal: Calibration, per_round: np.ndarray, budget_per_day: float,
                  folds: int = OUT_OF_SAMPLE_FOLDS) -> Calibration:
    """Fill ``cal``'s out-of-sample fields from the pool's per-round errors (M, W), window by window.

    The pool's windows are dealt into ``folds`` folds (every folds-th window); for each fold a
    threshold is calibrated (:func:`calibrate_threshold`, same budget and trials) on the others and
    its exceedances are counted on the fold. rate = exceedances / scores x trials per day; the 95 %
    upper bound is the exact Poisson one. With p the per-round probability the budget allows, a pool
    of n per-round errors expects n p false alerts out of sample: a small pool can show that the
    threshold is far too low, never that it meets a budget of a few a day (the bound says how far).
    """
    per_round = np.asarray(per_round, np.float64)
    if per_round.ndim != 2 or len(per_round) < 2 * folds:
        return cal
    exceed, scores = 0, 0
    for k in range(folds):
        test = np.arange(len(per_round)) % folds == k
        threshold = calibrate_threshold(per_round[~test].ravel(), cal.trials_per_day, budget_per_day).threshold
        held = per_round[test].ravel()
        held = held[np.isfinite(held)]
        exceed += int(np.sum(held > threshold))
        scores += len(held)
    if not scores:
        return cal
    from scipy.stats import chi2  # noqa: PLC0415
    cal.out_of_sample_scores, cal.out_of_sample_exceedances = scores, exceed
    cal.out_of_sample_rate_per_day = float(exceed / scores * cal.trials_per_day)
    cal.out_of_sample_upper_per_day = float(chi2.ppf(0.95, 2 * (exceed + 1)) / 2 / scores * cal.trials_per_day)
    return cal
