"""`down`: close a final round into the database that enforces the interface, detach, unpin (:func:`down`).

The escape hatch works whatever database owns the interface: the pin record (pin_owner) names it,
and the final round goes there when it can be opened and is that database; otherwise the program
is still detached and the pins removed, and the output says why no final round was stored.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from app.db import rounds as rounds_db
from app.db.connection import connect
from app.errors import DatabaseError, NeedsRootError, PortwatchError
from app.services import locks
from app.services.kernel import enforcement
from app.services.kernel import egress, maps, pin_owner, xdp
from app.services.collector.collector import Collector, Observations

log = logging.getLogger(__name__)


def down(settings, interface: str) -> list[str]:
    """Final round, detach, unpin for ``interface``. Returns what was done (sentences).

    Order (exact counts): take the interface lock (no collector round runs meanwhile), detach the
    program (the maps stop counting), close the final round from the frozen maps (every packet up to
    the detach is stored, and the blacklist's last drops reach the ledger), then remove the pins. A
    leftover portwatch program nothing records is detached too (pin_owner.describe_attachment)."""
    if os.geteuid() != 0:
        raise NeedsRootError("detaching XDP needs root: run it with sudo")
    done: list[str] = []
    pdir = xdp.pin_dir(settings, interface)
    with locks.hold_interface(interface, f"a collector is running on {interface}: stop it first (SIGTERM ends it "
                                         "after its round), then run down again"):
        record = pin_owner.read(pdir) if pdir.exists() else None
        done += detach(settings, interface)
        if (pdir / "port_stats").exists():
            done.append(final_round(settings, interface, record))
        unpinned = unpin(settings, interface)
        if unpinned:
            done.append(unpinned)
    return done


def detach(settings, interface: str) -> list[str]:
    """Detach portwatch's programs from ``interface``: the XDP program that is pinned, that the pin record
    names, or a leftover one nothing records (known by its name); the TC egress program (and the clsact
    qdisc when portwatch added it). Programs that are not portwatch's are left attached (logged)."""
    done: list[str] = []
    if not Path(f"/sys/class/net/{interface}").exists():
        return done
    info = xdp.describe(interface, settings.general.pin_root)
    if info["egress_attached"] and not info["egress_ours"] and info["egress_pinned_program_id"] is not None:
        log.warning("the TC egress program on %s (id %d) is not portwatch's: left attached", interface,
                    info["egress_program_id"])
    elif info["egress_attached"] or info["clsact_added"]:
        done += egress.detach(interface, remove_clsact=info["clsact_added"])
    att = pin_owner.describe_attachment(interface, settings.general.pin_root)
    if att["program_id"] is None:
        return done
    if not (att["recorded"] or att["leftover"]):
        log.warning("the XDP program on %s (id %s, %s) is not portwatch's: left attached", interface,
                    att["program_id"], att["program_name"])
        return done
    for off in ("xdp", "xdpgeneric", "xdpdrv"):
        subprocess.run(["ip", "link", "set", "dev", interface, off, "off"], capture_output=True)
    what = "leftover " if att["leftover"] else ""
    done.append(f"detached {what}XDP program {att['program_id']} from {interface}")
    return done


def unpin(settings, interface: str) -> str | None:
    """Remove the pins of ``interface`` (maps, programs, record); returns what was done, or None."""
    pdir = xdp.pin_dir(settings, interface)
    if not pdir.exists():
        return None
    shutil.rmtree(pdir, ignore_errors=True)
    try:
        pdir.parent.rmdir()
    except OSError:
        pass
    return f"removed pins {pdir}"


def final_round(settings, interface: str, record: dict | None) -> str:
    """Close the last round from the (detached, so frozen) maps into the owning database; one sentence."""
    record = record or {}
    db_path = Path(record.get("db_path") or settings.general.db)
    if not db_path.exists():
        return f"no final round stored: the database that enforced {interface} ({db_path}) does not exist"
    collector = Collector(settings, interface)
    collector.db_path = db_path
    try:
        open_as_is(collector, record.get("db_id"))
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


def open_as_is(collector: Collector, expected_db_id: str | None = None) -> None:
    """Open ``collector``'s database and pinned maps as they are — nothing is loaded, claimed or reconciled
    (`down` holds the interface lock and has detached the program). DatabaseError when the database is not
    the one the pin record names."""
    collector.conn = connect(collector.db_path)
    try:
        found = rounds_db.read_database_id(collector.conn)
        if expected_db_id and found != expected_db_id:
            raise DatabaseError(f"database {collector.db_path} is not the one that enforces {collector.interface} "
                                "(its identity differs)")
        collector.db_id = found
        pdir = collector.pin_dir
        collector.record = pin_owner.read(pdir)
        collector.load_state = xdp.pinned_state(collector.interface, pdir)
        collector.close_retired()
        collector._born = pin_owner.born_ids(pdir)
        collector._maps = maps.open_maps(pdir)
    except BaseException:
        collector.close()
        raise
