"""Manual changes to the blocklist (the ``blacklist add|remove|flush`` commands): parse what a person
typed, check it against the same interlocks as automatic decisions, write the ledger.

Its own small module because it needs both halves and belongs to neither: the interlocks
(:class:`decisions.Protection`) and the map's capacity (enforcement). Enforcement never imports
it; the caller enforces with :func:`app.services.kernel.enforcement.apply` after a change.
"""
from __future__ import annotations

import json
import logging
import math
import time

from app.db import blacklist as db
from app.errors import UsageError
from app.services.blocklist.decisions import Decision, Protection
from app.services.kernel.enforcement import capacity, parse_network

log = logging.getLogger(__name__)


def add_manual(conn, settings, text: str, ttl: float | None = None, reason: str | None = None, force: bool = False,
               now: float | None = None, protection: Protection | None = None) -> Decision:
    """List ``text`` (ADDR or ADDR/LEN) by hand. Checks everything before changing anything.

    A protected or allowlisted network is refused unless ``force``. ttl None uses
    ``blocklist.manual_ttl_seconds``. Manual entries are always 'active' (dry-run is about automatic
    decisions). The caller enforces with :func:`enforcement.apply`.
    """
    network = parse_network(text)
    ttl = settings.blocklist.manual_ttl_seconds if ttl is None else ttl
    if not (ttl > 0 and math.isfinite(ttl)):
        raise UsageError(f"--ttl must be a positive number of seconds, not {ttl:g}")
    protection = protection if protection is not None else Protection.gather(settings)
    why = protection.refusal(network)
    if why and not force:
        raise UsageError(f"{network} is not blocked because it {why}: pass --force to block it anyway")
    now = time.time() if now is None else now
    address = str(network)
    reason = (reason or "").strip() or "manual"
    with db.immediate(conn):
        row = db.get_entry(conn, address)
        listed = row is not None and row["status"] == "active"
        limit = capacity(settings)
        if not listed and db.count_status(conn, "active") >= limit:
            raise UsageError(f"the blocklist is full ({limit} entries): remove entries first or raise "
                             "blocklist.max_entries and collector.blacklist_map_size")
        offences = row["offences"] if row is not None else 1
        evidence = {"origin": "manual", "forced": why} if why else {"origin": "manual"}
        db.upsert_entry(conn, address, reason, json.dumps(evidence), None, "manual", now, now + ttl, "active", offences)
        detail = f"manual: {reason}, ttl {ttl:.0f} s" + (f", forced although it {why}" if why else "")
        db.insert_event(conn, now, address, "block", detail)
    if why:
        log.warning("blocked %s by hand although it %s (--force)", address, why)
    return Decision(address, "block", reason, None, "manual", now, now + ttl, ttl, offences, detail, evidence)


def remove_manual(conn, settings, text: str, now: float | None = None) -> str:
    """Take ``text`` off the blocklist by hand (status 'removed'; automatic re-blocks wait out the grace)."""
    address = str(parse_network(text))
    now = time.time() if now is None else now
    with db.immediate(conn):
        row = db.get_entry(conn, address)
        if row is None or row["status"] not in db.LISTED:
            raise UsageError(f"{address} is not on the blocklist: `python -m app blacklist list` shows what is")
        db.mark_removed(conn, address, now)
        db.insert_event(conn, now, address, "remove", f"by hand (was {row['status']})")
    log.info("removed %s from the blocklist", address)
    return address


def flush(conn, settings, now: float | None = None) -> list[str]:
    """Take every listed entry off the blocklist (as a manual remove each); returns their addresses."""
    now = time.time() if now is None else now
    with db.immediate(conn):
        rows = db.entries(conn)
        for row in rows:
            db.mark_removed(conn, row["address"], now)
            db.insert_event(conn, now, row["address"], "remove", f"flush (was {row['status']})")
    log.info("flushed %d blocklist entries", len(rows))
    return [r["address"] for r in rows]
