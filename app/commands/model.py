"""`python -m app model list|rollback VERSION`: the evaluator's model versions and their threshold history.

The versions themselves (files, rollback, pruning to evaluator.keep_models) are model_versions.py's (in
app/services/evaluation/); LEGEND explains the list's columns. A version saved in another format version
(the window's features changed) stays listed but cannot be rolled back to; a fleet model this host
refused is listed 'not-adopted' with the reason (app/services/fleet/adoption.py).
Exit codes: 0 done; 2 unknown or pruned version; 4 database problem.
"""
from __future__ import annotations

import json

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.services.text import json_dumps, utc


LEGEND = """columns: threshold = the reconstruction error above which a window is anomalous (scaled units);
  change = its move at this refit (x1.8 up, /2 down; * held to evaluator.threshold_max_change; - first fit);
  pool = held-out windows / windows the alert budget needs (! = not alerting yet: too few to calibrate);
  windows = training windows; budget/d = false alerts a day allowed (evaluator alert budget);
  held-out/d = false alerts a day measured on held-out normal windows (the ones the threshold was chosen on);
  out-of-sample = the calibration's own check: a threshold chosen on one half of the pool, its false alerts a
  day on the other half, and their 95 % upper bound (a small pool cannot vouch for a budget of one a day);
  loadable = this portwatch can load it"""

DESCRIPTION = f"""List the evaluator's model versions (newest first) with their threshold history, or make an
earlier version active again (the next evaluation scores with it and refits from it).

  list [--json]       every version: created, status, origin (local or fleet), parent, threshold, ...
  rollback VERSION    make VERSION the active model

{LEGEND}"""


def register(sub) -> None:
    parser = add_command(sub, "model", "list model versions or roll back to one", DESCRIPTION)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, "list", "model versions, newest first (a legend follows the table)")
    p.add_argument("--json", action="store_true", help="print a JSON array (one object per version)")
    back = add_command(actions, "rollback", "make VERSION the active model again")
    back.add_argument("version", type=count_arg(1, 2 ** 62), metavar="VERSION")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.db.connection import connect
    from app.services.evaluation import model_versions
    if args.action == "rollback":
        conn = connect(settings.general.db, create=False)
        try:
            undone = model_versions.rollback(conn, args.version)
        finally:
            conn.close()
        extra = f"; rolled back v{', v'.join(map(str, undone))}" if undone else ""
        print(f"model v{args.version} is active again{extra}.")
        return 0
    conn = connect(settings.general.db, readonly=True)      # a listing never creates or migrates a database
    try:
        rows = model_versions.list_models(conn)
    finally:
        conn.close()
    items = [_item(r) for r in rows]
    if args.json:
        print(json_dumps(items, indent=2, sort_keys=True))
        return 0
    if not items:
        print("no model versions yet: the first evaluation with traffic trains one (python -m app evaluate).")
        return 0
    print(f"{'version':>7}  {'created (UTC)':16}  {'status':11}  {'origin':6}  {'parent':>6}  {'threshold':>10}  "
          f"{'change':>7}  {'pool':>11}  {'windows':>7}  {'budget/d':>8}  {'held-out/d':>10}  {'out-of-sample':>20}  "
          f"{'loadable':8}  path")
    for i in items:
        created = utc(i["created_at"], seconds=False).removesuffix(" UTC")
        threshold = f"{i['threshold']:.4g}" if i["threshold"] is not None else "-"
        budget = f"{i['budget_per_day']:g}" if i["budget_per_day"] is not None else "-"
        rate = f"{i['held_out_rate_per_day']:.2f}" if i["held_out_rate_per_day"] is not None else "-"
        parent = str(i["parent_version"]) if i["parent_version"] is not None else "-"
        print(f"{i['version']:>7}  {created:16}  {i['status']:11}  {i['origin']:6}  {parent:>6}  {threshold:>10}  "
              f"{i['change']:>7}  {i['pool']:>11}  {i['train_windows'] or 0:>7}  {budget:>8}  {rate:>10}  "
              f"{i['out_of_sample']:>20}  {'yes' if i['loadable'] else 'no':8}  {i['path']}")
    for i in items:
        if i["not_loadable"] and i["not_loadable"] != "pruned":
            print(f"v{i['version']} is not loadable as the current model: {i['not_loadable']}")
        if i["not_adopted_because"]:
            print(f"v{i['version']} (fleet) was kept but not adopted: {i['not_adopted_because']}")
    print(LEGEND)
    return 0


def _item(row) -> dict:
    """One version as ``list --json`` prints it (and the table shows)."""
    from app.services.evaluation.model import not_loadable
    from app.services.evaluation.model_versions import threshold_history
    why = "pruned" if row["status"] == "pruned" else not_loadable(row["path"])
    step = threshold_history(row)
    keys = row.keys()
    return {"version": row["version"], "created_at": row["created_at"], "status": row["status"],
            "origin": row["origin"] if "origin" in keys else "local", "parent_version": row["parent_version"],
            "threshold": row["threshold"], "change": step["change"], "pool": step["pool"],
            "out_of_sample": step["out_of_sample"],
            "train_windows": row["train_windows"], "budget_per_day": row["budget_per_day"],
            "held_out_rate_per_day": row["held_out_rate_per_day"], "loadable": not why,
            "not_loadable": why or None, "path": row["path"],
            "not_adopted_because": _not_adopted(row) if row["status"] == "not-adopted" else None}


def _not_adopted(row) -> str:
    """Why this host kept a fleet model without adopting it (app/services/fleet/adoption.py)."""
    try:
        return (json.loads(row["metadata"] or "{}").get("fleet") or {}).get("why") or "no reason recorded"
    except ValueError:
        return "no reason recorded"
