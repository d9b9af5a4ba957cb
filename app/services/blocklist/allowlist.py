"""The allowlist kept in the database (`python -m app allow add|remove|list`), beside the config's
``blocklist.allowlist``. Both are honoured by every automatic decision and CrowdSec pull
(:meth:`app.services.blocklist.decisions.Protection.gather`) and refuse a manual `blacklist add` without --force.

Adding an address lifts the listed blocklist entries that overlap it (status 'removed', an
'allow' event each); the caller then enforces with :func:`app.services.kernel.enforcement.apply`, which
takes them out of every pinned map. Removing an address only stops protecting it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from app.db import allowlist as db
from app.db import blacklist as ledger
from app.errors import PortwatchError, UsageError
from app.services.kernel.enforcement import parse_network

log = logging.getLogger(__name__)


def parse(text: str):
    """ADDR or ADDR/LEN (no %zone, host bits clear) as a network; UsageError with one sentence otherwise."""
    if "%" in (text or ""):
        raise UsageError(f"{text} carries a zone (%...): the allowlist holds addresses without zones, give it "
                         "without the %zone")
    return parse_network(text)


def addresses(settings, conn=None) -> list[str]:
    """The database's allowlist (CIDR texts), read through ``conn`` or from general.db when it exists."""
    if conn is not None:
        return [r["address"] for r in db.entries(conn)]
    path = Path(settings.general.db)
    if not path.exists():
        return []
    from app.db.connection import connect
    try:
        own = connect(path, readonly=True)
    except PortwatchError as exc:
        log.warning("cannot read the allowlist in %s (%s): only the configured allowlist applies", path, exc)
        return []
    try:
        return [r["address"] for r in db.entries(own)]
    finally:
        own.close()


def add(conn, text: str, reason: str | None = None, now: float | None = None) -> tuple[str, list[str]]:
    """Allow ``text``; returns (its CIDR, the blocklist entries lifted because they overlap it)."""
    network = parse(text)
    address = str(network)
    now = time.time() if now is None else now
    lifted = []
    with ledger.immediate(conn):
        db.add(conn, address, (reason or "").strip() or None, now)
        for row in ledger.entries(conn, ledger.LISTED):
            entry = parse(row["address"])
            if entry.version == network.version and entry.overlaps(network):
                ledger.mark_removed(conn, row["address"], now)
                ledger.insert_event(conn, now, row["address"], "remove",
                                    f"allowlisted {address} (was {row['status']}: {row['reason']})")
                lifted.append(row["address"])
    log.info("allowlisted %s%s", address, f"; lifted {', '.join(lifted)}" if lifted else "")
    return address, lifted


def remove(conn, text: str) -> str:
    """Stop allowing ``text`` (exactly as listed); UsageError when it is not in the database's allowlist."""
    address = str(parse(text))
    with ledger.immediate(conn):
        if not db.remove(conn, address):
            raise UsageError(f"{address} is not on the allowlist kept in the database: `python -m app allow list` "
                             "shows what is")
    log.info("removed %s from the allowlist", address)
    return address


def listing(settings, conn=None) -> list[dict]:
    """Both allowlists: [{address, origin ('database' or 'config'), reason, created_at}]."""
    rows = [{"address": r["address"], "origin": "database", "reason": r["reason"], "created_at": r["created_at"]}
            for r in (db.entries(conn) if conn is not None else [])]
    rows += [{"address": a, "origin": "config", "reason": "blocklist.allowlist", "created_at": None}
             for a in settings.blocklist.allowlist]
    return rows
