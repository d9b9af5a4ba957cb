"""The CNN-LSTM autoencoder over per-port windows: build, fit, score, calibrate, save/load.

The only module that imports TensorFlow/Keras, and only inside functions (``_keras()``), so importing
this module is cheap; nothing on the collector's path imports it.

Network (input and output (N, W, 2F): W rounds × F features, each as a deviation and a level
channel, see series.LevelDeviationScaler):

    Conv1D(conv_filters, kernel_size, 'same', relu) over time
    → LSTM(lstm_units) encoder over time          → Dense(bottleneck, relu)
    → RepeatVector(W) → LSTM(lstm_units, return_sequences) decoder → TimeDistributed(Dense(F))

The LSTMs run over the W rounds of one port's window (time), never across ports.

Scores (PyOD style: fit() sets attributes with a trailing underscore; scoring refuses to run unfitted):
  per-feature error  (N, W, F)  squared reconstruction error in scaled units
  per-round error    (N, W)     mean over features
  window score       (N,)       max per-round error over the judged rounds of the window

The threshold is calibrated on held-out normal windows (never trained on) to an alert budget:
expected false alerts per day <= P(per-round error > threshold) × port-rounds per day (a window
alerts when any of its judged rounds does). See :func:`calibrate_threshold` and recalibrate().
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.services import progress
from app.services.evaluation.series import FEATURES, LevelDeviationScaler

log = logging.getLogger(__name__)

FORMAT = "portwatch-cnn-lstm-ae"
# The saved format; a change of the window's feature columns (series.FEATURES) is a new version. A
# saved model of another version stays listed (`model list` says why it is not loadable) but is
# never loaded as the current one: the evaluator fits a new model from scratch instead.
#   1  13 features, ingress only
#   2  + out_packets, out_bytes per local port (TC egress, issue 12): 15 features
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.weights.h5"
PER_PACKET_FEATURES = ("mean_payload", "max_payload", "syn_share")


class _EpochLine:
    """A Keras callback (made on first use: Keras is imported lazily) that rewrites one progress
    line per epoch: 'fitting the model on N windows: epoch k/E, loss L'."""

    def __new__(cls, keras, windows: int, epochs: int):
        class EpochLine(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                loss = (logs or {}).get("loss")
                progress.line(f"fitting the model on {windows} windows: epoch {epoch + 1}/{epochs}"
                              + (f", loss {loss:.4g}" if loss is not None else ""), final=epoch + 1 == epochs)
        return EpochLine()


def _keras():
    """Import Keras (TensorFlow backend) once, quietly: no oneDNN banner in cron mail."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # also makes CPU results reproducible
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras  # noqa: PLC0415 (deliberately lazy: ~5 s and ~500 MB)
    return keras


@dataclass
class ModelConfig:
    """Hyper-parameters, separate from the fitted state (written to config.json)."""

    window: int = 15
    features: list = field(default_factory=lambda: list(FEATURES))
    conv_filters: int = 16
    kernel_size: int = 3
    lstm_units: int = 32
    bottleneck: int = 8
    epochs: int = 8
    refit_epochs: int = 2
    min_train_steps: int = 500          # small hosts: at least this many gradient steps on a first fit
    batch_size: int = 128
    learning_rate: float = 1e-3
    refit_learning_rate: float = 5e-4
    max_train_windows: int = 20000      # random subsample above this (per fit)
    calibration_windows: int = 4000     # held-out windows kept for recalibration
    alert_budget_per_day: float = 1.0
    max_threshold_change: float = 2.0   # one refit moves threshold_ at most ×/÷ this (1: frozen; inf: free)
    seed: int = 0

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def channels(self) -> int:
        """Network input/output channels: a deviation and a level channel per feature."""
        return 2 * len(self.features)


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


class NotFittedError(RuntimeError):
    """Scoring or saving a model that was never fitted."""


class CnnLstmAutoencoder:
    """CNN-LSTM autoencoder with a calibrated threshold.

    Fitted attributes: scaler_ (LevelDeviationScaler), threshold_ (float, window-score units),
    calibration_ (Calibration), calibration_windows_ ((M, W, F) raw held-out windows),
    train_windows_ (int, windows seen by the last fit), n_fits_ (int), history_ (list of losses).
    All windows passed in are in original units; scaling happens inside.
    """

    def __init__(self, config: ModelConfig | None = None):
        self.config = config or ModelConfig()
        self.network_ = None
        self._infer = None       # traced inference function (one trace for any N)

    # --- building and training --------------------------------------------------------------

    def _build(self):
        keras = _keras()
        cfg = self.config
        keras.utils.set_random_seed(cfg.seed)
        layers = keras.layers
        inputs = keras.Input(shape=(cfg.window, cfg.channels), name="window")
        x = layers.Conv1D(cfg.conv_filters, cfg.kernel_size, padding="same", activation="relu", name="conv")(inputs)
        x = layers.LSTM(cfg.lstm_units, name="encoder")(x)
        x = layers.Dense(cfg.bottleneck, activation="relu", name="bottleneck")(x)
        x = layers.RepeatVector(cfg.window, name="repeat")(x)
        x = layers.LSTM(cfg.lstm_units, return_sequences=True, name="decoder")(x)
        outputs = layers.TimeDistributed(layers.Dense(cfg.channels), name="reconstruction")(x)
        return keras.Model(inputs, outputs, name="cnn_lstm_ae")

    def _check_windows(self, windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows, np.float32)
        want = (self.config.window, self.config.n_features)
        if windows.ndim != 3 or windows.shape[1:] != want:
            raise ValueError(f"windows must have shape (N, {want[0]}, {want[1]}), got {windows.shape}")
        return windows

    def _train(self, windows: np.ndarray, epochs: int, learning_rate: float, min_steps: int) -> None:
        keras = _keras()
        cfg = self.config
        rng = np.random.default_rng(cfg.seed + getattr(self, "n_fits_", 0))
        if len(windows) > cfg.max_train_windows:
            windows = windows[rng.choice(len(windows), cfg.max_train_windows, replace=False)]
        scaled = self.scaler_.transform(windows)
        n = len(scaled)
        # small data: smaller batches, and at least min_steps gradient steps in all
        batch_size = int(min(cfg.batch_size, max(16, math.ceil(n / 16))))
        passes = max(epochs, math.ceil(min_steps * batch_size / n))
        # Keras costs ~0.1 s per epoch whatever its size: stack copies so one epoch has >= 32 steps
        copies = max(1, min(passes, math.ceil(32 * batch_size / n)))
        if copies > 1:
            scaled = np.concatenate([scaled] * copies)
        keras_epochs = math.ceil(passes / copies)
        keras.utils.set_random_seed(cfg.seed + getattr(self, "n_fits_", 0))
        self.network_.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
        log.info("training on %d windows: %d passes, batches of %d", n, keras_epochs * copies, batch_size)
        # one progress line on a terminal's stderr (stdout stays the command's output), silent under cron
        shown = [_EpochLine(keras, n, keras_epochs)] if progress.enabled() else []
        history = self.network_.fit(scaled, scaled, epochs=keras_epochs, batch_size=batch_size,
                                    shuffle=True, verbose=0, callbacks=shown)
        losses = [float(v) for v in history.history.get("loss", [])]
        self.history_ = (getattr(self, "history_", []) + [losses[-1] if losses else None])[-50:]
        self.train_windows_ = int(n)
        self.n_fits_ = getattr(self, "n_fits_", 0) + 1

    def fit(self, windows: np.ndarray, held_out: np.ndarray, port_rounds_per_day: float) -> "CnnLstmAutoencoder":
        """First fit: scaler and network from scratch on ``windows`` (N, W, F), then calibrate.

        held_out (M, W, F): normal windows never trained on, for the threshold.
        port_rounds_per_day: rounds judged per day on the whole host (ports × rounds per day).
        """
        windows = self._check_windows(windows)
        if len(windows) == 0:
            raise ValueError("cannot fit on no windows")
        self.scaler_ = LevelDeviationScaler().fit(windows)
        progress.line(f"fitting a new model on {len(windows)} windows: loading TensorFlow...")
        self.network_ = self._build()
        self._infer = None
        self.n_fits_ = 0
        self.history_ = []
        self._train(windows, self.config.epochs, self.config.learning_rate, self.config.min_train_steps)
        self.calibration_windows_ = self._check_windows(held_out)[-self.config.calibration_windows:]
        self.recalibrate(port_rounds_per_day, fallback=windows)
        return self

    def partial_fit(self, windows: np.ndarray, held_out: np.ndarray, port_rounds_per_day: float) -> "CnnLstmAutoencoder":
        """Continue training from the current weights on ``windows`` (N, W, F) judged normal.

        The scaler stays as first fitted. held_out (M, W, F) joins the calibration reservoir (oldest
        dropped beyond config.calibration_windows), and the threshold is recalibrated with the new weights.
        """
        self._check_fitted()
        windows = self._check_windows(windows)
        if len(windows):
            self._train(windows, self.config.refit_epochs, self.config.refit_learning_rate,
                        self.config.min_train_steps // 5)
        held_out = self._check_windows(held_out)
        self.calibration_windows_ = np.concatenate([self.calibration_windows_, held_out])[-self.config.calibration_windows:]
        self.recalibrate(port_rounds_per_day, fallback=windows if len(windows) else None, previous=self.threshold_)
        return self

    def recalibrate(self, port_rounds_per_day: float, fallback: np.ndarray | None = None,
                    previous: float | None = None) -> Calibration:
        """Set threshold_ and calibration_ from the reservoir's per-round errors under the current weights.

        A window's score is the max of its judged per-round errors, so a per-round false-alert
        probability p gives at most p × (port-rounds per day) false alerts a day: calibrating on
        per-round errors uses W times more held-out values than window scores would. The reservoir
        (calibration_windows_) persists across refits with the model (calibration.npz). With a
        ``previous`` threshold the new one stays within previous ÷/× config.max_threshold_change
        (the unbounded value is kept in calibration_.unbounded_threshold).
        """
        per_round = self.round_errors(self.calibration_windows_).ravel()
        if len(self.calibration_windows_) < 5 and fallback is not None and len(fallback):
            per_round = np.concatenate([per_round, self.round_errors(fallback).ravel()])
            log.warning("only %d held-out windows: threshold from in-sample errors too",
                        len(self.calibration_windows_))
        cal = calibrate_threshold(per_round, port_rounds_per_day, self.config.alert_budget_per_day)
        cal.unbounded_threshold, cal.pool_windows = cal.threshold, int(len(self.calibration_windows_))
        bound = self.config.max_threshold_change
        if previous is not None and math.isfinite(previous) and previous > 0 and bound >= 1:
            cal.previous_threshold = float(previous)
            if math.isfinite(cal.threshold):
                cal.threshold = float(min(max(cal.threshold, previous / bound), previous * bound))
            else:
                cal.threshold = float(previous * bound)
            if cal.threshold != cal.unbounded_threshold:
                cal.held_out_exceedances = int(np.sum(per_round > cal.threshold))
                cal.observed_rate_per_day = (cal.held_out_exceedances / len(per_round) * cal.trials_per_day
                                             if len(per_round) else 0.0)
                log.info("threshold bounded to %.4g (the pool alone gave %.4g; at most x/÷ %g per refit from %.4g)",
                         cal.threshold, cal.unbounded_threshold, bound, previous)
        self.calibration_ = cal
        self.threshold_ = self.calibration_.threshold
        log.info("threshold %.4g (%s over %d held-out round errors, %.0f port-rounds/day, %.2f false alerts/day "
                 "on held-out data, budget %g)", self.threshold_, self.calibration_.method,
                 self.calibration_.held_out_scores, self.calibration_.trials_per_day,
                 self.calibration_.observed_rate_per_day, self.config.alert_budget_per_day)
        return self.calibration_

    # --- scoring ----------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.network_ is None or not hasattr(self, "threshold_"):
            raise NotFittedError("the model is not fitted: call fit() or load() first")

    def reconstruct(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scaled input, scaled reconstruction), both (N, W, F)."""
        if self.network_ is None or not hasattr(self, "scaler_"):
            raise NotFittedError("the model is not fitted: call fit() or load() first")
        windows = self._check_windows(windows)
        scaled = self.scaler_.transform(windows)
        if len(scaled) == 0:
            return scaled, scaled.copy()
        if getattr(self, "_infer", None) is None:
            import tensorflow as tf  # noqa: PLC0415 (already loaded with keras)
            spec = tf.TensorSpec((None, self.config.window, self.config.channels), tf.float32)
            self._infer = tf.function(lambda x: self.network_(x, training=False), input_signature=[spec])
        out = [self._infer(scaled[i:i + 4096]).numpy() for i in range(0, len(scaled), 4096)]
        return scaled, np.concatenate(out).astype(np.float32)

    def feature_errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature squared error (N, W, F) in scaled units (deviation + level channel of each
        feature), and the reconstruction (N, W, F) in original units.

        Per-packet features (payload sizes, SYN share) are undefined in a round without packets:
        their deviation error there is 0, otherwise every quiet round of a sparse port would look
        anomalous (its silence still shows in the packet and byte counts).
        """
        windows = self._check_windows(windows)
        scaled, recon = self.reconstruct(windows)
        squared = (scaled - recon) ** 2
        n_features = self.config.n_features
        names = self.config.features
        if "packets" in names:
            silent = windows[..., names.index("packets")] <= 0
            for name in PER_PACKET_FEATURES:
                if name in names:
                    squared[..., names.index(name)][silent] = 0.0
        errors = squared[..., :n_features] + squared[..., n_features:]
        return errors, self.scaler_.inverse_transform(recon)

    def round_errors(self, windows: np.ndarray) -> np.ndarray:
        """Per-round error (N, W): mean over features of the squared scaled error."""
        if len(windows) == 0:
            return np.zeros((0, self.config.window), np.float32)
        return self.feature_errors(windows)[0].mean(axis=2)

    @staticmethod
    def window_scores(feature_errors: np.ndarray, judged: np.ndarray | None = None) -> np.ndarray:
        """(N,) max over judged rounds of the per-round error (mean over features) from (N, W, F)."""
        per_round = feature_errors.mean(axis=2)
        if judged is not None:
            per_round = np.where(judged, per_round, -np.inf)
        return per_round.max(axis=1) if len(per_round) else np.zeros(0, np.float32)

    def decision_function(self, windows: np.ndarray, judged: np.ndarray | None = None) -> np.ndarray:
        """Window scores (N,) for windows (N, W, F); judged (N, W) bool limits the rounds that count."""
        errors, _ = self.feature_errors(windows)
        return self.window_scores(errors, judged)

    def predict(self, windows: np.ndarray, judged: np.ndarray | None = None) -> np.ndarray:
        """(N,) 1 where the window score exceeds threshold_, else 0."""
        self._check_fitted()
        return (self.decision_function(windows, judged) > self.threshold_).astype(np.int8)

    # --- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write config.json (readable), scaler.json, model.weights.h5 and calibration.npz."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.network_.save_weights(directory / WEIGHTS_FILE)
        (directory / "scaler.json").write_text(json.dumps(self.scaler_.to_dict(), indent=2) + "\n")
        np.savez_compressed(directory / "calibration.npz", windows=self.calibration_windows_)
        state = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "fitted": {"threshold_": self.threshold_, "calibration_": asdict(self.calibration_),
                       "train_windows_": self.train_windows_, "n_fits_": self.n_fits_,
                       "history_": self.history_},
        }
        (directory / "config.json").write_text(json.dumps(state, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "CnnLstmAutoencoder":
        """Rebuild a saved model from ``directory`` (see save); ValueError when it is not loadable
        by this portwatch (:func:`not_loadable`)."""
        directory = Path(directory)
        state = json.loads((directory / "config.json").read_text())
        why = _not_loadable(state, directory)
        if why:
            raise ValueError(why)
        model = cls(ModelConfig(**state["config"]))
        model.scaler_ = LevelDeviationScaler.from_dict(json.loads((directory / "scaler.json").read_text()))
        model.network_ = model._build()
        model._infer = None
        model.network_.load_weights(directory / WEIGHTS_FILE)
        with np.load(directory / "calibration.npz") as data:
            model.calibration_windows_ = data["windows"].astype(np.float32)
        fitted = state["fitted"]
        model.threshold_ = float(fitted["threshold_"])
        model.calibration_ = Calibration(**fitted["calibration_"])
        model.train_windows_ = int(fitted["train_windows_"])
        model.n_fits_ = int(fitted["n_fits_"])
        model.history_ = list(fitted["history_"])
        return model


def _not_loadable(state: dict, directory: Path) -> str | None:
    if state.get("format") != FORMAT:
        return f"{directory} does not hold a {FORMAT} model"
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        return f"saved in model format v{version}, this portwatch reads v{FORMAT_VERSION} (features changed)"
    features = list(state.get("config", {}).get("features", []))
    if features != list(FEATURES):
        return f"built for features {features}, not this portwatch's {list(FEATURES)}"
    return None


def not_loadable(directory: str | Path) -> str | None:
    """Why the model saved in ``directory`` cannot be the current one (other format version or
    features, files missing or unreadable), or None when it can. Reads config.json only (no TensorFlow)."""
    directory = Path(directory)
    try:
        state = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        return "its files are gone (pruned)"
    except (OSError, ValueError) as exc:
        return f"its config.json cannot be read ({exc})"
    return _not_loadable(state, directory)
