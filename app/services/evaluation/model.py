"""The CNN-LSTM autoencoder over per-port windows: build, fit, score, calibrate, save/load.

The only module that imports TensorFlow/Keras, and only inside functions (``_keras()``), so importing
this module is cheap; nothing on the collector's path imports it. The network is
:meth:`CnnLstmAutoencoder._build`'s, the scores :class:`CnnLstmAutoencoder`'s; the threshold is calibrated
on held-out normal windows to an alert budget (:meth:`CnnLstmAutoencoder.recalibrate`, calibration.py).
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
from app.services.evaluation.calibration import Calibration, calibrate_threshold, out_of_sample  # noqa: F401 (re-exported)
from app.services.evaluation.scaler import LevelDeviationScaler
from app.services.evaluation.series import FEATURES

log = logging.getLogger(__name__)

FORMAT = "portwatch-cnn-lstm-ae"
# The saved format; a change of the window's feature columns (series.FEATURES) is a new version. A
# saved model of another version stays listed (`model list` says why it is not loadable) but is
# never loaded as the current one: the evaluator fits a new model from scratch instead.
#   1  13 features, ingress only
#   2  + out_packets, out_bytes per local port (TC egress: what leaves the host): 15 features
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.weights.h5"
# In a round where a count is 0 these features carry no news of their own: per-packet ones are
# undefined, and a byte count is 0 exactly when its packet count is. The silence is counted once, by
# the count's own error; counted again through bytes, every quiet round of a sparse port (Poisson
# zeros: a 5-packet port is silent in ~1 % of its rounds) scored like a ×30 spike.
SILENT_TWINS = {"packets": ("mean_payload", "max_payload", "syn_share", "bytes"), "out_packets": ("out_bytes",)}


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


class NotFittedError(RuntimeError):
    """Scoring or saving a model that was never fitted."""


class CnnLstmAutoencoder:
    """CNN-LSTM autoencoder with a calibrated threshold.

    Fitted attributes: scaler_ (LevelDeviationScaler), threshold_ (float, window-score units),
    calibration_ (Calibration), calibration_windows_ ((M, W, F) raw held-out windows),
    train_windows_ (int, windows seen by the last fit), n_fits_ (int), history_ (list of losses).
    All windows passed in are in original units; scaling happens inside.

    Scores (PyOD style: fit() sets attributes with a trailing underscore; scoring refuses to run unfitted):
      per-feature error  (N, W, F)  squared reconstruction error in scaled units
      per-round error    (N, W)     mean over features
      window score       (N,)       max per-round error over the judged rounds of the window
    A window alerts when any of its judged rounds does: expected false alerts per day <= P(per-round
    error > threshold) × port-rounds per day (see :meth:`recalibrate`).
    """

    def __init__(self, config: ModelConfig | None = None):
        self.config = config or ModelConfig()
        self.network_ = None
        self._infer = None       # traced inference function (one trace for any N)

    # --- building and training --------------------------------------------------------------

    def _build(self):
        """The network; input and output (N, W, 2F): W rounds × F features, each as a deviation and a
        level channel (scaler.LevelDeviationScaler)::

            Conv1D(conv_filters, kernel_size, 'same', relu) over time
            → LSTM(lstm_units) encoder over time          → Dense(bottleneck, relu)
            → RepeatVector(W) → LSTM(lstm_units, return_sequences) decoder → TimeDistributed(Dense(2F))

        The LSTMs run over the W rounds of one port's window (time), never across ports."""
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
        out_of_sample(cal, self.round_errors(self.calibration_windows_), self.config.alert_budget_per_day)
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
                 "on held-out data, %s out of sample (95 %% upper bound %s), budget %g)", self.threshold_,
                 self.calibration_.method, self.calibration_.held_out_scores, self.calibration_.trials_per_day,
                 self.calibration_.observed_rate_per_day, self.calibration_.out_of_sample_rate_per_day,
                 self.calibration_.out_of_sample_upper_per_day, self.config.alert_budget_per_day)
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

        In a round without packets the deviation error of the count's twins (SILENT_TWINS: per-packet
        features, bytes) is 0, otherwise every quiet round of a sparse port would look anomalous;
        its silence still shows, once, in the packet count's own error.
        """
        windows = self._check_windows(windows)
        scaled, recon = self.reconstruct(windows)
        squared = (scaled - recon) ** 2
        n_features = self.config.n_features
        names = self.config.features
        for count, twins in SILENT_TWINS.items():
            if count not in names:
                continue
            silent = windows[..., names.index(count)] <= 0
            for name in twins:
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
