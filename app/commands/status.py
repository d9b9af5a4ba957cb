"""`python -m app status [--json]`: is XDP attached and how, last round, last evaluation, model
version, blocklist size, database size, and whether all of that is healthy (:func:`gather`).

Exit codes: 0 healthy; 1 unhealthy (one line on stderr names the first failed check: README, Health);
2 bad interface name, or an interface that does not exist and has no pins (a typo is not health); 3 the
database is root-only and this user is not root; 4 corrupt database.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

from app.commands.registry import add_command
from app.errors import EXIT_ERROR
from app.services.text import json_dumps, utc, when

log = logging.getLogger(__name__)

DESCRIPTION = """Show what portwatch is doing on this host: XDP attached and in which mode on each
interface seen in the rounds (or --interface), the last round, the last evaluation, the active
model version, the blocklist size and the database size, then the health checks. Exits 1 with one
line on stderr when a check fails (scripts and monitoring can use the exit code). --json prints the
same as one JSON object; its "health" key holds every check as {name, ok, detail}."""

_IFNAME = re.compile(r"^[^/\s:]{1,15}$")


def register(sub) -> None:
    parser = add_command(sub, "status", "show XDP state, last round/evaluation, model, blocklist, database size; "
                         "exit 1 when unhealthy", DESCRIPTION)
    parser.add_argument("--interface", metavar="IF", action="append",
                        help="interface to describe (repeatable; default: every interface seen in the rounds)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with every health check)")
    parser.set_defaults(func=run)


def gather(settings, interfaces: list[str] | None = None, now: float | None = None) -> dict:
    """Everything ``status`` shows, as a JSON-ready dict; ``health`` holds the checks of
    app.services.ops.health (the same ones doctor and the metrics report).

    Reads only, but for the health samples it puts into metrics.textfile_dir when that is set (so
    node_exporter sees what status sees): the database is opened read-only, XDP state comes from
    netlink (kernel/attachment.py xdp_attachment: libbpf's bpf_xdp_query) and the pins under
    ``<pin_root>/<interface>/``."""
    from app.db import reports as queries
    from app.db.connection import connect
    from app.services.evaluation import warmup
    from app.services.ops import health
    now = time.time() if now is None else now
    facts = health.gather_facts(settings)
    db = Path(settings.general.db)
    status: dict = {"database": {"path": str(db), "exists": facts["exists"], "bytes": facts["bytes"],
                                 "max_mb": settings.general.max_db_mb}}
    summary = None
    status["warmup"] = []
    if facts["exists"]:
        conn = connect(db, readonly=True)
        try:
            summary = queries.status_summary(conn)
            status["warmup"] = [w.as_dict() for w in warmup.next_evaluation(conn, settings.evaluator, now)]
        finally:
            conn.close()
        status["database"]["rounds"] = summary["rounds"]
    status["last_round"] = summary["last_round"] if summary else None
    if status["last_round"]:
        status["last_round"]["age_seconds"] = round(now - status["last_round"]["end_time"], 1)
    # a no-op evaluation ('no-rounds') never hides the last real one
    status["last_evaluation"] = facts["last_real"]
    if status["last_evaluation"]:
        at = status["last_evaluation"]["finished_at"] or status["last_evaluation"]["started_at"]
        status["last_evaluation"]["age_seconds"] = round(now - at, 1)
    noop = facts["last_noop"]
    status["last_noop_evaluation"] = noop if noop and (not facts["last_real"] or noop["id"] > facts["last_real"]["id"]) else None
    status["model"] = summary["model"] if summary else None
    if status["model"]:        # the held-out pool the model must fill before it alerts
        status["model"]["held_out_pool"] = json.loads(status["model"].pop("metadata") or "{}").get("pool")
    status["blacklist"] = summary["blacklist"] if summary else {"active": 0, "dry_run": 0, "expired": 0, "removed": 0}
    names = health.interfaces_to_check(settings, facts, interfaces)
    status["xdp"] = [health.describe_interface(name, settings.general.pin_root) for name in names]
    result = health.check(settings, interfaces, now, facts=facts, described=status["xdp"])
    status["health"] = result.as_dict()
    if not interfaces:                  # the whole picture: export it (metrics.textfile_dir, when set)
        from app.services.ops.metrics import write_health
        write_health(settings, result)
    return status


def _pool_text(pool: dict | None) -> str:
    """'; not alerting yet: ...' while the model's held-out pool is short of what its budget needs."""
    if not pool:
        return ""
    wanted = pool.get("budget_needs", pool["needed"])
    short = (f" (the budget needs {wanted}: raise evaluator.calibration_windows from {pool['capacity']})"
             if wanted > pool["needed"] else "")
    if pool.get("alerting", True):
        return f"; held-out pool full at {pool['windows']} windows{short}" if short else ""
    return f"; not alerting yet: held-out pool {pool['windows']} of the {pool['needed']} windows needed{short}"


def _when(t: float | None, now: float) -> str:
    return when(t, now)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(status: dict, now: float) -> str:
    lines = []
    db = status["database"]
    if db["exists"]:
        lines.append(f"database:        {db['path']} ({_size(db['bytes'])}, {db.get('rounds', 0)} rounds)")
    else:
        lines.append(f"database:        {db['path']} (not created yet: run python -m app collect)")
    r = status["last_round"]
    lines.append("last round:      none" if not r else
                 f"last round:      #{r['id']} on {r['interface']} ended {_when(r['end_time'], now)}, "
                 f"XDP {r['xdp_mode'] or 'not attached'}, {r['total_packets']} packets, {r['dropped_packets']} dropped")
    e = status["last_evaluation"]
    lines.append("last evaluation: none" if not e else
                 f"last evaluation: #{e['id']} {_when(e['finished_at'] or e['started_at'], now)}, "
                 f"status {e['status'] or 'running'}, {e['anomalies'] or 0} anomalies")
    if status.get("last_noop_evaluation"):
        n = status["last_noop_evaluation"]
        lines.append(f"                 (later: #{n['id']} {_when(n['finished_at'] or n['started_at'], now)} "
                     "found no new rounds)")
    m = status["model"]
    lines.append("model:           none yet (warm-up)" if not m else
                 f"model:           version {m['version']}, threshold "
                 f"{'-' if m['threshold'] is None else format(m['threshold'], '.4g')}, created {_when(m['created_at'], now)}"
                 + _pool_text(m.get("held_out_pool")))
    waiting = [w["text"] for w in status.get("warmup", []) if not w["ready"]]
    if waiting:       # detectors that compare with usual raise nothing before their baseline
        lines.append("warm-up:         " + "; ".join(waiting))
    b = status["blacklist"]
    lines.append(f"blocklist:       {b['active']} active, {b['dry_run']} dry-run, {b['expired']} expired, "
                 f"{b['removed']} removed")
    if not status["xdp"]:
        lines.append("xdp:             no interface seen yet (use --interface IF)")
    for x in status["xdp"]:
        label = f"xdp {x['interface']}:".ljust(17)
        if not x.get("exists", True):
            lines.append(f"{label}interface does not exist" + (" (stale pins left: python -m app down "
                                                                  f"--interface {x['interface']})" if x["pinned"] else ""))
            continue
        state = (f"attached ({x['mode']}, program {x['program_id']})" if x["attached"] else "not attached")
        state = x.get("programs") or state                  # XDP and TC egress (app/services/kernel/xdp.py describe)
        pins = f"pinned at {x['pin_dir']}" if x["pinned"] else "no pins"
        extra = ""
        if x.get("attached") and x.get("pinned") and x.get("ours") is False:
            extra = "; the attached program is not portwatch's pinned one"
        extra += f"; {x['problem']}" if x.get("problem") else ""
        extra += f"; {x['foreign']}" if x.get("foreign") else ""
        extra += f"; {x['attach']}" if x.get("attach") and x.get("ours") else ""    # plain, and why not libxdp's dispatcher
        lines.append(f"{label}{state}, {pins}{extra}")
    h = status["health"]
    lines.append("health:          " + ("ok" if h["healthy"] else "UNHEALTHY"))
    for c in h["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "?   "}[c["ok"]]
        lines.append(f"  {mark} {c['name']:<11} {c['detail']}")
    return "\n".join(lines)


def run(args, settings) -> int:
    from app.errors import UsageError
    for name in args.interface or []:
        if not _IFNAME.match(name):
            raise UsageError(f"{name!r} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)")
        if not Path(f"/sys/class/net/{name}").exists() and not (Path(settings.general.pin_root) / name).exists():
            raise UsageError(f"interface {name} does not exist and portwatch has no pins for it: pick one from "
                             "`ip link` (or leave --interface out to check every interface seen in the rounds)")
    now = time.time()
    status = gather(settings, args.interface, now=now)
    if args.json:
        print(json_dumps(status, indent=2, sort_keys=True, default=str))
    else:
        print(render(status, now))
    if not status["health"]["healthy"]:
        print(f"portwatch: unhealthy: {status['health']['reason']}", file=sys.stderr)
        return EXIT_ERROR
    return 0
