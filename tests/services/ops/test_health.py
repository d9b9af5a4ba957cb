"""app/services/ops/health.py through `status` (exit code, one-line reason, --json checks) and `doctor`:
one unhealthy state at a time on a database built by tests/ops_helpers.fill_database, and in a
real XDP lab: the program detached under its pins, the blocklist map out of step with the ledger."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from app.cli import main
from app.db.connection import connect
from tests.ops_helpers import fill_database


def _status(capsys, *extra) -> tuple[int, dict, str]:
    code = main(["status", "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err.strip()


def _check(data: dict, name: str) -> dict:
    return next(c for c in data["health"]["checks"] if c["name"] == name)


@pytest.fixture
def healthy_db(state_env):
    fill_database(state_env / "ports.db", end=time.time() - 20, rounds=30, interface="pwnoif0")
    return state_env / "ports.db"


def test_a_fresh_store_is_healthy(healthy_db, capsys):
    code, data, err = _status(capsys)
    assert code == 0 and err == "" and data["health"]["healthy"] is True
    assert [c["name"] for c in data["health"]["checks"]] == ["database", "rounds", "xdp", "evaluation", "model",
                                                             "blocklist"]
    assert all(c["ok"] is True for c in data["health"]["checks"])
    assert main(["status"]) == 0
    assert "health:          ok" in capsys.readouterr().out


def test_no_round_for_three_round_lengths(state_env, capsys):
    fill_database(state_env / "ports.db", end=time.time() - 3 * 60 - 30, rounds=30, interface="pwnoif0")
    code, data, err = _status(capsys)
    assert code == 1 and _check(data, "rounds")["ok"] is False
    assert err.startswith("portwatch: unhealthy: rounds: no round for 4 min") and len(err.splitlines()) == 1
    assert "collector's cron job" in err


def test_failed_evaluation_is_not_hidden_by_a_later_no_op(healthy_db, capsys):
    conn = connect(healthy_db)
    now = time.time()
    with conn:
        conn.execute("INSERT INTO evaluations (started_at, finished_at, status) VALUES (?, ?, ?)",
                     (now - 60, now - 59, "error: RuntimeError: the model file is missing"))
        noop = conn.execute("INSERT INTO evaluations (started_at, finished_at, status) VALUES (?, ?, 'no-rounds')",
                            (now - 5, now - 5)).lastrowid
    conn.close()
    code, data, err = _status(capsys)
    assert code == 1 and "the model file is missing" in err
    assert data["last_evaluation"]["status"].startswith("error") and data["last_noop_evaluation"]["id"] == noop
    assert main(["status"]) == 1
    out = capsys.readouterr().out
    assert "status error: RuntimeError" in out and "found no new rounds" in out


def test_no_op_evaluation_keeps_the_last_real_one(healthy_db, capsys):
    conn = connect(healthy_db)
    with conn:
        conn.execute("INSERT INTO evaluations (started_at, finished_at, status) VALUES (?, ?, 'no-rounds')",
                     (time.time(), time.time()))
    conn.close()
    code, data, _ = _status(capsys)
    assert code == 0 and data["last_evaluation"]["status"] == "ok" and data["last_evaluation"]["anomalies"] == 3


def test_a_model_that_cannot_alert_past_warm_up(healthy_db, capsys, monkeypatch):
    conn = connect(healthy_db)
    with conn:
        conn.execute("UPDATE models SET threshold = NULL WHERE status = 'active'")
    conn.close()
    code, data, _ = _status(capsys)                 # 30 rounds: still in warm-up (360), nothing wrong
    assert code == 0 and "warm-up: 30 of 360" in _check(data, "model")["detail"]
    monkeypatch.setenv("PORTWATCH_EVALUATOR_WARMUP_ROUNDS", "20")
    code, data, err = _status(capsys)
    assert code == 1 and _check(data, "model")["ok"] is False
    assert "model: model version 1 has no finite threshold, so it can never alert" in err


def test_database_above_its_size_limit(healthy_db, capsys, monkeypatch):
    monkeypatch.setenv("PORTWATCH_MAX_DB_MB", "0.01")
    code, data, err = _status(capsys)
    assert code == 1 and _check(data, "database")["ok"] is False
    assert "above general.max_db_mb = 0.01" in err
    assert data["database"]["max_mb"] == 0.01


def test_several_problems_name_the_first_and_count_the_rest(state_env, capsys, monkeypatch):
    fill_database(state_env / "ports.db", end=time.time() - 3600, rounds=30, interface="pwnoif0")
    monkeypatch.setenv("PORTWATCH_MAX_DB_MB", "0.01")
    code, _, err = _status(capsys)
    assert code == 1 and err.startswith("portwatch: unhealthy: database:") and "and 1 more problem" in err


def test_doctor_includes_the_health_checks(healthy_db, capsys, monkeypatch):
    monkeypatch.setenv("PORTWATCH_MAX_DB_MB", "0.01")
    main(["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["health database"]["status"] == "FAIL" and "max_db_mb" in checks["health database"]["detail"]
    assert checks["health rounds"]["status"] == "ok"


def test_metrics_export_the_same_checks(healthy_db, capsys, monkeypatch, tmp_path):
    from app.services.ops import metrics
    monkeypatch.setenv("PORTWATCH_METRICS_TEXTFILE_DIR", str(tmp_path / "prom"))
    monkeypatch.setenv("PORTWATCH_MAX_DB_MB", "0.01")
    assert main(["status", "--json"]) == 1
    samples = metrics.parse_samples((tmp_path / "prom" / "portwatch.prom").read_text())
    assert samples[("portwatch_health_check", (("check", "database"),))] == 0
    assert samples[("portwatch_health_check", (("check", "rounds"),))] == 1
    assert samples[("portwatch_healthy", ())] == 0


# --- in a real XDP lab --------------------------------------------------------------------------

@pytest.mark.kernel
def test_xdp_detached_under_its_pins_and_blocklist_out_of_step(lab, tmp_path, capsys, monkeypatch):
    from app.services.kernel import maps
    from app.services.kernel.bpf_structs import lpm_key
    import ipaddress
    from tests.helpers import collect, make_settings
    settings = make_settings(tmp_path)
    for key, value in {"PORTWATCH_DB": settings.general.db, "PORTWATCH_STATE_DIR": settings.general.state_dir,
                       "PORTWATCH_RUN_DIR": settings.general.run_dir, "PORTWATCH_CONFIG": str(tmp_path / "none.toml"),
                       "PORTWATCH_SCANNER_ENABLED": "false", "PORTWATCH_SNIFFER_ENABLED": "false"}.items():
        monkeypatch.setenv(key, value)
    collect(settings, lab, seconds=0.2)
    assert main(["blacklist", "add", "198.18.250.7", "--ttl", "1h"]) == 0
    collect(settings, lab, seconds=0.2)             # the round reconciles the map with the ledger
    capsys.readouterr()
    code, data, err = _status(capsys)
    assert code == 0, err
    assert "in step with the map of " + lab.interface in _check(data, "blocklist")["detail"]
    assert _check(data, "xdp")["detail"].startswith(f"attached on {lab.interface}")

    pin = f"/sys/fs/bpf/portwatch/{lab.interface}/blacklist"
    with maps.PinnedMap(pin) as m:                  # someone empties the map by hand
        assert m.delete(lpm_key(ipaddress.ip_network("198.18.250.7/32")))
    code, data, err = _status(capsys)
    assert code == 1 and "blocklist: " + lab.interface + ": 1 ledger entry missing from the map (198.18.250.7/32)" in err

    subprocess.run(["ip", "link", "set", "dev", lab.interface, "xdpgeneric", "off"], check=False)
    subprocess.run(["ip", "link", "set", "dev", lab.interface, "xdp", "off"], check=True)
    code, data, err = _status(capsys)
    assert code == 1 and _check(data, "xdp")["ok"] is False
    assert err.startswith(f"portwatch: unhealthy: xdp: pins for {lab.interface} but no XDP program attached")
