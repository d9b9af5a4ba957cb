"""The model under forged-traffic rules: a benign mix with a periodic burst over many refits (synthetic store,
real model, fixed seeds). The threshold moves at most ×/÷ evaluator.threshold_max_change per refit,
the held-out pool persists across refits and the model raises nothing until it holds enough windows
for the budget, and no benign source is ever blocked."""
from __future__ import annotations

import json

import pytest

from app import config
from app.db import evaluations as dbe
from app.db.connection import connect
from app.services import jobs
from tests.services.evaluation.synthetic import SyntheticStore, volume_spike

BURSTER = "198.51.100.77"        # a benign iperf3-like sender: a burst on tcp/5201 every 20 rounds
EVALUATIONS = 10
HISTORY = []                     # (version, threshold, unbounded, pool windows, needed) for the report


@pytest.fixture
def env(state_env, monkeypatch):
    for key, value in {"WARMUP_ROUNDS": "60", "MIN_TRAIN_STEPS": "300", "EPOCHS": "4", "REFIT_EPOCHS": "2",
                       "SEED": "0", "WINDOW": "10", "HOLDOUT_FRACTION": "0.5", "ALERT_BUDGET_PER_DAY": "24",
                       "THRESHOLD_MAX_CHANGE": "2", "CALIBRATION_MIN_EXPECTED": "1", "KEEP_MODELS": "20",
                       "REPORT_AFTER": "false"}.items():
        monkeypatch.setenv(f"PORTWATCH_EVALUATOR_{key}", value)
    return state_env


def test_benign_bursts_over_many_refits(env):
    settings = config.load()
    ports = {(22, "tcp"): (20, "sshd"), (80, "tcp"): (400, "nginx"), (443, "tcp"): (900, "nginx"),
             (53, "udp"): (120, "dnsmasq"), (5201, "tcp"): (3, "iperf3")}
    store = SyntheticStore(str(env / "ports.db"), seed=5, ports=ports)
    try:
        bursts = lambda n, offset: {k: [volume_spike(5201, "tcp", 4000, BURSTER, payload=1400)]   # noqa: E731
                                    for k in range(n) if (k + offset) % 20 == 7}
        store.add_rounds(60, bursts(60, 0))
        results = [jobs.run(settings)]
        for i in range(EVALUATIONS):
            store.add_rounds(30, bursts(30, 60 + 30 * i))
            results.append(jobs.run(settings))
    finally:
        store.close()
    conn = connect(settings.general.db)
    try:
        models = conn.execute("SELECT version, threshold, metadata FROM models ORDER BY version").fetchall()
        evals = conn.execute("SELECT note FROM evaluations ORDER BY id").fetchall()
        blocked = [tuple(r) for r in conn.execute("SELECT address, reason, evidence FROM blacklist")]
        events = conn.execute("SELECT action, address FROM blacklist_events WHERE action = 'block'").fetchall()
    finally:
        conn.close()
    assert len(models) == EVALUATIONS + 1                      # one first fit, then one refit per evaluation
    HISTORY.clear()
    for m in models:
        cal = json.loads(m["metadata"])["calibration"]
        pool = json.loads(m["metadata"])["pool"]
        HISTORY.append((m["version"], m["threshold"], cal["unbounded_threshold"], pool["windows"], pool["needed"]))
    print("threshold history (version, threshold, unbounded, pool windows, needed):", HISTORY)
    for (v0, t0, *_), (v1, t1, _raw, *_rest) in zip(HISTORY, HISTORY[1:]):
        assert 0.5 - 1e-9 <= t1 / t0 <= 2.0 + 1e-9, (v0, t0, v1, t1)
    pools = [h[3] for h in HISTORY]
    assert pools == sorted(pools) and pools[-1] > pools[0]         # the pool persists and grows across refits
    needed = HISTORY[-1][4]
    assert needed == 30                                            # 1 / (24/day / 7,200 port-rounds/day × 10 rounds)
    # the model raised nothing while its pool was short of that, and said so in the evaluation's note
    notes = [json.loads(e["note"]) for e in evals]
    short = [n["model_pool"] for n in notes if "model_pool" in n and not n["model_pool"]["alerting"]]
    assert short and all(p["windows"] < p["needed"] for p in short)
    alerts = [len(job.evaluation.model_anomalies) for job in results]
    print("model findings per evaluation:", alerts, "suppressed:",
          [n.get("model_pool", {}).get("suppressed", 0) for n in notes])
    assert alerts[:4] == [0, 0, 0, 0]             # warm-up, then the pool short of 30 windows: nothing raised
    # no benign source was ever blocked
    assert blocked == [] and events == []
    assert all(d.action != "block" for job in results for d in job.decisions)


def test_one_refit_moves_the_threshold_at_most_the_bound():
    """recalibrate() with a previous threshold: the pool's own value is kept as unbounded_threshold,
    threshold_ stays within previous ÷/× max_threshold_change (no TensorFlow: errors are given)."""
    import numpy as np
    from app.services.evaluation.model import CnnLstmAutoencoder, ModelConfig
    model = CnnLstmAutoencoder(ModelConfig(window=5, max_threshold_change=2.0, alert_budget_per_day=1.0))
    rng = np.random.default_rng(0)
    model.calibration_windows_ = np.zeros((400, 5, 1), np.float32)
    errors = {"low": rng.exponential(0.01, (400, 5)), "high": rng.exponential(10.0, (400, 5))}
    model.round_errors = lambda windows: errors[state]          # noqa: E731
    state = "low"
    free = model.recalibrate(2000.0).threshold                   # a first fit: unbounded
    state = "high"
    cal = model.recalibrate(2000.0, previous=free)
    assert cal.unbounded_threshold > 100 * free and cal.threshold == pytest.approx(2.0 * free)
    assert cal.previous_threshold == free and cal.pool_windows == 400
    assert cal.held_out_exceedances == int(np.sum(errors["high"] > cal.threshold))
    state = "low"
    back = model.recalibrate(2000.0, previous=cal.threshold)
    assert back.threshold == pytest.approx(cal.threshold / 2.0) == pytest.approx(free)   # down again, at most /2
    assert cal.windows_needed(5, 1.0) == int(np.ceil(1.0 / (cal.target_probability * 5)))
