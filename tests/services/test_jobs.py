"""The job around one evaluation (app/services/jobs.py): evaluation → decisions → alerts →
metrics → report, on a real tmp SQLite store. Only rules fire here (no port traffic for the model),
so TensorFlow is never imported; nothing reaches a pinned map (an empty pin root)."""
from __future__ import annotations

import json
import logging
import sys
import types

from app.db import blacklist as queries
from app.db.connection import connect
from app.services import jobs
from app.services.evaluation import evaluation
from app.services.ops import alerts
from app.services.evaluation.evaluation import EvaluationResult
from tests.helpers import blocklist_settings

SCANNER = "198.18.0.66"


def scanned_store(settings, rounds=3):
    """``rounds`` rounds; in the last one a source reaches 40 distinct local ports (source_stats only)."""
    conn = connect(settings.general.db)
    with conn:
        ids = [conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, 'pw0')",
                            (1000.0 + 60 * i, 1060.0 + 60 * i)).lastrowid for i in range(rounds)]
        conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                     "VALUES (?, ?, 40, 2400, 40, 40)", (ids[-1], SCANNER))
    conn.close()


def test_job_blocks_alerts_and_measures_from_the_evaluation_s_own_findings(tmp_path, monkeypatch):
    s = blocklist_settings(tmp_path)
    s.metrics.textfile_dir = str(tmp_path / "metrics")
    scanned_store(s)
    sent = []
    real_send = alerts.send_alerts
    monkeypatch.setattr(alerts, "send_alerts", lambda conn, settings, events: sent.extend(events) or
                        real_send(conn, settings, events))
    job = jobs.run(s)

    [scan] = job.evaluation.anomalies
    assert (scan.detector, scan.source, scan.id) == ("port_scan", SCANNER, 1)
    [decision] = job.decisions
    assert (decision.address, decision.action, decision.anomaly_id) == (f"{SCANNER}/32", "block", scan.id)
    conn = connect(s.general.db)
    row = queries.get_entry(conn, f"{SCANNER}/32")
    assert row["status"] == "active" and json.loads(row["evidence"])["evidence"] == "one-way"
    conn.close()
    # one alert per finding and per block, built from the same objects
    assert [e.kind for e in sent] == ["anomaly", "block"]
    assert sent[0].details["anomaly_id"] == scan.id and sent[0].details["sources"][0]["address"] == SCANNER
    assert sent[1].details["address"] == f"{SCANNER}/32"
    # metrics of the run
    text = (tmp_path / "metrics" / "portwatch.prom").read_text()
    assert 'task="evaluator"' in text and "blocklist_entries" in text
    lines = job.lines()
    assert lines[0] == job.evaluation.summary() and "1 port_scan" in lines[0]
    assert lines[1:] == [f"blocked: {SCANNER}/32 (port scan (anomaly 1))", f"report: {job.report}"]
    assert job.report == tmp_path / "reports" / "index.html" and job.report.exists()   # warm-up reports too


def test_disabled_blocklist_still_alerts(tmp_path, monkeypatch):
    s = blocklist_settings(tmp_path, enabled=False)
    scanned_store(s)
    sent = []
    monkeypatch.setattr(alerts, "send_alerts", lambda conn, settings, events: sent.extend(events))
    job = jobs.run(s)
    assert job.decisions == [] and [e.kind for e in sent] == ["anomaly"]
    conn = connect(s.general.db)
    assert queries.entries(conn, None) == []
    conn.close()


def test_a_failing_report_is_logged_and_does_not_fail_the_job(tmp_path, monkeypatch, caplog):
    s = blocklist_settings(tmp_path)
    s.evaluator.report_after = True
    connect(s.general.db).close()       # the store a collection made (the job itself never creates one)
    ok = EvaluationResult(7, "ok", 1, 3, 3, 0, 0, None, None, None, (), 0.1)
    monkeypatch.setattr(evaluation, "run", lambda settings, **clock: ok)

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setitem(sys.modules, "app.services.ops.reports", types.SimpleNamespace(write_report=broken))
    with caplog.at_level(logging.WARNING, logger="app.services.jobs"):
        job = jobs.run(s)
    assert job.evaluation is ok and job.report is None and job.decisions == []
    assert any("the report after this evaluation failed: disk full" in r.message for r in caplog.records)
    written = tmp_path / "report"
    monkeypatch.setitem(sys.modules, "app.services.ops.reports", types.SimpleNamespace(write_report=lambda *a, **k: written))
    assert jobs.run(s).report == written
