"""`python -m app anomalies list|show`: the findings, explained (app/services/evaluation/explain.py).

Exit codes: 0 ok; 2 bad --since, unknown id or detector; 4 missing or corrupt database.
"""
from __future__ import annotations

import time

from app.commands.registry import add_command
from app.errors import EXIT_OK, UsageError
from app.services.text import json_dumps, utc

LIMIT = 1000            # findings listed at most (newest first)

DESCRIPTION = """Findings of the rule detectors and the model, explained: what, when (round times), which
port and process (occupancy), which sources (packets, share, evidence class), the ports of a scan
as ranges, the features that drove a model finding (observed vs usual) and what was done (blocked
until ..., alerted on ...). Alerts and `blacklist list` name the same finding id.

  list [--since 24h|all|ISO] [--detector D] [--json]   newest first (a scan that grew counts from its last growth),
                                                       under a line per detector still warming up
  show ID [--json]                                     one finding in full

examples:
  python -m app anomalies list --since 7d --detector port_scan
  python -m app anomalies show 12"""


def register(sub) -> None:
    parser = add_command(sub, "anomalies", "list findings, or show one explained", DESCRIPTION)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, "list", "findings, newest first")
    p.add_argument("--since", metavar="T", default="24h",
                   help="a span back from now (30m, 24h, 7d), an ISO date/time (UTC) or 'all' (default: 24h)")
    p.add_argument("--detector", metavar="D", help="only this detector (port_scan, syn_flood, model, ...)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = add_command(actions, "show", "one finding, explained")
    p.add_argument("id", metavar="ID", help="the finding's id (anomalies list, blacklist list, alerts)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=run)


def _since(text: str) -> float | None:
    from datetime import datetime, timezone
    from app import durations
    value = (text or "").strip()
    if value.lower() in ("", "all"):
        return None
    if value[-1:].lower() in durations.UNIT_SECONDS or value.replace(".", "", 1).isdigit():
        return time.time() - durations.flag("--since", value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r} is neither a span like 24h or 7d, an ISO date/time "
                         "(2024-05-01T12:00) nor 'all'") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def run(args, settings) -> int:
    from app.db import anomalies as queries
    from app.db.connection import connect
    from app.services.evaluation import explain, warmup
    from app.services.evaluation.findings import readable_row
    if args.action == "show":
        text = args.id.strip()
        if not text.isdigit() or len(text) > 18:
            raise UsageError(f"{args.id!r} is not a finding id (a whole number, as `anomalies list` shows)")
    else:
        since = _since(args.since)
    conn = connect(settings.general.db, readonly=True)
    try:
        if args.action == "show":
            row = queries.anomaly(conn, int(text))
            if row is None:
                raise UsageError(f"there is no finding {int(text)}: `python -m app anomalies list --since all` "
                                 "shows the ids")
            explained = explain.explain(conn, readable_row(row), settings)
            if args.json:
                print(json_dumps(explained, indent=2, default=str))
            else:
                print("\n".join(explain.lines(explained)))
            return EXIT_OK
        if args.detector and args.detector not in queries.detectors(conn):
            known = ", ".join(queries.detectors(conn)) or "none yet"
            raise UsageError(f"no finding has detector {args.detector!r} (stored detectors: {known})")
        rows = queries.anomalies(conn, since, args.detector, LIMIT)
        waiting = [w.text() for w in warmup.pending(warmup.next_evaluation(conn, settings.evaluator, time.time()))
                   if not args.detector or w.detector == args.detector]
        findings = [readable_row(r) for r in rows]
        items = [{"id": f.id, "detector": f.detector, "created_at": r["created_at"], "updated_at": r["updated_at"],
                  "rounds": [f.first_round_id, f.last_round_id], "port": f.port, "protocol": f.protocol,
                  "source": f.source, "score": f.score, "threshold": f.threshold,
                  "summary": f.summary or explain.summary(f)} for f, r in zip(findings, rows)]
    finally:
        conn.close()
    if args.json:
        print(json_dumps(items, indent=2))
        return EXIT_OK
    for line in waiting:          # a detector without its baseline raises nothing yet: say so first
        print(line)
    if not items:
        print("no findings" + (f" of {args.detector}" if args.detector else "")
              + (f" since {_when(since)}" if since is not None else ""))
        return EXIT_OK
    header = ("ID", "WHEN", "DETECTOR", "PORT")
    table = [header] + [(str(i["id"]), _when(i["updated_at"] or i["created_at"]), i["detector"],
                         f.port_label) for i, f in zip(items, findings)]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row, summary in zip(table, ["SUMMARY"] + [i["summary"] for i in items]):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + summary)
    if len(items) == LIMIT:
        print(f"(the newest {LIMIT} only: narrow with --since or --detector)")
    return EXIT_OK


def _when(t: float | None) -> str:
    return utc(t, seconds=False)
