"""The federated model's work on each side (imports TensorFlow through app/services/evaluation/model.py; never
on the collector's path): what a host contributes, what it takes back, and the coordinator's record.

A host's contribution (:func:`local_update`): the fleet weights, trained ``evaluator.refit_epochs``
on its windows that no detector flagged (the evaluator's rule for refits: cells covered by any stored
anomaly are left out), with its own scaler; it sends the weights and the number of windows only.
What it takes back (:func:`adopt`): the aggregate becomes a new ``models`` version with origin
'fleet' (parent: the local version it replaces), its scaler and threshold calibrated locally on this
host's held-out pool — hosts differ in scale; the network's shape and weights are shared.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app import config as config_mod
from app.db import evaluations as dbe
from app.db import fleet as fleet_db
from app.db import rounds as rounds_db
from app.db import series as dbs
from app.db.connection import connect
from app.services.evaluation import evaluation, model_step, model_versions, series
from app.services.evaluation.batch import load_batch
from app.services.fleet import adoption

log = logging.getLogger(__name__)

SHAPE_KEYS = ("window", "lstm-units", "bottleneck", "seed")
FLEET_FILE = "fleet.json"


def shape_from(run_config) -> dict:
    """The network's shape from the run config (the coordinator's [evaluator] values)."""
    return {k: int(run_config.get(k, d)) for k, d in zip(SHAPE_KEYS, (15, 32, 8, 0))}


def _model_config(shape: dict):
    from app.services.evaluation.model import ModelConfig
    return ModelConfig(window=shape["window"], lstm_units=shape["lstm-units"], bottleneck=shape["bottleneck"],
                       seed=shape["seed"])


def initial_weights(shape: dict) -> list[np.ndarray]:
    """The round-one network every host starts from (seeded: the same on any coordinator)."""
    from app.services.evaluation.model import CnnLstmAutoencoder
    return CnnLstmAutoencoder(_model_config(shape))._build().get_weights()


def node_settings(node_config, shape: dict | None = None) -> config_mod.Settings:
    """This host's settings: its config file (node config 'config', else the default) and database;
    the network's shape is the fleet's (``shape``), whatever this host's [evaluator] says."""
    settings = config_mod.load(node_config.get("config") or None)
    if shape:
        ev = settings.evaluator
        ev.window, ev.lstm_units, ev.bottleneck = shape["window"], shape["lstm-units"], shape["bottleneck"]
    if node_config.get("db"):
        settings.override("general", "db", str(node_config["db"]), "node config")
    if node_config.get("state-dir"):
        settings.override("general", "state_dir", str(node_config["state-dir"]), "node config")
    return settings


def local_windows(conn, settings) -> tuple[np.ndarray, np.ndarray, float]:
    """(train (N, W, F), held-out (M, W, F), port-rounds per day) from this host's latest rounds,
    leaving out every cell a stored anomaly covers."""
    cfg = settings.evaluator
    newest = rounds_db.last_round(conn)
    last = newest["id"] if newest is not None else None
    empty = np.zeros((0, cfg.window, len(series.FEATURES)), np.float32)
    if last is None:
        return empty, empty, 0.0
    batch = dbs.rounds_before(conn, last + 1, cfg.max_batch_rounds)
    if len(batch) < cfg.window:
        return empty, empty, 0.0
    loaded = load_batch(conn, batch, cfg, 0)
    data = series.batch_series(loaded, evaluation.model_ports(loaded, cfg))
    if not data.ports:
        return empty, empty, 0.0
    ids = data.round_ids
    usable = ~series.cell_mask(data, dbe.anomaly_spans(conn, int(ids[0]), int(ids[-1])))
    rng = np.random.default_rng(cfg.seed + int(ids[-1]))
    held_index = series.holdout_tiles(len(data.ports), len(ids), cfg.window, cfg.holdout_fraction, rng)
    held_index = held_index[[i for i, (p, t) in enumerate(held_index)
                             if usable[p, t - cfg.window + 1:t + 1].all()]]
    usable_train = usable & ~series.tile_mask(usable.shape, held_index, cfg.window)
    train, _ = series.sliding_windows(data.values, cfg.window, cfg.train_stride, usable=usable_train)
    held = series.gather_windows(data.values, held_index, cfg.window)
    seconds = dbs.median_round_seconds(conn, int(ids[-1])) or 60.0
    return train, held, len(data.ports) * 86400.0 / seconds


def _local_model(conn, settings, train: np.ndarray, weights: list[np.ndarray], check: np.ndarray | None = None):
    """(model, active row, local error): the active local model with the fleet weights set (its
    scaler kept), or a new one whose scaler is fitted on this host's windows; model None when there
    is neither. local error: the local model's median per-round error on ``check`` (before the
    fleet weights replace its own), None without a local model or check windows."""
    from app.services.evaluation.model import CnnLstmAutoencoder, LevelDeviationScaler
    model, row = model_step.load_active_model(conn, settings.evaluator)
    ev = settings.evaluator
    if model is not None and (model.config.lstm_units, model.config.bottleneck) != (ev.lstm_units, ev.bottleneck):
        log.warning("fleet: the local model v%d has another shape than the fleet's: its scaler is not reused",
                    row["version"])
        model = None
    local_error = adoption.median_error(model, check) if check is not None else None
    if model is None:
        if not len(train):
            return None, row, None
        model = CnnLstmAutoencoder(model_step.model_config(settings.evaluator))
        model.scaler_ = LevelDeviationScaler().fit(train)
        model.network_ = model._build()
        model.n_fits_, model.history_, model.train_windows_ = 0, [], 0
        model.calibration_windows_ = np.zeros((0, settings.evaluator.window, len(series.FEATURES)), np.float32)
    model.network_.set_weights(weights)
    model._infer = None
    return model, row, local_error


def local_update(node_config, weights: list[np.ndarray], shape: dict) -> tuple[list[np.ndarray], int]:
    """(weights trained here from the fleet's, windows trained on). 0 windows: the weights unchanged."""
    settings = node_settings(node_config, shape)
    conn = connect(settings.general.db)
    try:
        train, _, _ = local_windows(conn, settings)
        model, _, _ = _local_model(conn, settings, train, weights)
        if model is None or not len(train):
            log.info("fleet: no windows to train on here; contributing nothing this round")
            return weights, 0
        cfg = model.config
        model._train(train, cfg.refit_epochs, cfg.refit_learning_rate, cfg.min_train_steps // 5)
        log.info("fleet: trained the fleet weights on %d local windows", len(train))
        return model.network_.get_weights(), int(len(train))
    finally:
        conn.close()


EVALUATE_KEYS = ("num-windows", "version", "held-out-rate-per-day", "budget-per-day", "adopted", "refusal",
                 "active-version", "error-ratio")


def adopt(node_config, weights: list[np.ndarray], shape: dict, final: bool) -> dict:
    """On the final round: check the fleet weights on this host's recent benign windows and store them
    as a model version of origin 'fleet', active when the check passes (adoption.py), else kept as
    'not-adopted'. Returns the evaluate reply's metrics (EVALUATE_KEYS: counts, rates and codes only)."""
    out = dict.fromkeys(EVALUATE_KEYS, 0)
    out.update({"num-windows": 1, "held-out-rate-per-day": 0.0, "budget-per-day": 0.0, "error-ratio": 0.0})
    if not final:
        return out
    settings = node_settings(node_config, shape)
    conn = connect(settings.general.db)
    try:
        candidate = check_fleet_model(conn, settings, weights)
        if candidate.model is None:
            log.warning("fleet: no local model and no rounds here: the fleet model cannot be calibrated yet")
            out["active-version"] = candidate.row["version"] if candidate.row is not None else 0
            return out
        version = _store(conn, settings, candidate)
        cal, verdict, row = candidate.model.calibration_, candidate.verdict, candidate.row
        active = version if verdict.adopted else (row["version"] if row is not None else 0)
        out.update({"num-windows": max(len(candidate.model.calibration_windows_), 1), "version": version,
                    "held-out-rate-per-day": float(cal.observed_rate_per_day), "budget-per-day": cal.budget_per_day,
                    "adopted": int(verdict.adopted), "refusal": verdict.refusal, "active-version": active,
                    "error-ratio": float(verdict.error_ratio or 0.0)})
        return out
    finally:
        conn.close()


@dataclass
class Candidate:
    """The fleet weights as this host's model: calibrated here, checked here (not stored yet)."""
    model: object | None            # CnnLstmAutoencoder, None when this host has no rounds to calibrate on
    row: object | None              # the active local models row (None: none)
    verdict: adoption.Verdict | None
    scaler: str | None              # whose scaler, in words
    train_windows: int = 0


def check_fleet_model(conn, settings, weights: list[np.ndarray]) -> Candidate:
    """The fleet ``weights`` with this host's scaler (the local model's, else fitted on its windows,
    else on its first rounds), the threshold calibrated on its held-out pool, and its verdict."""
    train, held, per_day = local_windows(conn, settings)
    # the windows it is checked on: recent held-out tiles; a host with fewer rounds than the window has
    # none, its rounds padded to one window then (what its evaluations judge)
    check = held if len(held) else adoption.early_rounds(conn, settings)[0]
    model, row, local_error = _local_model(conn, settings, train, weights, check=check)
    scaler = "this host's (the local model's)" if row is not None and model is not None else "fitted here"
    if model is None:
        model, scaler = adoption.early_model(conn, settings, weights)
    if model is None:
        return Candidate(None, row, None, None)
    if len(train) or len(held):
        model.calibration_windows_ = np.concatenate([model.calibration_windows_, held])[
            -model.config.calibration_windows:]
        model.recalibrate(per_day or 1.0, fallback=train)
    verdict = adoption.judge(model, check, local_error, per_day or 1.0, settings)
    return Candidate(model, row, verdict, scaler, int(len(train)))


def _store(conn, settings, candidate: Candidate) -> int:
    """Save the fleet model and its models row (active only when adopted); returns its version."""
    model, row, verdict = candidate.model, candidate.row, candidate.verdict
    version = dbe.next_model_version(conn)
    path = model_versions.model_dir(settings, conn, version)
    model.save(path)
    cal = model.calibration_
    fleet = {"adopted": verdict.adopted, "why": verdict.why, "error_ratio": verdict.error_ratio,
             "false_alerts_per_day": verdict.false_alerts_per_day, "check_windows": verdict.check_windows,
             "scaler": candidate.scaler}
    with conn:
        dbe.insert_model(conn, version=version, created_at=time.time(),
                         parent_version=row["version"] if row is not None else None, path=str(path),
                         threshold=model.threshold_, train_windows=candidate.train_windows,
                         metadata={"calibration": cal.__dict__, "fleet": fleet,
                                   "held_out_windows": len(model.calibration_windows_)},
                         budget_per_day=cal.budget_per_day, held_out_rate_per_day=cal.observed_rate_per_day,
                         active=verdict.adopted)
        fleet_db.set_model_origin(conn, version, "fleet")
    if verdict.adopted:
        log.info("fleet: model v%d (origin fleet) active, threshold %.4g on %d held-out windows; scaler %s",
                 version, model.threshold_, len(model.calibration_windows_), candidate.scaler)
    else:
        log.warning("fleet: model v%d kept but not adopted: %s", version, verdict.why)
    return version


def record_federation(state_dir: str, result, rounds: int, hosts: int, per_host: list[dict],
                      contributions: dict | None = None, aggregation: str = "") -> None:
    """The coordinator's record of a finished federation (read by `fleet status`). known_hosts: per
    Flower node id, every host ever seen, its last contribution (time, windows claimed and weighed)
    and the model version it runs (adopted or not), merged over federations."""
    if not state_dir:
        return
    path = Path(state_dir) / FLEET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    train = {int(k): dict(v) for k, v in (getattr(result, "train_metrics_clientapp", None) or {}).items()}
    known = dict(previous.get("known_hosts") or {})
    for node, facts in (contributions or {}).items():
        known[str(node)] = {**known.get(str(node), {}), **facts}
    path.write_text(json.dumps({
        "federations": int(previous.get("federations", 0)) + 1, "finished_at": time.time(), "rounds": rounds,
        "hosts": hosts, "aggregation": aggregation,
        "per_host": [{"held_out_windows": int(h.get("num-windows", 0)),
                      "held_out_rate_per_day": float(h.get("held-out-rate-per-day", 0.0)),
                      "budget_per_day": float(h.get("budget-per-day", 0.0))} for h in per_host],
        "known_hosts": known,
        "train_metrics": {str(k): v for k, v in train.items()},
    }, indent=2, default=float) + "\n")
