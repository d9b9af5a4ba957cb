"""`python -m app allow add|remove|list`: the allowlist kept in the database (beside the config's).

Exit codes: 0 ok; 2 bad address, zoned address, not listed; 3 a map to change needs root; 4 database.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from app.commands.registry import add_command
from app.errors import EXIT_OK, NeedsRootError
from app.services.text import json_dumps, utc

DESCRIPTION = """The allowlist: addresses and prefixes portwatch never blocks automatically (nor pulls from
CrowdSec), kept in the database beside the config's blocklist.allowlist. Adding one lifts the
blocklist entries that overlap it, in the ledger and in every pinned XDP map at once.

  list [--json]                       both allowlists (ORIGIN database or config)
  add ADDR[/LEN] [--reason TEXT]      allow an IPv4/IPv6 address or prefix (host bits clear, no %zone)
  remove ADDR[/LEN]                   stop allowing it (only entries of the database; edit the config for the rest)"""


def register(sub) -> None:
    parser = add_command(sub, "allow", "list, add or remove allowlisted addresses", DESCRIPTION)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, "list", "show both allowlists")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = add_command(actions, "add", "allow an address or prefix (lifts its blocks)")
    p.add_argument("address", metavar="ADDR[/LEN]")
    p.add_argument("--reason", metavar="TEXT", help="why (stored with the entry)")
    p = add_command(actions, "remove", "stop allowing an address or prefix")
    p.add_argument("address", metavar="ADDR[/LEN]")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.db.connection import connect
    from app.services.blocklist import allowlist
    from app.services.kernel import enforcement
    if args.action == "list":
        conn = connect(settings.general.db, readonly=True) if Path(settings.general.db).exists() else None
        try:
            items = allowlist.listing(settings, conn)
        finally:
            if conn is not None:
                conn.close()
        if args.json:
            print(json_dumps(items, indent=2))
        elif not items:
            print("the allowlist is empty")
        else:
            table = [("ADDRESS", "ORIGIN", "ADDED", "REASON")] + [
                (i["address"], i["origin"], _when(i["created_at"]), i["reason"] or "") for i in items]
            widths = [max(len(row[c]) for row in table) for c in range(3)]
            for row in table:
                print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        return EXIT_OK
    allowlist.parse(args.address)                  # bad input fails before anything is opened
    if os.geteuid() != 0 and enforcement.pin_dirs(settings):
        raise NeedsRootError("changing the allowlist may lift blocks from pinned XDP maps, which needs root: "
                             "run it with sudo")
    conn = connect(settings.general.db, create=False)
    try:
        if args.action == "remove":
            print(f"removed {allowlist.remove(conn, args.address)} from the allowlist")
            return EXIT_OK
        address, lifted = allowlist.add(conn, args.address, args.reason)
        results = enforcement.apply(conn, settings) if lifted else []
    finally:
        conn.close()
    done = f"allowlisted {address}"
    if lifted:
        done += f"; lifted its block{'s' if len(lifted) > 1 else ''} on {', '.join(lifted)}"
        done += (f" (maps updated on {', '.join(r.interface for r in results)})" if results else
                 " (no XDP pins: the next collector run applies it)")
    print(done)
    return EXIT_OK


def _when(t: float | None) -> str:
    return utc(t, seconds=False)
