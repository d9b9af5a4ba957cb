"""`python -m app cleanup [--keep-days D]`: retention with cascades, then vacuum."""
from __future__ import annotations

import sqlite3
import time

import pytest

from app.cli import main
from app.services.ops.metrics import parse_samples
from tests.ops_helpers import fill_database

TABLES = ["rounds", "port_stats", "source_stats", "rounds_ports", "packets", "blacklist_drops"]


def counts(db):
    conn = sqlite3.connect(db)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


def test_cleanup_deletes_old_rounds_with_their_rows(state_env, monkeypatch, capsys):
    db = state_env / "ports.db"
    now = time.time()
    fill_database(db, end=now - 60, rounds=180)           # 3 hours of minute rounds
    with sqlite3.connect(db) as conn:                      # a sniffer packet without a round, very old
        conn.execute("INSERT INTO packets (timestamp, protocols) VALUES (?, 'eth:ip:udp')", (now - 40 * 86400,))
    before = counts(db)
    monkeypatch.setenv("PORTWATCH_METRICS_TEXTFILE_DIR", str(state_env / "prom"))
    assert main(["cleanup", "--keep-days", str(1.5 / 24)]) == 0      # keep 1.5 hours
    out = capsys.readouterr().out
    after = counts(db)
    assert 85 <= after["rounds"] <= 92
    assert f"deleted {before['rounds'] - after['rounds']} rounds" in out and "vacuum" in out
    assert after["port_stats"] == 4 * after["rounds"] and after["source_stats"] < before["source_stats"]
    assert after["rounds_ports"] < before["rounds_ports"]
    assert after["packets"] == after["rounds"]           # one per kept round; the orphan is gone
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM port_stats WHERE round_id NOT IN (SELECT id FROM rounds)").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM anomalies").fetchone()[0] == 3     # evaluations/anomalies are kept
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2                 # now incremental
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    samples = parse_samples((state_env / "prom" / "portwatch.prom").read_text())
    assert samples[("portwatch_deleted_rounds_total", (("task", "cleanup"),))] == before["rounds"] - after["rounds"]
    # a second run is incremental and deletes nothing new
    assert main(["cleanup", "--keep-days", str(1.5 / 24)]) == 0
    assert "incremental vacuum" in capsys.readouterr().out


def test_cleanup_default_keeps_14_days_and_dry_run(state_env, capsys):
    db = state_env / "ports.db"
    fill_database(db, end=time.time() - 15 * 86400, rounds=10)      # all older than 14 days
    assert main(["cleanup", "--dry-run"]) == 0
    assert "would delete 10 rounds" in capsys.readouterr().out
    assert counts(db)["rounds"] == 10
    assert main(["cleanup"]) == 0
    assert counts(db)["rounds"] == 0


@pytest.mark.parametrize("days", ["0", "-3", "nan"])
def test_cleanup_rejects_bad_keep_days(state_env, capsys, days):
    fill_database(state_env / "ports.db", end=time.time(), rounds=3)
    assert main(["cleanup", "--keep-days", days]) == 2
    assert "--keep-days must be a number of days above 0" in capsys.readouterr().err


def test_cleanup_errors(state_env, capsys):
    assert main(["cleanup"]) == 2
    assert "does not exist: nothing to clean up" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["cleanup", "--keep-days", "many"])
    assert exc.value.code == 2
    (state_env / "ports.db").write_text("garbage" * 100)
    assert main(["cleanup"]) == 4
    assert "is corrupt" in capsys.readouterr().err
