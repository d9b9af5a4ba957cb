"""`python -m app model list|rollback VERSION`: the evaluator's model versions.

Every evaluation that trains saves a new version under <state_dir>/models/<version>/ (config.json,
scaler.json, weights, held-out calibration windows) with a models row; the newest
evaluator.keep_models keep their files. The list is the threshold history: each version's threshold,
its move at that refit (``*``: held to evaluator.threshold_max_change) and the held-out pool against
the windows its alert budget needs (``!``: the model does not alert yet). `rollback` makes an older
version active again: the next evaluation scores with it and refits from it. `list` says which versions
this portwatch can load: a model saved in another format version (the window's features changed)
stays listed but cannot be rolled back to; the evaluator fits a new one from scratch instead.

Exit codes: 0 done; 2 unknown or pruned version; 4 database problem.
"""
from __future__ import annotations

import time

from app.cli import add_command, common_options


def register(sub) -> None:
    parser = add_command(sub, "model", "list model versions or roll back to one",
                         "List the evaluator's model versions, or make an earlier one active again.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="model versions, newest first", parents=[common_options()])
    back = actions.add_parser("rollback", help="make VERSION the active model again", parents=[common_options()])
    back.add_argument("version", type=int, metavar="VERSION")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.db.connection import connect
    from app.services.evaluation import model_versions
    from app.services.evaluation.model_versions import threshold_history
    conn = connect(settings.general.db)
    try:
        if args.action == "rollback":
            undone = model_versions.rollback(conn, args.version)
            extra = f"; rolled back v{', v'.join(map(str, undone))}" if undone else ""
            print(f"model v{args.version} is active again{extra}.")
            return 0
        rows = model_versions.list_models(conn)
    finally:
        conn.close()
    if not rows:
        print("no model versions yet: the first evaluation with traffic trains one (python -m app evaluate).")
        return 0
    from app.services.evaluation.model import not_loadable
    why = {r["version"]: ("pruned" if r["status"] == "pruned" else not_loadable(r["path"])) for r in rows}
    print(f"{'version':>7}  {'created (UTC)':16}  {'status':11}  {'origin':6}  {'parent':>6}  {'threshold':>10}  "
          f"{'change':>7}  {'pool':>11}  {'windows':>7}  {'budget/d':>8}  {'held-out/d':>10}  {'loadable':8}  path")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_at"]))
        threshold = f"{r['threshold']:.4g}" if r["threshold"] is not None else "-"
        budget = f"{r['budget_per_day']:g}" if r["budget_per_day"] is not None else "-"
        rate = f"{r['held_out_rate_per_day']:.2f}" if r["held_out_rate_per_day"] is not None else "-"
        parent = str(r["parent_version"]) if r["parent_version"] is not None else "-"
        origin = r["origin"] if "origin" in r.keys() else "local"
        step = threshold_history(r)
        change, pool = step["change"], step["pool"]
        print(f"{r['version']:>7}  {created:16}  {r['status']:11}  {origin:6}  {parent:>6}  {threshold:>10}  "
              f"{change:>7}  {pool:>11}  {r['train_windows'] or 0:>7}  {budget:>8}  {rate:>10}  "
              f"{'no' if why[r['version']] else 'yes':8}  {r['path']}")
    for version, reason in why.items():
        if reason and reason != "pruned":
            print(f"v{version} is not loadable as the current model: {reason}")
    return 0

