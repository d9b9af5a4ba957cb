"""Metrics textfile: valid Prometheus text format (prometheus_client's parser when installed, always a
strict format check), atomic writes, counters accumulating across runs, jobs sharing one file."""
from __future__ import annotations

import math
import os
import re
import threading

import pytest

from app.config import Settings
from app.services.ops import metrics
from app.services.ops.metrics import job_metrics, parse_samples, write_metrics

METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({METRIC})(\{{(?:{LABEL})(?:,{LABEL})*,?\}})? (\S+)( -?\d+)?$")
HELP = re.compile(rf"^# HELP ({METRIC}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({METRIC}) (counter|gauge|histogram|summary|untyped)$")


def check_exposition(text: str) -> dict[str, str]:
    """Strict check of the Prometheus text exposition format; returns {family: type}."""
    assert text.endswith("\n"), "the file must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    finished: set[str] = set()
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        assert line == line.strip() and line, f"line {number}: blank or padded line {line!r}"
        if line.startswith("#"):
            help_match, type_match = HELP.match(line), TYPE.match(line)
            assert help_match or type_match, f"line {number}: bad comment {line!r}"
            name = (help_match or type_match).group(1)
            assert name not in finished, f"line {number}: {name} appears in two places"
            if help_match:
                assert name not in helps, f"line {number}: second HELP for {name}"
                helps.add(name)
            else:
                assert name not in types, f"line {number}: second TYPE for {name}"
                types[name] = type_match.group(2)
            if current and current != name:
                finished.add(current)
            current = name
            continue
        match = SAMPLE.match(line)
        assert match, f"line {number}: not a sample line {line!r}"
        name = match.group(1)
        assert name in types, f"line {number}: sample of {name} before its TYPE"
        assert name not in finished, f"line {number}: samples of {name} are not together"
        if current and current != name:
            finished.add(current)
        current = name
        value = match.group(3)
        assert value in ("NaN", "+Inf", "-Inf") or not math.isnan(float(value)), f"line {number}: bad value"
        float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
        if types[name] == "counter":
            assert name.endswith("_total"), f"counter {name} should end in _total"
            assert float(value) >= 0
    assert helps == set(types), "every family has HELP and TYPE"
    return types


@pytest.fixture
def settings(tmp_path):
    s = Settings()
    s.metrics.textfile_dir = str(tmp_path / "textfile")
    return s


def test_write_metrics_is_valid_and_accumulates(settings):
    path = write_metrics(settings, "collector", {"rounds": 1, "packets": 500, "dropped_packets": 3,
                                                  "blocklist_entries": 2}, duration_seconds=50.5, now=1000.0)
    write_metrics(settings, "collector", {"rounds": 1, "packets": 400, "blocklist_entries": 4},
                  duration_seconds=50.1, now=1060.0)
    text = path.read_text()
    types = check_exposition(text)
    samples = parse_samples(text)
    job = (("task", "collector"),)
    assert samples[("portwatch_rounds_total", job)] == 2
    assert samples[("portwatch_packets_total", job)] == 900
    assert samples[("portwatch_dropped_packets_total", job)] == 3      # not in the second run: kept
    assert samples[("portwatch_blocklist_entries", job)] == 4            # gauge: last value
    assert samples[("portwatch_run_duration_seconds", job)] == 50.1
    assert samples[("portwatch_last_success_timestamp_seconds", job)] == 1060.0
    assert samples[("portwatch_runs_total", job)] == 2
    assert types["portwatch_packets_total"] == "counter" and types["portwatch_blocklist_entries"] == "gauge"
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_jobs_share_the_file_and_a_failure_keeps_the_last_success(settings):
    write_metrics(settings, "evaluator", {"anomalies": 2, "threshold": 0.061}, duration_seconds=12, now=100.0)
    write_metrics(settings, "collector", {"rounds": 1}, now=150.0)
    path = write_metrics(settings, "evaluator", {"anomalies": 1}, duration_seconds=3, success=False, now=200.0)
    text = path.read_text()
    check_exposition(text)
    samples = parse_samples(text)
    ev, co = (("task", "evaluator"),), (("task", "collector"),)
    assert samples[("portwatch_anomalies_total", ev)] == 3
    assert samples[("portwatch_last_success_timestamp_seconds", ev)] == 100.0
    assert samples[("portwatch_last_run_timestamp_seconds", ev)] == 200.0
    assert samples[("portwatch_last_run_success", ev)] == 0
    assert samples[("portwatch_run_failures_total", ev)] == 1
    assert samples[("portwatch_rounds_total", co)] == 1
    assert text.count("# TYPE portwatch_runs_total counter") == 1


def test_job_metrics_context_records_failures(settings):
    with job_metrics(settings, "cleanup") as values:
        values["deleted_rounds"] = 5
    with pytest.raises(RuntimeError):
        with job_metrics(settings, "cleanup") as values:
            values["deleted_rounds"] = 1
            raise RuntimeError("boom")
    samples = parse_samples((tmp := metrics.Path(settings.metrics.textfile_dir) / "portwatch.prom").read_text())
    check_exposition(tmp.read_text())
    job = (("task", "cleanup"),)
    assert samples[("portwatch_deleted_rounds_total", job)] == 6
    assert samples[("portwatch_last_run_success", job)] == 0
    assert samples[("portwatch_runs_total", job)] == 2


def test_concurrent_writers_lose_nothing(settings):
    def work(job):
        for _ in range(20):
            write_metrics(settings, job, {"rounds": 1})
    threads = [threading.Thread(target=work, args=(f"job{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = parse_samples((metrics.Path(settings.metrics.textfile_dir) / "portwatch.prom").read_text())
    assert [samples[("portwatch_rounds_total", (("task", f"job{i}"),))] for i in range(4)] == [20] * 4


def test_unknown_keys_are_gauges_and_special_values_render(settings):
    path = write_metrics(settings, "collector", {"queue_depth": 7, "ratio": float("nan"), "limit": float("inf"),
                                                 "errors_total": 2, "flag": True})
    text = path.read_text()
    types = check_exposition(text)
    assert types["portwatch_queue_depth"] == "gauge" and types["portwatch_errors_total"] == "counter"
    assert 'portwatch_ratio{task="collector"} NaN' in text and 'portwatch_limit{task="collector"} +Inf' in text
    assert 'portwatch_flag{task="collector"} 1' in text


def test_bad_inputs(settings):
    with pytest.raises(ValueError):
        write_metrics(settings, "bad job name!", {})
    with pytest.raises(ValueError):
        write_metrics(settings, "collector", {"bad-key": 1})
    with pytest.raises(ValueError):
        write_metrics(settings, "collector", {"rounds": "many"})


def test_disabled_or_unwritable_directory_never_raises(tmp_path, caplog):
    assert write_metrics(Settings(), "collector", {"rounds": 1}) is None
    s = Settings()
    blocker = tmp_path / "file"
    blocker.write_text("")
    s.metrics.textfile_dir = str(blocker / "sub")
    assert write_metrics(s, "collector", {"rounds": 1}) is None
    assert "cannot write metrics" in caplog.text


def test_prometheus_client_parser_accepts_it(settings):
    parser = pytest.importorskip("prometheus_client.parser")
    path = write_metrics(settings, "collector", {"rounds": 1, "packets": 10, "blocklist_entries": 1},
                         duration_seconds=1.5)
    families = {f.name: f for f in parser.text_string_to_metric_families(path.read_text())}
    assert families["portwatch_rounds"].type == "counter"
    assert families["portwatch_blocklist_entries"].samples[0].labels == {"task": "collector"}


def test_fleet_samples_replace_only_their_own(settings):
    from prometheus_client.parser import text_string_to_metric_families
    write_metrics(settings, "collector", {"rounds": 1})
    metrics.write_fleet(settings, {"crowdsec_pulled_total": 7, "crowdsec_pending": 2, "crowdsec_lapi_up": 1,
                                   "fleet_model_version": 4, ("fleet_models", (("origin", "fleet"),)): 1})
    path = metrics.write_fleet(settings, {"crowdsec_pending": 0, "crowdsec_lapi_up": 0,
                                          "crowdsec_last_pull_timestamp_seconds": None})
    text = path.read_text()
    types = check_exposition(text)
    assert types["portwatch_crowdsec_pulled_total"] == "counter" and types["portwatch_crowdsec_pending"] == "gauge"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["portwatch_crowdsec_pulled"].type == "counter"
    assert families["portwatch_crowdsec_pulled"].samples[0].value == 7          # kept: not mentioned (collector)
    assert families["portwatch_crowdsec_pending"].samples[0].value == 0         # replaced
    assert families["portwatch_fleet_model_version"].samples[0].value == 4
    assert math.isnan(families["portwatch_crowdsec_last_pull_timestamp_seconds"].samples[0].value)
    assert families["portwatch_fleet_models"].samples[0].labels == {"origin": "fleet"}
    assert families["portwatch_rounds"].samples[0].labels == {"task": "collector"}   # other jobs untouched
    path = metrics.write_fleet(settings, {"crowdsec_pending": 3}, keep_missing=False)   # `fleet status`
    samples = parse_samples(path.read_text())
    assert [k for k in samples if k[0].startswith(("portwatch_fleet", "portwatch_crowdsec"))] == [
        ("portwatch_crowdsec_pending", ())]
    assert ("portwatch_rounds_total", (("task", "collector"),)) in samples
    with pytest.raises(ValueError, match="unknown fleet metric"):
        metrics.write_fleet(settings, {"crowdsec_bogus": 1})
