"""portwatch in a CrowdSec fleet: an XDP bouncer of the LAPI's decisions (pull), and a source of its
own (push), once per collector round (:func:`sync_round`); the README's CrowdSec section has the whole
behaviour. Called from the collection loop's after-round hook, never from the collector; it touches the
blocklist through ``decisions.Protection.gather``, ``enforcement.normalise`` / ``capacity`` and the
ledger queries of app/db/blacklist.py.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field

from app.config import ConfigError
from app.db import blacklist as ledger
from app.db import fleet as db
from app.errors import PortwatchError
from app.services.blocklist import decisions
from app.services.kernel import enforcement
from app.services.fleet.lapi import TOKENS, Deadline, Lapi, LapiError, go_duration
from app.services.text import utc

log = logging.getLogger(__name__)

PUSH_BATCH = 50                  # alerts per POST /v1/alerts
EXPIRY_SLACK = 5.0               # seconds: a decision ending this close to a local block's end is that block
SCENARIO_PREFIX = "portwatch/"
ORIGIN = "crowdsec"              # the origin of portwatch's pushed decisions: a machine's, as an agent's are


@dataclass
class SyncResult:
    """What one round's sync did (counts of decisions / ledger rows / pushes)."""
    pulled: bool = False                 # the stream was read this round
    full: bool = False                   # ... as a full list (startup=true)
    new: int = 0                         # decisions that arrived
    deleted: int = 0                     # decisions deleted or expired in the LAPI
    added: list = field(default_factory=list)      # ledger rows (CIDR) added or renewed as origin 'crowdsec'
    lifted: list = field(default_factory=list)     # ledger rows lifted (their decisions are gone)
    refused: list = field(default_factory=list)    # (CIDR, why) refused by an interlock this round
    queued: int = 0                      # pushes queued this round
    pushed: int = 0                      # alerts accepted by the LAPI this round
    deleted_there: int = 0               # decisions deleted in the LAPI for hand unblocks
    pending: int = 0                     # pushes still waiting
    error: str | None = None             # the first failure of the round, if any
    seconds: float = 0.0


def enabled(settings) -> bool:
    return bool(settings.crowdsec.lapi_url)


def sync_round(conn, settings, now: float | None = None) -> SyncResult:
    """Pull, apply, push — bounded in time, never raising (a failure is logged and recorded).

    Runs before the blocklist's reconcile, so what it adds is enforced in the same round. The LAPI
    down: local blocking goes on (the mirror keeps enforcing what it holds until each decision's end),
    pushes wait, and the round loses at most ``crowdsec.max_seconds`` (every request has
    ``crowdsec.timeout_seconds``; the first failure ends the LAPI work of the round). Outages are
    logged when they begin and end, not every round."""
    started = time.monotonic()
    result = SyncResult()
    cfg = settings.crowdsec
    problems = cfg.problems()
    if problems:
        result.error = problems[0]
        log.warning("crowdsec sync skipped: %s", "; ".join(problems))
        return result
    now = time.time() if now is None else now
    deadline = Deadline(cfg.max_seconds)
    lapi = Lapi(cfg.lapi_url, cfg.timeout_seconds, cfg.ca_file)
    try:
        state = db.state(conn)
        if cfg.bouncer_key:
            _pull(conn, settings, lapi, state, deadline, now, result)
        _apply(conn, settings, now, result)
        if cfg.machine_id:
            _queue(conn, settings, now, result)
            if result.error is None:
                _push(conn, settings, lapi, deadline, time.time(), result)
            with ledger.immediate(conn):
                result.pending = db.count_pending(conn)
        _record(conn, state, result, now)
    except (PortwatchError, ConfigError, sqlite3.Error) as exc:
        result.error = result.error or str(exc)
        log.warning("crowdsec sync failed this round (the next round retries): %s", exc)
    except Exception:  # a bug here must not cost the collector its reconcile: logged with its traceback
        result.error = result.error or "unexpected failure (traceback in the log)"
        log.exception("crowdsec sync failed unexpectedly this round (the next round retries)")
    result.seconds = time.monotonic() - started
    return result


# --- pull -----------------------------------------------------------------------------------------

def _decision_row(d: dict, now: float) -> tuple | None:
    """(id, CIDR, scenario, origin, until) of a ban decision on an Ip or Range, else None."""
    if str(d.get("type", "")).lower() != "ban" or str(d.get("scope", "")).lower() not in ("ip", "range"):
        return None
    try:
        network = enforcement.normalise(ipaddress.ip_network(str(d["value"]).strip(), strict=False))
        until = now + go_duration(str(d.get("duration", "")))
        return int(d["id"]), str(network), d.get("scenario"), d.get("origin"), until
    except (KeyError, TypeError, ValueError):
        log.debug("crowdsec: ignoring a decision portwatch cannot read: %r", d)
        return None


def _pull(conn, settings, lapi: Lapi, state: dict, deadline: Deadline, now: float, result: SyncResult) -> None:
    """Mirror the bouncer's decision stream (``GET /v1/decisions/stream``; a full list with startup=true
    on the first pull, after a failed one and every ``crowdsec.resync_seconds``) in
    ``crowdsec_decisions`` (ban decisions of scope Ip or Range only)."""
    cfg = settings.crowdsec
    last_full = float(state.get("last_full_at") or 0)
    full = state.get("last_pull_ok") != "1" or now - last_full >= cfg.resync_seconds
    try:
        new, deleted = lapi.stream(cfg.bouncer_key, full, deadline)
    except LapiError as exc:
        result.error = str(exc)
        return
    rows = [r for r in (_decision_row(d, now) for d in new) if r is not None]
    gone = set()
    for d in deleted:
        try:
            gone.add(int(d["id"]))
        except (KeyError, TypeError, ValueError):
            continue
    with ledger.immediate(conn):
        if full:
            gone |= db.mirror_ids(conn) - {r[0] for r in rows}
        result.deleted = db.delete_decisions(conn, gone) if gone else 0
        db.upsert_decisions(conn, rows, now)
    result.pulled, result.full, result.new = True, full, len(rows)


# --- mirror -> ledger -----------------------------------------------------------------------------

def _apply(conn, settings, now: float, result: SyncResult) -> None:
    """Make the ledger's crowdsec rows follow the mirror (one transaction).

    An address with a running decision gets an 'active' row of origin 'crowdsec' that expires with the
    decision; when its last decision ends or is deleted in the LAPI the row is lifted ('expired'). The
    interlocks still apply: this host's addresses, gateways, resolvers, SSH peers and the allowlist are
    never blocked whatever the LAPI says, nor a range wider than ``crowdsec.widest_prefix_ipv4`` /
    ``_ipv6`` (/16, /32) — such a decision is refused once (a warning, a blacklist_events row,
    ``crowdsec_decisions.refused``). A local row already covering the address is left alone (its own
    expiry wins); an address removed by hand after the decision was first seen stays removed.
    ``blocklist.dry_run`` and the blocklist's capacity apply as to local decisions."""
    protection = None
    status = "dry-run" if settings.blocklist.dry_run else "active"
    limit = enforcement.capacity(settings)
    full = 0
    with ledger.immediate(conn):
        db.delete_ended(conn, now)
        for row in db.orphaned_entries(conn):
            db.lift_entry(conn, row["address"], now)
            ledger.insert_event(conn, now, row["address"], "crowdsec-lift",
                                "no CrowdSec decision holds it any more (ended or deleted in the LAPI)")
            result.lifted.append(row["address"])
        if not settings.blocklist.enabled:
            return
        n_listed = ledger.count_status(conn, status)
        for w in db.wanted(conn, now + EXPIRY_SLACK, EXPIRY_SLACK):   # rows not enforced as long already
            listed = w["status"] in ledger.LISTED
            if w["status"] == "removed" and w["removed_at"] is not None and w["removed_at"] >= w["seen_at"]:
                continue                                  # removed by hand after the decision came: stays removed
            if listed and w["ledger_origin"] == "crowdsec":
                db.set_expiry(conn, w["address"], w["until"])
                result.added.append(w["address"])
                continue
            if listed:
                continue                                  # a local block: it ends first, then the decision follows
            why = too_wide(w["address"], settings.crowdsec)
            if why is None:
                if protection is None:
                    protection = decisions.Protection.gather(settings)
                why = protection.refusal(ipaddress.ip_network(w["address"]))
            if why:
                db.refuse(conn, w["address"], why)
                ledger.insert_event(conn, now, w["address"], "crowdsec-refused",
                                    f"CrowdSec decision {w['scenario']} ({w['origin']}) not enforced: {why}")
                log.warning("crowdsec: refused the LAPI's decision on %s (%s): it %s", w["address"], w["scenario"], why)
                result.refused.append((w["address"], why))
                continue
            if n_listed >= limit:
                full += 1
                continue
            evidence = {"origin": "crowdsec", "scenario": w["scenario"], "lapi_origin": w["origin"],
                        "decision_ids": [int(i) for i in str(w["ids"]).split(",")]}
            ledger.upsert_entry(conn, w["address"], f"CrowdSec decision {w['scenario']} ({w['origin']})",
                                json.dumps(evidence), None, "crowdsec", now, w["until"], status, w["offences"] or 1)
            ledger.insert_event(conn, now, w["address"], "block" if status == "active" else "would-block",
                                f"crowdsec: {w['scenario']} ({w['origin']}) until "
                                f"{utc(w['until'])}")
            n_listed += 1
            result.added.append(w["address"])
    if full:
        log.warning("crowdsec: the blocklist is full (%d entries): %d LAPI decision(s) not enforced this round",
                    limit, full)
    if result.added or result.lifted:
        log.info("crowdsec: %d entr%s added or renewed, %d lifted", len(result.added),
                 "y" if len(result.added) == 1 else "ies", len(result.lifted))


def too_wide(address: str, cfg) -> str | None:
    """Why a decision on ``address`` (CIDR) covers more than one LAPI may block here, or None: a range
    wider than crowdsec.widest_prefix_ipv4 / _ipv6 (a poisoned or mistaken LAPI must not be able to
    drop a quarter of the Internet)."""
    network = ipaddress.ip_network(address)
    widest = cfg.widest_prefix_ipv4 if network.version == 4 else cfg.widest_prefix_ipv6
    if network.prefixlen >= widest:
        return None
    key = f"crowdsec.widest_prefix_ipv{network.version}"
    return f"is wider than /{widest} ({key})"


# --- push -----------------------------------------------------------------------------------------

def _queue(conn, settings, now: float, result: SyncResult) -> None:
    """Queue a push for every new block of a pushed detector, a delete for every hand unblock.

    Pushed: ledger rows of origin 'auto' whose anomaly's detector is listed in ``crowdsec.push_detectors``
    ('manual' there pushes hand blocks too), each queued once in ``crowdsec_pushes``. The queue is
    bounded (``crowdsec.max_pending``, oldest dropped with a warning) and kept across runs."""
    cfg = settings.crowdsec
    detectors = set(cfg.push_detectors)
    origins = ("auto", "manual") if "manual" in detectors else ("auto",)
    with ledger.immediate(conn):
        for row in db.unpushed_blocks(conn, origins, now):
            detector = "manual" if row["origin"] == "manual" else row["detector"]
            if detector not in detectors:
                continue
            db.queue_push(conn, row["address"], row["created_at"], "add", SCENARIO_PREFIX + detector,
                          row["summary"] or row["reason"], row["expires_at"], now)
            result.queued += 1
        for push in db.unblocked_pushes(conn):
            if push["state"] == "pending":                # never sent: nothing to delete there
                db.set_push_state(conn, push["id"], "cancelled")
                continue
            db.queue_push(conn, push["address"], push["block_created_at"], "delete", push["scenario"], None, None, now)
            result.queued += 1
        dropped = db.drop_oldest_pending(conn, cfg.max_pending)
    if dropped:
        log.warning("crowdsec: %d queued push(es) dropped: more than crowdsec.max_pending (%d) wait for the LAPI",
                    dropped, cfg.max_pending)


def _alert(push, now: float) -> dict:
    """An alert with its one ban decision, as an agent sends it (POST /v1/alerts)."""
    network = ipaddress.ip_network(push["address"])
    single = network.prefixlen == network.max_prefixlen
    value = str(network.network_address) if single else str(network)
    scope = "Ip" if single else "Range"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    seconds = max(1, int(push["expires_at"] - now))
    source = {"scope": scope, "value": value, **({"ip": value} if single else {"range": value})}
    return {"scenario": push["scenario"], "scenario_hash": "", "scenario_version": "1",
            "message": push["message"] or push["scenario"], "events_count": 1, "start_at": stamp, "stop_at": stamp,
            "capacity": 0, "leakspeed": "0", "simulated": False, "remediation": True, "events": [],
            "source": source,
            "decisions": [{"origin": ORIGIN, "type": "ban", "scope": scope, "value": value,
                           "duration": f"{seconds}s", "scenario": push["scenario"]}]}


def _push(conn, settings, lapi: Lapi, deadline: Deadline, now: float, result: SyncResult) -> None:
    """Send the queue: alerts with one ban decision each (scenario ``portwatch/<detector>``, duration =
    what is left of the block's TTL, message = the finding's summary, else the ledger's reason), and
    the queued deletes; what could not be sent is retried next round."""
    cfg = settings.crowdsec
    with ledger.immediate(conn):
        pending = db.pending_pushes(conn)
    if not pending:
        return
    try:
        token = TOKENS.get(lapi, cfg.machine_id, cfg.machine_password, deadline)
    except LapiError as exc:
        result.error = str(exc)
        with ledger.immediate(conn):
            db.push_failed(conn, [p["id"] for p in pending], str(exc))
        return
    adds = [p for p in pending if p["action"] == "add"]
    expired = [p for p in adds if p["expires_at"] is not None and p["expires_at"] <= now + 1]
    adds = [p for p in adds if p not in expired]
    with ledger.immediate(conn):
        for p in expired:
            db.set_push_state(conn, p["id"], "dropped")
    try:
        for i in range(0, len(adds), PUSH_BATCH):
            batch = adds[i:i + PUSH_BATCH]
            ids = lapi.push_alerts(token, [_alert(p, now) for p in batch], deadline)
            with ledger.immediate(conn):
                for k, p in enumerate(batch):
                    db.set_push_state(conn, p["id"], "sent", now, ids[k] if k < len(ids) else None)
            result.pushed += len(batch)
        for p in (p for p in pending if p["action"] == "delete"):
            network = ipaddress.ip_network(p["address"])
            single = network.prefixlen == network.max_prefixlen
            where = {"ip": str(network.network_address)} if single else {"range": str(network)}
            result.deleted_there += lapi.delete_decisions(token, deadline, scenario=p["scenario"], **where)
            with ledger.immediate(conn):
                db.set_push_state(conn, p["id"], "sent", now)
    except LapiError as exc:
        if exc.status == 401:
            TOKENS.forget(lapi, cfg.machine_id)
        result.error = str(exc)
        with ledger.immediate(conn):
            db.push_failed(conn, [p["id"] for p in db.pending_pushes(conn)], str(exc))
    if result.pushed:
        log.info("crowdsec: pushed %d block(s) to %s", result.pushed, cfg.lapi_url)


# --- state ----------------------------------------------------------------------------------------

def _record(conn, state: dict, result: SyncResult, now: float) -> None:
    """Keep the sync state; log an outage when it begins and when it ends, not every round."""
    was_down = state.get("lapi_down") == "1"
    down = result.error is not None
    values = {"last_sync_at": now, "lapi_down": int(down), "last_error": result.error}
    if result.pulled:
        values.update(last_pull_at=now, last_pull_ok=1,
                      pulled_total=int(state.get("pulled_total") or 0) + result.new)
        if result.full:
            values["last_full_at"] = now
    elif result.error is not None and not result.pulled:
        values["last_pull_ok"] = 0
    if result.pushed:
        values.update(last_push_at=now, pushed_total=int(state.get("pushed_total") or 0) + result.pushed)
    with ledger.immediate(conn):
        db.set_state(conn, values)
    if down and not was_down:
        log.warning("crowdsec: %s; local blocking goes on, pushes wait (retried every round)", result.error)
    elif was_down and not down:
        log.info("crowdsec: the LAPI answers again")


def status(conn) -> dict:
    """The sync state for `fleet status` and metrics: what was pulled, pushed, what waits."""
    state = db.state(conn)
    mirrored, refused = db.count_mirror(conn)
    pushes = db.push_counts(conn)
    return {
        "lapi_down": state.get("lapi_down") == "1", "last_error": state.get("last_error"),
        "last_sync_at": _float(state.get("last_sync_at")), "last_pull_at": _float(state.get("last_pull_at")),
        "last_full_at": _float(state.get("last_full_at")), "last_push_at": _float(state.get("last_push_at")),
        "pulled_total": int(state.get("pulled_total") or 0), "pushed_total": int(state.get("pushed_total") or 0),
        "decisions": mirrored, "refused": refused, "enforced": db.count_origin(conn, "crowdsec"),
        "pending": pushes.get("pending", 0), "dropped": pushes.get("dropped", 0), "sent": pushes.get("sent", 0),
    }


def _float(text):
    return None if text in (None, "") else float(text)
