"""`python -m app report --out DIR [--since T]`: the matplotlib report (PNG figures + index.html).

Exit codes: 0 written; 2 bad --since; 4 missing or corrupt database; 1 output not writable.
"""
from __future__ import annotations

import sys

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.services.text import json_dumps

DESCRIPTION = """Write the report: index.html linking PNG figures of the most anomalous ports
(flagged rounds shaded, blocked sources named), the reconstruction error against the
threshold, per-feature contributions of each model anomaly, blocklist activity and occupancy
changes. Times are UTC. The evaluator writes the same report after each evaluation
(evaluator.report_after) into reports.out_dir.

examples:
  python -m app report --out /tmp/report
  python -m app report --out /tmp/report --since 24h
  python -m app report --out /tmp/report --since 2024-05-01T00:00 --top-ports 10"""


def register(sub) -> None:
    parser = add_command(sub, "report", "write the matplotlib report (PNG + index.html)", DESCRIPTION)
    parser.add_argument("--out", metavar="DIR", help="output directory (default: reports.out_dir)")
    parser.add_argument("--since", metavar="T",
                        help="start of the window: ISO date/time (UTC unless a zone is given), a span back "
                             "from now such as 30m, 24h, 7d, or 'all' (default: reports.since)")
    parser.add_argument("--top-ports", type=int, metavar="N", help="ports with a series figure (default: reports.top_ports)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: the index path and report.json's content (figures, counts, drops)")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.errors import UsageError
    from app.services.ops.reports import parse_since, write_report
    settings.override("reports", "out_dir", args.out)
    if args.since is not None:
        parse_since(args.since)                    # its own sentence for a bad --since, before the setting's
    settings.override("reports", "since", args.since)
    if args.top_ports is not None and not 0 <= args.top_ports <= 1000:
        raise UsageError(f"--top-ports must be 0 or more and at most 1000, got {args.top_ports}")
    settings.override("reports", "top_ports", args.top_ports)
    from app.services import store_clock
    now = store_clock.clock(settings.general.db)()  # a replayed store: "24h" back from its capture's end
    since = parse_since(settings.reports.since, now=now)   # a bad value fails here, before any work
    index = write_report(settings.general.db, settings.reports.out_dir, since,
                         top_ports=settings.reports.top_ports,
                         max_anomaly_figures=settings.reports.max_anomaly_figures, now=now,
                         progress=_progress if sys.stderr.isatty() and not getattr(args, "quiet", False) else None)
    if args.json:
        import json
        manifest = json.loads((index.parent / "report.json").read_text())
        print(json_dumps({"index": str(index), **manifest}, indent=2, default=str))
        return 0
    print(f"report written: {index}")
    return 0


def _progress(done: int, total: int, what: str) -> None:
    """One self-overwriting line on a terminal; under cron (no tty) nothing is printed."""
    print(f"\r[{done}/{total}] {what[:60]:<60}", end="" if done < total else "\n", file=sys.stderr, flush=True)
