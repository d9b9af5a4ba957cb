"""The CNN-LSTM autoencoder: a real (small) model on synthetic normal series, fixed seeds."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from app.services.evaluation import series
from app.services.evaluation.model import CnnLstmAutoencoder, ModelConfig, NotFittedError, calibrate_threshold
from tests.services.evaluation.synthetic import inject_spikes, normal_series

W = 15
PORTS = 10
PORT_ROUNDS_PER_DAY = PORTS * 1440.0


def small_config(**over) -> ModelConfig:
    base = dict(window=W, epochs=5, min_train_steps=400, seed=0)
    base.update(over)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def fitted():
    """(model, training windows): trained on 10 ports × 120 rounds, 20 % of tiles held out."""
    values = normal_series(PORTS, 120, np.random.default_rng(0))
    held_index = series.holdout_tiles(PORTS, 120, W, 0.3, np.random.default_rng(1))
    usable = ~series.tile_mask((PORTS, 120), held_index, W)
    train, _ = series.sliding_windows(values, W, stride=2, usable=usable)
    held = series.gather_windows(values, held_index, W)
    model = CnnLstmAutoencoder(small_config()).fit(train, held, PORT_ROUNDS_PER_DAY)
    return model, train


def test_unfitted_model_refuses_to_score_or_save(tmp_path):
    model = CnnLstmAutoencoder(small_config())
    windows = np.zeros((2, W, series.N_FEATURES), np.float32)
    with pytest.raises(NotFittedError):
        model.decision_function(windows)
    with pytest.raises(NotFittedError):
        model.predict(windows)
    with pytest.raises(NotFittedError):
        model.save(tmp_path / "m")


def test_fitted_attributes(fitted):
    model, train = fitted
    assert model.threshold_ > 0 and np.isfinite(model.threshold_)
    assert model.train_windows_ == len(train) and model.n_fits_ == 1
    assert model.calibration_.held_out_scores == len(model.calibration_windows_) * W
    assert model.calibration_.trials_per_day == PORT_ROUNDS_PER_DAY
    with pytest.raises(ValueError):
        model.decision_function(np.zeros((1, W + 1, series.N_FEATURES)))


def test_spikes_score_above_threshold_normal_windows_below(fitted):
    model, _ = fitted
    normal = normal_series(PORTS, 60, np.random.default_rng(2), start=120)   # the same ports, later
    cells = [(p, t) for p in range(PORTS) for t in (17, 41)]
    spiky = inject_spikes(normal, cells, factor=30.0)
    judge_normal = series.judge_windows(normal, W, 0)
    judge_spiky = series.judge_windows(spiky, W, 0)
    normal_scores = model.decision_function(judge_normal.windows, judge_normal.judged)
    spiky_scores = model.decision_function(judge_spiky.windows, judge_spiky.judged)
    has_spike = np.array([any(p == cp and end - W < ct <= end for cp, ct in cells) for p, end in judge_spiky.index])
    assert has_spike.sum() == 2 * PORTS
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(has_spike.sum())]
    auc = roc_auc_score(labels, np.r_[normal_scores, spiky_scores[has_spike]])
    assert auc >= 0.95, auc
    assert (spiky_scores[has_spike] > model.threshold_).mean() >= 0.9
    assert (normal_scores <= model.threshold_).mean() >= 0.95
    assert model.predict(judge_spiky.windows, judge_spiky.judged)[has_spike].mean() >= 0.9


def test_threshold_respects_the_budget_on_held_out_normal_data(fitted):
    model, _ = fitted
    # a budget a small test can measure: 10 false alerts a day out of 1,000 port-rounds = 1 %
    held = normal_series(PORTS, 300, np.random.default_rng(3), start=120)
    held_windows, _ = series.sliding_windows(held, W, stride=W)
    errors = model.round_errors(held_windows).ravel()
    cal = calibrate_threshold(errors, trials_per_day=1000, budget_per_day=10)
    assert cal.method == "quantile" and cal.target_probability == pytest.approx(0.01)
    assert cal.threshold < errors.max()                       # a tail quantile, not the max
    assert cal.observed_rate_per_day <= 10
    fresh = normal_series(PORTS, 300, np.random.default_rng(5), start=420)
    fresh_windows, _ = series.sliding_windows(fresh, W, stride=W)
    fresh_errors = model.round_errors(fresh_windows).ravel()
    assert (fresh_errors > cal.threshold).mean() * 1000 <= 10 * 2.5
    # the model's own threshold: budget 1/day over 14,400 port-rounds/day, p = 7e-5 -> POT tail
    assert model.calibration_.method == "pot"
    assert (fresh_errors > model.threshold_).sum() <= 1


def test_calibrate_threshold_extrapolates_the_tail_by_peaks_over_threshold():
    scores = np.random.default_rng(0).exponential(1.0, size=5000)
    cal = calibrate_threshold(scores, trials_per_day=100_000, budget_per_day=1.0)   # p = 1e-5
    assert cal.method == "pot"
    assert cal.threshold == pytest.approx(-np.log(1e-5), rel=0.2)                    # exact: 11.5
    assert cal.threshold > scores.max()                       # beyond anything seen, as it must be
    assert cal.held_out_exceedances == 0 and cal.observed_rate_per_day == 0.0
    few = calibrate_threshold(np.array([0.1, 0.2]), trials_per_day=100, budget_per_day=1.0)
    assert few.method == "fallback" and few.threshold == pytest.approx(0.4)


def test_save_and_load_rebuild_the_same_model(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert config["config"]["window"] == W and config["fitted"]["threshold_"] == model.threshold_
    assert json.loads((tmp_path / "v1" / "scaler.json").read_text())["kind"] == "log1p level+deviation"
    loaded = CnnLstmAutoencoder.load(tmp_path / "v1")
    windows = model.calibration_windows_[:20]
    assert np.allclose(loaded.decision_function(windows), model.decision_function(windows), atol=1e-6)
    assert loaded.threshold_ == model.threshold_
    assert np.array_equal(loaded.calibration_windows_, model.calibration_windows_)


def test_partial_fit_continues_from_the_weights_and_keeps_the_scaler(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "base")
    copy = CnnLstmAutoencoder.load(tmp_path / "base")
    more = normal_series(PORTS, 45, np.random.default_rng(4), start=120)
    train, _ = series.sliding_windows(more, W, stride=3)
    held = series.gather_windows(more, np.array([[0, 44], [1, 44]]), W)
    before = [w.copy() for w in copy.network_.get_weights()]
    scaler_center = copy.scaler_.center_.copy()
    copy.partial_fit(train, held, PORT_ROUNDS_PER_DAY)
    after = copy.network_.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    assert np.array_equal(copy.scaler_.center_, scaler_center)
    assert len(copy.calibration_windows_) == len(model.calibration_windows_) + 2
    assert copy.n_fits_ == 2 and np.isfinite(copy.threshold_)


def test_the_calibration_reports_its_own_out_of_sample_rate():
    """A budget a small test can measure (1 % of 1,000 trials a day = 10/day): a threshold chosen on
    one half of the pool, counted on the other, lands near the budget, and its 95 % bound above it."""
    from app.services.evaluation.model import Calibration, out_of_sample
    errors = np.random.default_rng(4).exponential(1.0, size=(400, W))          # 6,000 per-round errors
    cal = out_of_sample(calibrate_threshold(errors.ravel(), 1000, 10), errors, 10)
    assert isinstance(cal, Calibration) and cal.out_of_sample_scores == 6000
    assert 5 <= cal.out_of_sample_rate_per_day <= 20 and cal.out_of_sample_rate_per_day < cal.out_of_sample_upper_per_day < 30
    assert cal.out_of_sample_rate_per_day == cal.out_of_sample_exceedances / 6000 * 1000
    # a pool too small for its budget vouches for little: no false alert seen, a wide bound
    tiny = out_of_sample(calibrate_threshold(errors[:40].ravel(), 1e6, 1), errors[:40], 1)
    assert tiny.out_of_sample_exceedances == 0 and tiny.out_of_sample_upper_per_day > 1000


def test_out_of_sample_false_alerts_stay_in_the_bound_and_spikes_are_caught(fitted):
    """The fitted model's own check (budget 1/day on 14,400 port-rounds a day): its out-of-sample
    estimate covers every held-out round error, and on fresh benign rounds the false alerts stay
    within its 95 % bound while ×30 spikes on every port are caught."""
    model, _ = fitted
    cal = model.calibration_
    assert cal.out_of_sample_scores == cal.held_out_scores and cal.out_of_sample_upper_per_day is not None
    fresh = normal_series(PORTS, 300, np.random.default_rng(5), start=420)
    judge = series.judge_windows(fresh, W, 0)
    false_per_day = (model.decision_function(judge.windows, judge.judged) > model.threshold_).sum() / (300 / 1440)
    assert false_per_day <= cal.out_of_sample_upper_per_day
    cells = [(p, t) for p in range(PORTS) for t in (100, 200)]
    spiky = series.judge_windows(inject_spikes(fresh, cells, factor=30.0), W, 0)
    has_spike = np.array([any(p == cp and end - W < ct <= end for cp, ct in cells) for p, end in spiky.index])
    assert (model.decision_function(spiky.windows, spiky.judged)[has_spike] > model.threshold_).mean() >= 0.9


def test_a_silent_round_of_a_sparse_port_is_counted_once(fitted):
    """Bytes are 0 exactly when packets are: in a silent round only the packet count's deviation
    speaks (a Poisson zero of a 5-packet port is no ×30 event), so the window stays below threshold."""
    model, _ = fitted
    f = series.FEATURE_INDEX
    values = normal_series(PORTS, 60, np.random.default_rng(6), start=120)
    p = int(np.argmin(values[..., f["packets"]].mean(axis=1)))                # the sparsest port
    for name in ("packets", "bytes", "mean_payload", "max_payload", "syn", "syn_share", "syn_synack_ratio",
                 "rst", "sources"):
        values[p, 40, f[name]] = 0.0
    judge = series.judge_windows(values[p:p + 1], W, 0)
    i = int(np.flatnonzero(judge.index[:, 1] >= 40)[0])
    j = 40 - (int(judge.index[i, 1]) - W + 1)
    errors, _ = model.feature_errors(judge.windows[i:i + 1])
    scaled = model.scaler_.transform(judge.windows[i:i + 1])
    recon = model.reconstruct(judge.windows[i:i + 1])[1]
    level = series.N_FEATURES + f["bytes"]                                      # the bytes level channel
    assert errors[0, j, f["bytes"]] == pytest.approx((scaled[0, j, level] - recon[0, j, level]) ** 2, rel=1e-5)
    assert errors[0, j, f["packets"]] > errors[0, j, f["bytes"]]
    assert model.decision_function(judge.windows[i:i + 1], judge.judged[i:i + 1])[0] <= model.threshold_
