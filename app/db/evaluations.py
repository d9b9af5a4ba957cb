"""Queries for the evaluator's own tables: evaluations, anomalies, models.

Writers call these inside ``with conn:`` (one evaluation = one transaction). Exactly one model
row is 'active' at a time (the one the next evaluation loads); older ones are 'retired',
versions undone by a rollback 'rolled-back', and versions whose files were removed 'pruned'; a fleet
model this host checked and refused is 'not-adopted' (kept, never loaded unless rolled back to).
"""
from __future__ import annotations

import json
import sqlite3
from typing import Iterable

# statuses of evaluations whose rounds count as judged
JUDGED_STATUSES = ("ok", "warm-up")


def last_evaluated_round(conn: sqlite3.Connection) -> int:
    """The highest round id an earlier evaluation judged (0 when none)."""
    marks = ",".join("?" * len(JUDGED_STATUSES))
    row = conn.execute(f"SELECT MAX(last_round_id) FROM evaluations WHERE status IN ({marks})",
                       JUDGED_STATUSES).fetchone()
    return int(row[0] or 0)


def insert_evaluation(conn: sqlite3.Connection, *, started_at: float, finished_at: float,
                      first_round_id: int | None, last_round_id: int | None, model_version: int | None,
                      threshold: float | None, windows: int, anomalies: int, duration_s: float, status: str,
                      note: str | None = None, rounds: int = 0, ports: int = 0,
                      observed_rate_per_day: float | None = None) -> int:
    """One evaluations row; returns its id."""
    return conn.execute(
        "INSERT INTO evaluations (started_at, finished_at, first_round_id, last_round_id, model_version, "
        "threshold, windows, anomalies, duration_s, status, note, rounds, ports, observed_rate_per_day) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (started_at, finished_at, first_round_id, last_round_id, model_version, _finite(threshold), windows,
         anomalies, duration_s, status, note, rounds, ports, observed_rate_per_day)).lastrowid


def insert_anomaly(conn: sqlite3.Connection, *, evaluation_id: int, port_id: int | None, detector: str,
                   score: float | None, threshold: float | None, reasons: str, first_round_id: int,
                   last_round_id: int, source: str | None, created_at: float) -> int:
    """One anomalies row; ``reasons`` is the finding's JSON text (findings.Finding.to_json). Returns its id."""
    return conn.execute(
        "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id, "
        "last_round_id, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (evaluation_id, port_id, detector, _finite(score), _finite(threshold), reasons, first_round_id,
         last_round_id, source, created_at)).lastrowid


def update_anomaly(conn: sqlite3.Connection, anomaly_id: int, *, score: float | None, reasons: str,
                   first_round_id: int, last_round_id: int, updated_at: float) -> None:
    """A stored finding that grew (a scan that goes on): same id, wider rounds, new reasons JSON."""
    conn.execute("UPDATE anomalies SET score = ?, reasons = ?, first_round_id = ?, last_round_id = ?, "
                 "updated_at = ? WHERE id = ?",
                 (_finite(score), reasons, first_round_id, last_round_id, updated_at, anomaly_id))


def insert_round_errors(conn: sqlite3.Connection, evaluation_id: int, model_version: int, threshold: float | None,
                        rows: Iterable[tuple[int, float, float, int]]) -> None:
    """The model's error per judged round: rows of (round_id, max_error, median_error, ports), one
    statement; a round judged again (never, normally) keeps its newest summary."""
    conn.executemany(
        "INSERT OR REPLACE INTO model_round_errors (round_id, evaluation_id, model_version, threshold, max_error, "
        "median_error, ports) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(int(r), evaluation_id, model_version, _finite(threshold), float(hi), float(mid), int(n))
         for r, hi, mid, n in rows])


def anomaly_spans(conn: sqlite3.Connection, first: int, last: int) -> list[tuple[int | None, int, int]]:
    """(port_id, first_round_id, last_round_id) of stored anomalies overlapping rounds first..last."""
    return [tuple(r) for r in conn.execute(
        "SELECT port_id, first_round_id, last_round_id FROM anomalies "
        "WHERE first_round_id <= ? AND last_round_id >= ? AND port_id IS NOT NULL", (last, first))]


# --- models ----------------------------------------------------------------------------------------

def active_model(conn: sqlite3.Connection) -> sqlite3.Row | None:
    """The model the next evaluation loads (newest 'active' row)."""
    return conn.execute("SELECT * FROM models WHERE status = 'active' ORDER BY version DESC LIMIT 1").fetchone()


def model(conn: sqlite3.Connection, version: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM models WHERE version = ?", (version,)).fetchone()


def models(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every model row, newest first."""
    return conn.execute("SELECT * FROM models ORDER BY version DESC").fetchall()


def next_model_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM models").fetchone()[0])


def insert_model(conn: sqlite3.Connection, *, version: int, created_at: float, parent_version: int | None,
                 path: str, threshold: float, train_windows: int, metadata: dict,
                 budget_per_day: float, held_out_rate_per_day: float, active: bool = True) -> None:
    """Add ``version`` as the active model; the previously active one becomes 'retired'. With
    ``active`` False it is stored as 'not-adopted' (a fleet model this host checked and refused)."""
    if active:
        conn.execute("UPDATE models SET status = 'retired' WHERE status = 'active'")
    conn.execute(
        "INSERT INTO models (version, created_at, parent_version, path, threshold, train_windows, status, "
        "metadata, budget_per_day, held_out_rate_per_day) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (version, created_at, parent_version, path, _finite(threshold), train_windows,
         "active" if active else "not-adopted",
         json.dumps(metadata, sort_keys=True, default=_json_default), budget_per_day, held_out_rate_per_day))


def rollback_to(conn: sqlite3.Connection, version: int) -> list[int]:
    """Make ``version`` active; newer versions become 'rolled-back'. Returns those versions."""
    newer = [r[0] for r in conn.execute("SELECT version FROM models WHERE version > ? AND status != 'pruned'",
                                        (version,))]
    conn.execute("UPDATE models SET status = 'rolled-back' WHERE version > ? AND status != 'pruned'", (version,))
    conn.execute("UPDATE models SET status = 'retired' WHERE status = 'active' AND version < ?", (version,))
    conn.execute("UPDATE models SET status = 'active' WHERE version = ?", (version,))
    return newer


def prunable_models(conn: sqlite3.Connection, keep: int) -> list[sqlite3.Row]:
    """Models with files beyond the newest ``keep`` (the active one is always kept)."""
    rows = conn.execute("SELECT * FROM models WHERE status != 'pruned' ORDER BY version DESC").fetchall()
    kept, out = 0, []
    for row in rows:
        if row["status"] == "active" or kept < keep:
            kept += 1
            continue
        out.append(row)
    return out


def mark_pruned(conn: sqlite3.Connection, versions: Iterable[int]) -> None:
    conn.executemany("UPDATE models SET status = 'pruned' WHERE version = ?", [(v,) for v in versions])


def _finite(value: float | None) -> float | None:
    """SQLite has no infinity a console user would read well: store None instead."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


def _json_default(value):
    """numpy scalars and arrays in model metadata."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
