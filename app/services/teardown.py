"""`down`: close a final round into the database that enforces the interface, detach, unpin.

The escape hatch works whatever database owns the interface: the pin record (pin_owner) names it,
and the final round goes there when it can be opened and is that database; otherwise the program
is still detached and the pins removed, and the output says why no final round was stored.

Order (exact counts): take the interface lock (no collector round runs meanwhile), detach the
program (the maps stop counting), close the final round from the frozen maps (every packet up to
the detach is stored, and the blacklist's last drops reach the ledger), then remove the pins.
A leftover portwatch program nothing records is detached too (pin_owner.describe_attachment).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from app.errors import NeedsRootError, PortwatchError
from app.services import enforcement, locks, pin_owner, xdp
from app.services.collector import Collector, Observations

log = logging.getLogger(__name__)


def down(settings, interface: str) -> list[str]:
    """Final round, detach, unpin for ``interface``. Returns what was done (sentences)."""
    if os.geteuid() != 0:
        raise NeedsRootError("detaching XDP needs root: run it with sudo")
    done: list[str] = []
    pdir = xdp.pin_dir(settings, interface)
    with locks.holding(settings, f"collector-{interface}",
                       f"a collector is running on {interface}: stop it first (SIGTERM ends it after its round), "
                       "then run down again"):
        record = pin_owner.read(pdir) if pdir.exists() else None
        detached = xdp.detach(settings, interface)
        if detached:
            done.append(detached)
        if (pdir / "port_stats").exists():
            done.append(final_round(settings, interface, record))
        unpinned = xdp.unpin(settings, interface)
        if unpinned:
            done.append(unpinned)
    return done


def final_round(settings, interface: str, record: dict | None) -> str:
    """Close the last round from the (detached, so frozen) maps into the owning database; one sentence."""
    record = record or {}
    db_path = Path(record.get("db_path") or settings.general.db)
    if not db_path.exists():
        return f"no final round stored: the database that enforced {interface} ({db_path}) does not exist"
    collector = Collector(settings, interface)
    collector.db_path = db_path
    try:
        collector.open_as_is(record.get("db_id"))
        summary = collector.close_round(time.time(), Observations(), note="final round: down", reconcile=False)
        enforcement.retire_map(collector.conn, interface, collector.pin_dir / "blacklist")
    except (PortwatchError, sqlite3.Error) as exc:
        log.warning("no final round stored for %s: %s", interface, exc)
        return f"no final round stored ({exc})"
    finally:
        collector.close()
    if summary.baseline:
        return f"stored a baseline round {summary.round_id} in {db_path}"
    return f"stored a final round {summary.round_id} ({summary.packets} packets) in {db_path}"
