"""Scaling windows for the model (:class:`LevelDeviationScaler`): log1p of softened counts, then per
window each feature's level and its round-by-round deviations, each robustly scaled (median,
inter-quartile range, a Poisson noise floor); fitted on training windows only and saved with the
model. Pure numpy, no TensorFlow; shapes as in series.py.
"""
from __future__ import annotations

import numpy as np

from app.services.evaluation.series import FEATURES

# One "count" of each feature for log1p(x / softening): bytes and payload sizes in packet-sized units,
# so a silent round of a small port is about as far from its level in bytes as in packets.
SOFTENING = {"bytes": 500.0, "mean_payload": 50.0, "max_payload": 50.0, "syn_share": 0.05, "out_bytes": 500.0}


class LevelDeviationScaler:
    """What the autoencoder sees: per window, each feature's level and its round-by-round deviations.

    transform: (N, W, F) original units -> (N, W, 2F) float32:
      channels 0..F-1   deviation  (log1p(x) - window median of log1p(x)) / dev_scale_
      channels F..2F-1  level      (window median of log1p(x) - center_) / level_scale_, the same every round
    Ports differ by orders of magnitude in level but a spike is a change within the port's own
    window; scaling the two parts separately keeps a ×30 spike on a busy port many units large
    instead of a fraction of the spread between ports. Fitted on training windows only:
    center_/level_scale_ = median/IQR of window levels, dev_scale_ = IQR of deviations (at least
    ``min_dev_scale``, in log units). Values are clipped to ±``clip``.
    """

    def __init__(self, min_level_scale: float = 1.0, min_dev_scale: float = 0.25, clip: float = 30.0,
                 softening: list | None = None):
        self.min_level_scale = float(min_level_scale)
        self.min_dev_scale = float(min_dev_scale)
        self.clip = float(clip)
        self.softening = list(softening) if softening is not None else [SOFTENING.get(n, 1.0) for n in FEATURES]

    def _split(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        soft = np.asarray(self.softening, np.float32)
        logged = np.log1p(np.maximum(np.asarray(windows, np.float32), 0.0) / soft)
        level = np.median(logged, axis=1, keepdims=True)
        return logged - level, level

    def _dev_scale(self, level: np.ndarray) -> np.ndarray:
        """(N, 1, F) deviation scale: dev_scale_, or the Poisson noise of log1p at that level if larger
        (a port with 5 packets a round is noisier in log units than one with 5,000)."""
        return np.maximum(self.dev_scale_, 1.0 / np.sqrt(np.expm1(np.maximum(level, 0.0)) + 1.0))

    def fit(self, windows: np.ndarray) -> "LevelDeviationScaler":
        """windows: (N, W, F) original units. Sets center_, level_scale_, dev_scale_ (F,)."""
        if len(windows) == 0:
            raise ValueError("cannot fit the scaler on no data")
        dev, level = self._split(windows)
        n_features = windows.shape[-1]
        flat_level = level.reshape(-1, n_features)
        q25, q50, q75 = np.percentile(flat_level, [25, 50, 75], axis=0)
        self.center_ = q50.astype(np.float32)
        self.level_scale_ = np.maximum(q75 - q25, self.min_level_scale).astype(np.float32)
        d25, d75 = np.percentile(dev.reshape(-1, n_features), [25, 75], axis=0)
        self.dev_scale_ = np.maximum(d75 - d25, self.min_dev_scale).astype(np.float32)
        return self

    def _check(self) -> None:
        if not hasattr(self, "center_"):
            raise RuntimeError("LevelDeviationScaler is not fitted: call fit() first")

    def transform(self, windows: np.ndarray) -> np.ndarray:
        """(N, W, F) original units -> (N, W, 2F) scaled."""
        self._check()
        dev, level = self._split(windows)
        scaled_level = np.broadcast_to((level - self.center_) / self.level_scale_, dev.shape)
        out = np.concatenate([dev / self._dev_scale(level), scaled_level], axis=-1)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

    def inverse_transform(self, scaled: np.ndarray) -> np.ndarray:
        """(N, W, 2F) scaled -> (N, W, F) original units (non-negative); the level is averaged over W."""
        self._check()
        scaled = np.asarray(scaled, np.float32)
        n_features = scaled.shape[-1] // 2
        level = scaled[..., n_features:].mean(axis=-2, keepdims=True) * self.level_scale_ + self.center_
        dev = scaled[..., :n_features] * self._dev_scale(level)
        return np.maximum(np.expm1(level + dev), 0.0) * np.asarray(self.softening, np.float32)

    def to_dict(self) -> dict:
        self._check()
        return {"kind": "log1p level+deviation", "min_level_scale": self.min_level_scale,
                "min_dev_scale": self.min_dev_scale, "clip": self.clip, "softening": self.softening,
                "center": [float(v) for v in self.center_], "level_scale": [float(v) for v in self.level_scale_],
                "dev_scale": [float(v) for v in self.dev_scale_]}

    @classmethod
    def from_dict(cls, data: dict) -> "LevelDeviationScaler":
        scaler = cls(data["min_level_scale"], data["min_dev_scale"], data["clip"], data["softening"])
        scaler.center_ = np.asarray(data["center"], np.float32)
        scaler.level_scale_ = np.asarray(data["level_scale"], np.float32)
        scaler.dev_scale_ = np.asarray(data["dev_scale"], np.float32)
        return scaler
