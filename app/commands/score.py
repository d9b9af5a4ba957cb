"""`score --labels CSV`: the store's findings and blocks against labelled attacks.

Exit codes: 0 done; 2 bad labels file; 4 database problem.
"""
from __future__ import annotations

import json

from app.commands.registry import add_command

DESCRIPTION = """Match every finding in the database against a labels CSV (start,end,address,detector,label:
see the README's "Try it on a capture") and print, per detector, the findings that match a labelled attack
(TP), those that match none (FP), the attacks no finding matched (FN), precision, recall and the time from
an attack's start to its first finding; then the blocks of benign-labelled addresses (innocents) and of
attackers, and the false findings per benign hour. Read-only."""


def register(sub) -> None:
    p = add_command(sub, "score", "score findings and blocks against labelled attacks", DESCRIPTION)
    p.add_argument("--labels", required=True, help="labels CSV: start,end,address,detector,label")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from app.db.connection import connect
    from app.services.evaluation import score
    labels = score.read_labels(args.labels)
    conn = connect(settings.general.db, readonly=True)
    try:
        result = score.score(conn, labels)
    finally:
        conn.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
