"""`python -m app blacklist list|add|remove|flush`: the blocklist ledger and its XDP enforcement."""
from __future__ import annotations

import os
import time
from pathlib import Path

from app.commands.registry import add_command
from app.errors import EXIT_OK, NeedsRootError, UsageError
from app.services.text import counted, inert, json_dumps, utc

DESCRIPTION = """The blocklist: the `blacklist` table in the database is the truth, the pinned XDP map of
every watched interface enforces it (blocked sources' packets are dropped before the network stack).

  list [--json] [--all]                      listed entries with direction (in: a source; out: a destination
                                             blocked in TC egress), status, expiry, drops, offences and the
                                             finding behind each (anomaly N: `anomalies show N` explains it)
  add ADDR[/LEN] [--ttl S] [--reason TEXT]   block an IPv4/IPv6 address or prefix (default ttl:
                                             blocklist.manual_ttl_seconds)
  remove ADDR[/LEN]                          unblock; automatic decisions then leave it alone for
                                             blocklist.manual_remove_grace_seconds
  flush                                      unblock everything (as a remove of each entry)

add/remove/flush change the maps at once when XDP pins exist under general.pin_root; otherwise only
the ledger changes and the next collector run enforces it. A prefix with host bits set
(198.18.0.5/24) is refused, not rounded. Loopback, this host's own addresses, default gateways, DNS
resolvers, SSH peers and allowlisted prefixes (or networks overlapping them) are refused unless
--force is given; automatic decisions can never block them."""


def register(sub) -> None:
    parser = add_command(sub, "blacklist", "list, add, remove or flush blocked addresses", DESCRIPTION)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, "list", "show the blocklist")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--all", action="store_true", help="include expired and removed entries")
    p = add_command(actions, "add", "block an address or prefix")
    p.add_argument("address", metavar="ADDR[/LEN]")
    p.add_argument("--ttl", metavar="T", help="time until it expires: 90, 15m, 1h, 7d (default: blocklist.manual_ttl_seconds)")
    p.add_argument("--reason", metavar="TEXT", help="why (stored in the ledger)")
    p.add_argument("--force", action="store_true",
                   help="block even a protected address (loopback, own, gateway, resolver, SSH peer, allowlisted)")
    p = add_command(actions, "remove", "unblock an address or prefix")
    p.add_argument("address", metavar="ADDR[/LEN]")
    add_command(actions, "flush", "unblock every entry")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    if args.action == "list":
        return list_entries(args, settings)
    from app.db.connection import connect
    from app.durations import flag
    from app.services.blocklist import blocklist
    from app.services.kernel import enforcement
    ttl = flag("--ttl", getattr(args, "ttl", None), maximum=settings.blocklist.max_ttl_seconds)
    if "%" in getattr(args, "address", ""):
        raise UsageError(f"{args.address} carries a zone (%...): the blocklist holds addresses without zones, "
                         "give it without the %zone")
    if os.geteuid() != 0 and enforcement.pin_dirs(settings):
        raise NeedsRootError("changing the blocklist writes pinned XDP maps, which needs root: run it with sudo")
    if args.action in ("add", "remove"):
        blocklist.parse_network(args.address)          # bad input fails before anything is opened
    conn = connect(settings.general.db, create=False)
    try:
        if args.action == "add":
            decision = blocklist.add_manual(conn, settings, args.address, ttl=ttl, reason=args.reason,
                                            force=args.force)
            done = f"blocked {decision.address} until {_when(decision.expires_at)} ({decision.reason})"
        elif args.action == "remove":
            done = f"removed {blocklist.remove_manual(conn, settings, args.address)} from the blocklist"
        else:
            flushed = blocklist.flush(conn, settings)
            done = f"flushed {counted(len(flushed), 'entry')} from the blocklist"
        results = enforcement.apply(conn, settings)
    finally:
        conn.close()
    if results:
        names = ", ".join(r.interface for r in results)
        failed = sorted({a for r in results for a in r.failed})
        print(f"{done}; maps updated on {names}" + (f" (could not write {', '.join(failed)}: map full)" if failed else ""))
    elif enforcement.pin_dirs(settings):
        print(f"{done}; the XDP pins under {settings.general.pin_root} are enforced by another database, so only "
              "this ledger changed")
    else:
        print(f"{done}; no XDP pins under {settings.general.pin_root}, so only the ledger changed: "
              "the next collector run applies it")
    return EXIT_OK


def list_entries(args, settings) -> int:
    from app.services.kernel import enforcement
    rows, pending, summaries, dropped, egress, replies = [], {}, {}, 0, 0, {}
    db_path = Path(settings.general.db)
    if not db_path.exists():              # the ledger lives only there: a mistyped --db is not "empty"
        from app.errors import DatabaseError
        raise DatabaseError(f"database {db_path} does not exist: check --db (or general.db); the blocklist ledger "
                            "is kept in the database")
    if db_path.exists():
        import sqlite3
        from app.db import blacklist as queries
        from app.db.connection import connect
        conn = connect(db_path, readonly=True)
        try:
            rows = queries.entries(conn, None if args.all else queries.LISTED)
            from app.db.report_rates import drop_total, egress_drop_total
            dropped, egress = drop_total(conn), egress_drop_total(conn)
            from app.db import anomalies
            summaries = anomalies.summaries(conn, [r["anomaly_id"] for r in rows])
            try:
                pending = enforcement.pending_drops(conn, settings)
            except sqlite3.OperationalError:     # a database made before blacklist_map_counters existed
                pending = {}
            try:
                replies = queries.replies_passed(conn)
            except sqlite3.OperationalError:     # a database made before blacklist_drops.replies existed
                replies = {}
        finally:
            conn.close()
    items = [{"address": r["address"], "direction": _direction(r), "status": r["status"], "reason": r["reason"], "origin": r["origin"],
              "created_at": r["created_at"], "expires_at": r["expires_at"],
              "drops": r["drops"] + (pending.get(r["address"], 0) if r["status"] == "active" else 0),
              "replies_passed": replies.get(r["address"], 0),
              "offences": r["offences"], "anomaly_id": r["anomaly_id"], "removed_at": r["removed_at"],
              "finding": summaries.get(r["anomaly_id"]),
              "show": f"python -m app anomalies show {r['anomaly_id']}" if r["anomaly_id"] is not None else None}
             for r in rows]
    if args.json:
        print(json_dumps(items, indent=2))
        return EXIT_OK
    total = (f"{counted(dropped, 'packet')} dropped by the blocklist in the stored rounds (every entry, "
             "also removed and expired ones: the report's figure)"
             + (f"; {counted(egress, 'packet')} to blocked destinations dropped in TC egress" if egress else ""))
    if not items:
        print("the blocklist is empty" + (f"; {total}" if dropped else ""))
        return EXIT_OK
    header = ("ADDRESS", "DIR", "STATUS", "EXPIRES", "DROPS", "REPLIES", "OFFENCES", "ORIGIN", "FINDING", "REASON")
    table = [header] + [(i["address"], i["direction"], i["status"], _when(i["expires_at"]), str(i["drops"]),
                         str(i["replies_passed"]), str(i["offences"]),
                         i["origin"], f"anomaly {i['anomaly_id']}" if i["anomaly_id"] is not None else "-",
                         inert(i["finding"] or i["reason"])) for i in items]
    widths = [max(len(row[c]) for row in table) for c in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(total)
    if any(i["replies_passed"] for i in items):
        print("REPLIES: answers to conversations this host opened, passed although the source is blocked")
    if any(i["anomaly_id"] is not None for i in items):
        print("explain a finding: python -m app anomalies show ID (the number after 'anomaly')")
    return EXIT_OK


def _direction(row) -> str:
    """'in' (a source, dropped in XDP) or 'out' (a destination this host may not send to, dropped in TC)."""
    return row["direction"] if "direction" in row.keys() else "in"


def _when(t: float | None) -> str:
    return "never" if t is None else utc(t)
