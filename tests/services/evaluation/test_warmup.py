"""Detectors that compare with usual wait for a baseline: an upload in the first evaluation is no
exfiltration (the store has no usual rate yet) and status, the summary and `anomalies list` say
so; after the warm-up the same upload is one finding. Real SQLite files, the real evaluation and CLI."""
from __future__ import annotations

import json
import time

import pytest

from app import config
from app.cli import main
from app.config import Evaluator
from app.services.evaluation import evaluation, outbound_rules, warmup
from tests.services.evaluation.outbound_batches import batch
from tests.services.evaluation.synthetic import SyntheticStore, upload

NEW = "198.18.60.9"              # the address the 30 MB go to
USUAL = "198.51.100.20"          # the host's ordinary outbound traffic: 200 kB a round
MB30 = 30 * 1024 * 1024


@pytest.fixture
def store(state_env, monkeypatch):
    monkeypatch.setenv("PORTWATCH_EVALUATOR_WARMUP_ROUNDS", "100000")
    # no port traffic: the rules alone (no model fit), rounds that ended in the last hour
    s = SyntheticStore(str(state_env / "ports.db"), seed=3, ports={}, start_time=time.time() - 3600)
    yield s
    s.close()


def rounds(store: SyntheticStore, count: int, upload_at: int | None = None) -> None:
    events = {k: [upload(USUAL, 200_000)] for k in range(count)}
    if upload_at is not None:
        events[upload_at].append(upload(NEW, MB30))
    store.add_rounds(count, events)


def test_an_upload_before_the_baseline_is_no_finding_and_after_it_one(store, capsys):
    settings = config.load()
    rounds(store, 10, upload_at=5)
    first = evaluation.run(settings)
    assert [f.detector for f in first.anomalies] == []
    assert "exfiltration: warming up, 0 of 30 rounds" in first.summary()
    assert "beaconing: warming up, 0 of 30 rounds" in first.summary()

    assert main(["anomalies", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["exfiltration: warming up, 10 of 30 rounds", "beaconing: warming up, 10 of 30 rounds"]
    assert out[-1].startswith("no findings")
    main(["status", "--json"])
    state = {w["detector"]: w for w in json.loads(capsys.readouterr().out)["warmup"]}
    assert (state["exfiltration"]["rounds"], state["exfiltration"]["needed"], state["exfiltration"]["ready"]) == (10, 30, False)
    main(["status"])
    assert "warm-up:         exfiltration: warming up, 10 of 30 rounds; beaconing: warming up, 10 of 30 rounds" \
        in capsys.readouterr().out

    rounds(store, 20)
    second = evaluation.run(settings)
    assert second.anomalies == () and "exfiltration: warming up, 10 of 30 rounds" in second.summary()
    main(["anomalies", "list"])
    assert "exfiltration: warming up" not in capsys.readouterr().out          # 30 rounds of history now

    rounds(store, 10, upload_at=5)
    third = evaluation.run(settings)
    [exfil] = third.anomalies
    assert (exfil.detector, exfil.source, exfil.details["bytes"]) == ("exfiltration", NEW, MB30)
    assert exfil.details["usual_from"] == "host" and "warming up" not in third.summary().split("model")[0]


def test_the_warmup_lengths_are_settings():
    b = batch(dns_queries=[])
    b.baseline_rounds, b.beacon_rounds = 12, [{}] * 3
    assert [w.text() for w in warmup.of_batch(b, Evaluator())] == [
        "exfiltration: warming up, 12 of 30 rounds", "beaconing: warming up, 3 of 30 rounds"]
    ready = warmup.of_batch(b, Evaluator(exfiltration_warmup_rounds=12, beacon_warmup_rounds=0))
    assert all(w.ready for w in ready) and ready[0].text() == "exfiltration: ready (12 rounds of history)"
    assert warmup.of_model(100, Evaluator(), "fleet").ready and not warmup.of_model(100, Evaluator()).ready


def test_a_cold_batch_raises_no_exfiltration_however_big_the_upload():
    from tests.services.evaluation.outbound_batches import batch as make
    rows = [(1, NEW, 20_000, MB30, 1, 1)]
    b = make(destination_stats=rows)
    assert outbound_rules.detect(b, Evaluator()) == []
    b.baseline_rounds = 30
    assert [f.detector for f in outbound_rules.detect(b, Evaluator())] == ["exfiltration"]


@pytest.mark.parametrize("key, value", [("exfiltration_warmup_rounds", -1), ("beacon_warmup_rounds", "x")])
def test_bad_warmup_settings_are_reported(monkeypatch, tmp_path, key, value):
    path = tmp_path / "c.toml"
    path.write_text(f"[evaluator]\n{key} = {json.dumps(value)}\n")
    with pytest.raises(config.ConfigError, match=f"evaluator.{key}"):
        config.load(path)
