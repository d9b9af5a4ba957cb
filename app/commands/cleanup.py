"""`python -m app cleanup [--keep-days D]`: retention, then give the space back (:func:`run` says what goes).

Exit codes: 0 done; 2 bad --keep-days; 4 database problem; 6 another cleanup is running.
"""
from __future__ import annotations

import time
from pathlib import Path

from app.commands.registry import add_command
from app.services.text import json_dumps, utc

DESCRIPTION = """Delete rounds (and everything recorded with them) and sniffer packets older than
--keep-days days, then give the freed space back to the file system (incremental vacuum).
Runs daily from cron (crontab.example). --dry-run only counts."""


def register(sub) -> None:
    parser = add_command(sub, "cleanup", "delete old rounds and packets, then vacuum", DESCRIPTION)
    parser.add_argument("--keep-days", type=float, metavar="D",
                        help="keep this many days of rounds (default: retention.keep_days = 14)")
    parser.add_argument("--dry-run", action="store_true", help="count what would be deleted, change nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object (counts, cutoff, sizes)")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    """Delete rounds that ended more than D days ago (default retention.keep_days, 14) with every row
    that hangs off them (port and source counters, flows, occupancy, sniffer packets, blocklist
    drops), sniffer packets older than D days, and alert bookkeeping older than D days. Evaluations,
    anomalies, models and the blocklist ledger are kept: they are small and the report and the
    audit trail need them. Then free the pages: an incremental vacuum, or once a full VACUUM that
    switches the file to incremental auto-vacuum."""
    from app.db import retention
    from app.db.connection import connect
    from app.errors import UsageError
    from app.services.files import database_bytes
    from app.services.ops.metrics import job_metrics

    keep_days = settings.retention.keep_days if args.keep_days is None else args.keep_days
    if not keep_days == keep_days or keep_days <= 0 or keep_days > 36500:   # NaN, zero, negative, absurd
        raise UsageError(f"--keep-days must be a number of days above 0 and at most 36500, got {keep_days:g}")
    settings.override("retention", "keep_days", args.keep_days)
    db = Path(settings.general.db)
    if not db.exists():
        raise UsageError(f"database {db} does not exist: nothing to clean up (check --db)")
    cutoff = time.time() - keep_days * 86400.0
    cutoff_text = utc(cutoff, seconds=False)

    if args.dry_run:
        conn = connect(db, readonly=True)
        try:
            counts = retention.count_old(conn, cutoff)
        finally:
            conn.close()
        if args.json:
            print(json_dumps({"dry_run": True, "keep_days": keep_days, "cutoff": cutoff,
                              "rounds": counts["rounds"], "packets": counts["packets"]}))
            return 0
        print(f"would delete {counts['rounds']} rounds and {counts['packets']} sniffer packets "
              f"older than {cutoff_text} ({keep_days:g} days)")
        return 0

    from app.services import locks
    with locks.holding(settings, "cleanup", "another cleanup is running: this one does not overlap it"):
        with job_metrics(settings, "cleanup") as metrics:
            before = database_bytes(db)
            conn = connect(db, create=False)
            try:
                rounds, packets = retention.delete_old_rounds(conn, cutoff)
                packets += retention.delete_old_packets(conn, cutoff)
                retention.delete_old_alerts(conn, min(cutoff, time.time() - settings.alerts.cooldown_seconds))
                how = retention.reclaim(conn)
            finally:
                conn.close()
            after = database_bytes(db)
            metrics.update(deleted_rounds=rounds, deleted_packets=packets, database_bytes=after)
    if args.json:
        print(json_dumps({"dry_run": False, "keep_days": keep_days, "cutoff": cutoff, "rounds": rounds,
                          "packets": packets, "bytes_before": before, "bytes_after": after, "vacuum": how}))
        return 0
    print(f"deleted {rounds} rounds and {packets} sniffer packets older than {cutoff_text} ({keep_days:g} days); "
          f"database {before / 1048576:.1f} MiB -> {after / 1048576:.1f} MiB ({how} vacuum)")
    return 0
