"""The model's saved format is versioned: a model of an older format (other features) stays listed,
is never loaded as the current one, and the evaluator fits a new one from scratch."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from app import cli, config
from app.db import evaluations as dbe
from app.services.evaluation import evaluation, model_step, series
from app.services.evaluation.model import FORMAT, FORMAT_VERSION, CnnLstmAutoencoder, not_loadable
from tests.services.evaluation.synthetic import SyntheticStore

OLD_FEATURES = [f for f in series.FEATURES if f not in ("out_packets", "out_bytes")]


def write_config(directory: Path, **state) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": {"features": list(series.FEATURES)}}
    base.update(state)
    (directory / "config.json").write_text(json.dumps(base))
    return directory


def test_the_features_include_what_leaves_and_the_format_says_so():
    assert series.FEATURES[-2:] == ("out_packets", "out_bytes") and FORMAT_VERSION == 2
    assert {"out_packets", "out_bytes"} <= set(series.COUNT_FEATURES)


def test_not_loadable_names_why_without_tensorflow(tmp_path):
    assert not_loadable(write_config(tmp_path / "ok")) is None
    old = write_config(tmp_path / "v1", format_version=1, config={"features": OLD_FEATURES})
    assert not_loadable(old) == f"saved in model format v1, this portwatch reads v{FORMAT_VERSION} (features changed)"
    other = write_config(tmp_path / "other", config={"features": OLD_FEATURES})
    assert not_loadable(other).startswith("built for features")
    assert not_loadable(tmp_path / "gone") == "its files are gone (pruned)"
    assert "does not hold" in not_loadable(write_config(tmp_path / "alien", format="something-else"))
    with pytest.raises(ValueError, match="model format v1"):
        CnnLstmAutoencoder.load(old)


def test_build_series_puts_egress_in_its_columns():
    from app.services.evaluation.series import PortKey, build_series
    data = build_series([1, 2], [PortKey(7, 443, "tcp")], [(1, 7, 10, 1000, 500, 80, 0, 0, 0)],
                        egress=[(2, 7, 30, 45_000), (2, 99, 1, 1)], seconds=[60.0, 120.0], nominal_seconds=60.0)
    f = series.FEATURE_INDEX
    assert data.values[0, 0, f["out_packets"]] == 0 and data.values[0, 0, f["packets"]] == 10
    assert data.values[0, 1, f["out_packets"]] == 15 and data.values[0, 1, f["out_bytes"]] == 22_500  # 120 s round


@pytest.fixture
def env(state_env, monkeypatch):
    for key, value in {"WARMUP_ROUNDS": "45", "MIN_TRAIN_STEPS": "100", "EPOCHS": "2", "KEEP_MODELS": "3",
                       "SEED": "0"}.items():
        monkeypatch.setenv(f"PORTWATCH_EVALUATOR_{key}", value)
    return state_env


def test_an_old_format_model_stays_listed_and_a_new_one_is_fitted_from_scratch(env, capsys):
    store = SyntheticStore(str(env / "ports.db"), seed=3)
    try:
        settings = config.load()
        db = settings.general.db
        store.add_rounds(40)
        first = evaluation.run(settings)
        assert first.trained_version == 1
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        path = Path(dbe.model(conn, 1)["path"])
        # as an older portwatch saved it: format 1, no outbound features
        state = json.loads((path / "config.json").read_text())
        state["format_version"], state["config"]["features"] = 1, OLD_FEATURES
        (path / "config.json").write_text(json.dumps(state))
        assert not model_step.has_loadable_model(conn)

        store.add_rounds(30)
        second = evaluation.run(settings)
        assert second.trained_version == 2 and second.model_version is None      # nothing judged with v1
        rows = {r["version"]: r for r in dbe.models(conn)}
        assert rows[2]["parent_version"] is None and rows[2]["status"] == "active"   # a fresh fit, not a refit
        assert rows[1]["status"] == "retired"
        assert json.loads((Path(rows[2]["path"]) / "config.json").read_text())["format_version"] == FORMAT_VERSION
        conn.close()

        assert cli.main(["model", "list", "--db", db]) == 0
        listing = capsys.readouterr().out
        lines = {line.split()[0]: line for line in listing.splitlines() if line.split() and line.split()[0].isdigit()}
        assert " yes " in lines["2"] and " no " in lines["1"]
        # the calibration's own out-of-sample check: false alerts a day and their 95 % bound
        assert "out-of-sample" in listing.splitlines()[0] and re.search(r" \d+\.\d\d/d \(95 % <= [\d.e+]+\) ", lines["2"])
        assert "v1 is not loadable as the current model: saved in model format v1" in listing
        assert cli.main(["model", "rollback", "1", "--db", db]) == 2
        assert "not loadable" in capsys.readouterr().err
    finally:
        store.close()
