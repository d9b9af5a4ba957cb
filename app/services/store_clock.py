"""The store's clock: what "now" is for a database.

A live store lives in wall-clock time. A replayed one (``python -m app replay``) lives in its capture's
time: its "now" is the end of its last round when that round was replayed. Every time-dependent step
that judges a store — an evaluation's findings and blocks (TTL expiry, the peer look-back), the reports'
window ("24h" back from now) — reads this clock, so a capture replayed today is judged as of its own end.

    now(conn) -> Unix seconds
    clock(db_path) -> a zero-argument callable returning the store's now (read once)
"""
from __future__ import annotations

import time
from pathlib import Path

from app.db import rounds as rounds_db
from app.db.connection import connect


def now(conn) -> float:
    """Unix seconds: the last round's end when it was replayed, else the wall clock."""
    row = rounds_db.last_round(conn)
    if row is not None and "replayed" in row.keys() and row["replayed"]:
        return float(row["end_time"])
    return time.time()


def clock(db_path: str | Path):
    """The store's clock as a callable for evaluation.run(clock=...): a replayed store's now (fixed), else
    time.time. A database that does not exist yet is live."""
    if not Path(db_path).exists():
        return time.time
    conn = connect(db_path, readonly=True)
    try:
        row = rounds_db.last_round(conn)
        replayed = row is not None and "replayed" in row.keys() and row["replayed"]
        at = now(conn)
    finally:
        conn.close()
    return (lambda: at) if replayed else time.time
