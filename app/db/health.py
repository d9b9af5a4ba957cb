"""Read-only queries behind the health checks (app/services/ops/health.py): status, doctor, metrics.

Every function takes a connection (``connect(path, readonly=True)`` is enough). Times are Unix
epoch seconds.
"""
from __future__ import annotations

import sqlite3

# evaluations that did nothing (no rounds to judge): they never hide the last real one
NO_OP_STATUSES = ("no-rounds",)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def round_facts(conn: sqlite3.Connection, recent: int = 10) -> dict:
    """{'rounds': count, 'last': row or None, 'interfaces': [...newest first], 'lengths': [seconds of
    the last ``recent`` rounds]}."""
    count = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    last = conn.execute("SELECT id, start_time, end_time, interface, xdp_mode FROM rounds"
                        " ORDER BY id DESC LIMIT 1").fetchone()
    lengths = [r[0] for r in conn.execute("SELECT end_time - start_time FROM rounds ORDER BY id DESC LIMIT ?",
                                          (int(recent),))]
    interfaces = [r[0] for r in conn.execute(
        "SELECT interface FROM rounds GROUP BY interface ORDER BY MAX(end_time) DESC")]
    return {"rounds": count, "last": dict(last) if last else None, "interfaces": interfaces, "lengths": lengths}


def last_real_evaluation(conn: sqlite3.Connection) -> dict | None:
    """The newest evaluation that was not a no-op (status 'ok', 'warm-up' or 'error: ...')."""
    marks = ",".join("?" * len(NO_OP_STATUSES))
    row = conn.execute("SELECT id, started_at, finished_at, status, anomalies, windows, model_version, threshold"
                       f" FROM evaluations WHERE status IS NULL OR status NOT IN ({marks})"
                       " ORDER BY id DESC LIMIT 1", NO_OP_STATUSES).fetchone()
    return dict(row) if row else None


def last_noop_evaluation(conn: sqlite3.Connection) -> dict | None:
    """The newest no-op evaluation (nothing to judge), or None."""
    marks = ",".join("?" * len(NO_OP_STATUSES))
    row = conn.execute(f"SELECT id, started_at, finished_at, status FROM evaluations WHERE status IN ({marks})"
                       " ORDER BY id DESC LIMIT 1", NO_OP_STATUSES).fetchone()
    return dict(row) if row else None


def active_model(conn: sqlite3.Connection) -> dict | None:
    """(version, created_at, threshold, path) of the active model; threshold NULL means infinite or unknown."""
    row = conn.execute("SELECT version, created_at, threshold, path FROM models WHERE status = 'active'"
                       " ORDER BY version DESC LIMIT 1").fetchone()
    return dict(row) if row else None


def active_blocks(conn: sqlite3.Connection) -> list[str]:
    """Addresses (CIDR text) the ledger holds in force, i.e. what every owned map must contain."""
    if not _has_table(conn, "blacklist"):
        return []
    return [r[0] for r in conn.execute("SELECT address FROM blacklist WHERE status = 'active' ORDER BY address")]
