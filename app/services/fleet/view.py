"""The fleet view as metrics: `fleet status`'s state and the CrowdSec sync state as textfile samples.

Standard library and the database only (on the collector's path: no Flower, no TensorFlow).
Names and help texts live in app/services/ops/metrics.py (FLEET_GAUGES).
"""
from __future__ import annotations

import logging
import sqlite3

from app.services.ops import metrics

log = logging.getLogger(__name__)

# why a host refused a fleet model, by the code its evaluate reply carries (fleet/adoption.py)
REFUSALS = {1: "its error far above the local model's", 2: "false alerts above the budget"}


def model_values(models: list[dict]) -> dict:
    """Samples of the model versions by origin (rows of app.db.fleet.models_by_origin, newest first)."""
    fleet = [m for m in models if m["origin"] == "fleet"]
    return {
        "fleet_model_version": fleet[0]["version"] if fleet else None,
        "fleet_last_contribution_timestamp_seconds": fleet[0]["created_at"] if fleet else None,
        ("fleet_models", (("origin", "fleet"),)): len(fleet),
        ("fleet_models", (("origin", "local"),)): len(models) - len(fleet),
    }


def sync_values(sync: dict | None) -> dict:
    """Samples of app.services.fleet.crowdsec.status() (empty when CrowdSec is not configured)."""
    if sync is None:
        return {}
    return {
        "crowdsec_pulled_total": sync["pulled_total"], "crowdsec_pushed_total": sync["pushed_total"],
        "crowdsec_dropped_total": sync["dropped"], "crowdsec_pending": sync["pending"],
        "crowdsec_decisions": sync["decisions"], "crowdsec_enforced": sync["enforced"],
        "crowdsec_refused": sync["refused"], "crowdsec_lapi_up": 0 if sync["lapi_down"] else 1,
        "crowdsec_last_pull_timestamp_seconds": sync["last_pull_at"],
        "crowdsec_last_push_timestamp_seconds": sync["last_push_at"],
    }


def status_values(state: dict) -> dict:
    """Every fleet sample from `fleet status`'s state (app.commands.fleet.gather)."""
    values = model_values(state["models"])
    values.update(sync_values(state["crowdsec"]))
    rec = state.get("coordinator") or {}
    values["fleet_hosts"] = rec.get("hosts")
    if state.get("superlink_reachable") is not None:
        values["fleet_superlink_up"] = 1 if state["superlink_reachable"] else 0
    return values


def write_status(settings, state: dict):
    """`fleet status`: replace every fleet sample (what does not apply any more goes)."""
    return metrics.write_fleet(settings, status_values(state), keep_missing=False)


def write_sync(conn, settings):
    """The collector's round, after the CrowdSec sync: the sync state and model origins (a few
    queries). Never raises: a problem is logged."""
    if not getattr(settings.metrics, "textfile_dir", ""):
        return None
    from app.db import fleet as fleet_db
    from app.services.fleet import crowdsec
    try:
        values = sync_values(crowdsec.status(conn))
        values.update(model_values([dict(r) for r in fleet_db.models_by_origin(conn)]))
        return metrics.write_fleet(settings, values)
    except (sqlite3.Error, ValueError) as exc:
        log.warning("cannot write the fleet metrics: %s", exc)
        return None
