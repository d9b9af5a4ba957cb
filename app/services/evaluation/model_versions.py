"""Model versions as the operator sees them: the list (the threshold history of each refit), a
rollback to an older version, where a version's files live and the removal of a pruned version's files.

A version's files live in <state_dir>/models/<database identity>/<version>/: two databases sharing a
state dir (a lab, a test, a second interface) number their versions independently, so each keeps its
own directory and pruning one never touches the other's files.

Reads config.json and the models table only: nothing here imports TensorFlow.
"""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

from app.config import Settings
from app.db import evaluations as dbe
from app.db import rounds as rounds_db
from app.errors import UsageError

log = logging.getLogger(__name__)


def list_models(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every model version, newest first."""
    return dbe.models(conn)


def rollback(conn: sqlite3.Connection, version: int) -> list[int]:
    """Make ``version`` the active model again; returns the versions rolled back.

    UsageError when the version does not exist or its files were pruned.
    """
    row = dbe.model(conn, version)
    if row is None:
        raise UsageError(f"there is no model version {version}: see python -m app model list")
    if row["status"] == "pruned" or not (Path(row["path"]) / "config.json").exists():
        raise UsageError(f"model version {version} has no files any more (pruned): choose another version")
    from app.services.evaluation.model import not_loadable
    why = not_loadable(row["path"])
    if why:
        raise UsageError(f"model version {version} is not loadable by this portwatch ({why}): choose another version")
    with conn:
        return dbe.rollback_to(conn, version)


def models_root(settings: Settings, conn: sqlite3.Connection) -> Path:
    """<state_dir>/models/<this database's identity>: the only directory its versions are written
    to and pruned from (the identity is made on first use, outside any open transaction)."""
    return settings.state_path / "models" / rounds_db.database_id(conn)


def model_dir(settings: Settings, conn: sqlite3.Connection, version: int) -> Path:
    """Where model ``version`` of this database is saved."""
    return models_root(settings, conn) / str(version)


def remove_model_dir(settings: Settings, conn: sqlite3.Connection, path: str) -> None:
    """Remove a pruned version's files, only inside this database's models directory (a path of an
    older layout, shared by every database of the state dir, is left alone)."""
    root = models_root(settings, conn).resolve()
    target = Path(path).resolve()
    if root in target.parents and target.exists():
        shutil.rmtree(target, ignore_errors=True)
        log.info("pruned model files %s", target)
    elif target.exists():
        log.info("model files %s are not in this database's directory %s: left in place", target, root)


def out_of_sample_text(cal: dict) -> str:
    """'0.00/d (95 % <= 18)' from a stored calibration (models.metadata), '-' when it has no out-of-sample check."""
    rate, upper = cal.get("out_of_sample_rate_per_day"), cal.get("out_of_sample_upper_per_day")
    if rate is None or upper is None:
        return "-"
    return f"{rate:.2f}/d (95 % <= {upper:.3g})"


def threshold_history(row) -> dict:
    """One models row as a step of the threshold history: {version, created_at, threshold, change,
    pool}. change: the threshold's move at this refit ('x1.8', '/2' ; '*' when held to
    evaluator.threshold_max_change; '-' on a first fit); pool: held-out windows against what the
    alert budget needs ('120/960', '!' while the model does not alert); out_of_sample: the calibration's
    own out-of-sample false alerts per day and their 95 % upper bound ('0.00/d (95 % <= 18)', '-')."""
    try:
        meta = json.loads(row["metadata"] or "{}")
    except ValueError:
        meta = {}
    cal, pool = meta.get("calibration") or {}, meta.get("pool") or {}
    change = "-"
    before, now = cal.get("previous_threshold"), cal.get("threshold")
    if before and now:
        factor = now / before
        change = f"x{factor:.2g}" if factor >= 1 else f"/{1 / factor:.2g}"
        if cal.get("unbounded_threshold") not in (None, now):
            change += "*"
    held = f"{pool['windows']}/{pool['needed']}{'' if pool.get('alerting') else '!'}" if pool else "-"
    return {"version": row["version"], "created_at": row["created_at"], "threshold": row["threshold"],
            "change": change, "pool": held, "out_of_sample": out_of_sample_text(cal) if cal else "-"}
