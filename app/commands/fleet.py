"""`python -m app fleet serve|node|status [--json]`: many hosts, one model (Flower), one blocklist (CrowdSec).

serve runs the coordinator (SuperLink and federations), node this host's SuperNode, status shows the fleet
as this host sees it (:func:`gather`; also written to the metrics textfile as portwatch_fleet_*, see
app/services/ops/metrics.py). DESCRIPTION gives the options; README: Many hosts, the rest.

Exit codes: 0 ok; 2 bad [fleet] settings; 7 Flower missing; 1 a federation that did not finish.
"""
from __future__ import annotations

import time
from pathlib import Path

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.services.text import counted, json_dumps, utc


DESCRIPTION = """Many hosts, one model (Flower) and one blocklist (CrowdSec).

  serve [--once] [--rounds N]   the coordinator: Flower's SuperLink (TLS from [fleet]) and a federation
                                now and every fleet.interval_seconds; --once: one federation, then exit
  node                          this host's SuperNode in the foreground (run it as a service): trains the
                                fleet's weights on this host's normal windows, adopts the result
  status [--json]               model versions by origin, the coordinator's record, the CrowdSec sync

Exit codes specific to fleet: 2 bad [fleet] settings; 7 Flower missing; 1 a federation that did not finish."""


def register(sub) -> None:
    parser = add_command(sub, "fleet", "federated model (Flower) and shared blocklist (CrowdSec)", DESCRIPTION)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = add_command(actions, "serve", "the coordinator: SuperLink + federations",
                        "Run the coordinator: Flower's SuperLink and a federation now and every "
                        "fleet.interval_seconds, until stopped (or one federation with --once).")
    serve.add_argument("--once", action="store_true", help="one federation, then exit")
    serve.add_argument("--rounds", type=count_arg(1, 1000), metavar="N", help="federation rounds (default: fleet.rounds)")
    add_command(actions, "node", "this host's SuperNode (foreground)",
                "Run this host's Flower SuperNode in the foreground (a service: install-cron --systemd "
                "--fleet-node). It trains the fleet's weights on this host's windows no detector flagged and "
                "adopts each federation's result as a model version with origin 'fleet'.")
    status = add_command(actions, "status", "model origins, coordinator record, CrowdSec sync",
                         "This host's model versions by origin, the coordinator's record when this host is the "
                         "coordinator, whether the SuperLink answers, and the CrowdSec sync (pulled, pushed, "
                         "pending). Also written to the metrics textfile when metrics.textfile_dir is set.")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    if args.action == "serve":
        from app.services.fleet import flower
        settings.override("fleet", "rounds", args.rounds)
        rec = flower.serve(settings, once=args.once)
        print(f"federation {rec.get('federations')} finished ({counted(int(rec.get('rounds') or 0), 'round')}).")
        return 0
    if args.action == "node":
        from app.services.fleet import flower
        return flower.node(settings)
    state = gather(settings)
    from app.services.fleet import view
    view.write_status(settings, state)
    if args.json:
        print(json_dumps(state, indent=2, sort_keys=True))
        return 0
    print(render(state))
    return 0


def gather(settings) -> dict:
    """Everything `fleet status` shows (no Flower, no TensorFlow: the database and files only): this
    host's model versions by origin (and why the newest fleet model was not adopted, if it was not), the
    coordinator's record when this is the coordinator (the hosts it knows: last contribution, windows
    claimed and weighed, the model version each runs), and the CrowdSec sync (pulled, pushed, pending)."""
    from app.db import fleet as fleet_db
    from app.db.connection import connect
    from app.services.fleet import crowdsec
    from app.services.fleet.flower import record
    coordinator = record(settings) or None
    models, sync = [], None
    # a coordinator-only machine keeps no store of its own: its record is the fleet's state
    if coordinator is None or Path(settings.general.db).exists():
        conn = connect(settings.general.db, readonly=True)
        try:
            models = [dict(r) for r in fleet_db.models_by_origin(conn)]
            sync = crowdsec.status(conn) if settings.crowdsec.lapi_url else None
        finally:
            conn.close()
    fleet_versions = [m for m in models if m["origin"] == "fleet"]
    active = next((m for m in models if m["status"] == "active"), None)
    return {
        "active_model": active, "fleet_model": fleet_versions[0] if fleet_versions else None,
        "fleet_versions": len(fleet_versions), "local_versions": len(models) - len(fleet_versions),
        "superlink": settings.fleet.superlink or None, "coordinator": coordinator,
        "superlink_reachable": _reachable(settings.fleet.superlink) if settings.fleet.superlink else None,
        "crowdsec": sync, "models": models,
    }


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether the coordinator's SuperLink accepts a TCP connection now (no Flower needed)."""
    import socket
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _when(t) -> str:
    return utc(t, seconds=False) if t else "never"


def render(state: dict) -> str:
    from app.services.fleet import view
    lines = []
    active, fleet_model = state["active_model"], state["fleet_model"]
    if active:
        rate = active.get("held_out_rate_per_day")
        budget = active.get("budget_per_day")
        lines.append(f"active model v{active['version']} (origin {active['origin']}), false alerts on held-out "
                     f"data {rate if rate is not None else '-'} a day against a budget of "
                     f"{budget if budget is not None else '-'}")
    else:
        lines.append("no model yet (warming up)")
    if fleet_model and fleet_model["status"] == "not-adopted":
        lines.append(f"fleet model: v{fleet_model['version']} received {_when(fleet_model['created_at'])}, NOT adopted: "
                     f"{fleet_model['not_adopted_because']}; the active model stays")
    else:
        lines.append(f"fleet model: v{fleet_model['version']} adopted {_when(fleet_model['created_at'])}" if fleet_model
                     else "fleet model: none adopted yet")
    if state["superlink"]:
        lines.append(f"coordinator: {state['superlink']} " + ("reachable" if state["superlink_reachable"] else
                     "UNREACHABLE: this host keeps its local model and learns alone until it is back"))
    else:
        lines.append("coordinator: not configured (fleet.superlink); this host learns alone")
    rec = state["coordinator"]
    if rec:
        lines.append(f"federations run here: {rec.get('federations')}, last finished {_when(rec.get('finished_at'))}, "
                     f"hosts in its last round: {rec.get('hosts', '-')}")
        lines.append(f"aggregation: {rec.get('aggregation') or 'fedavg'}; hosts known: {len(rec.get('known_hosts') or {})}")
        for node, h in sorted((rec.get("known_hosts") or {}).items()):
            runs = f"runs model v{h['model_version']}" if h.get("model_version") else "runs no model yet"
            took = ("adopted the fleet's" if h.get("adopted") else
                    f"kept its own (refused the fleet's: {view.REFUSALS.get(h.get('refusal'), 'no model to check')})")
            lines.append(f"  node {node}: last contribution {_when(h.get('last_contribution'))} "
                         f"({h.get('reported_windows', 0)} windows claimed, {h.get('weighed_windows', 0)} weighed), "
                         f"{runs}, {took}")
    cs = state["crowdsec"]
    if cs is None:
        lines.append("crowdsec: not configured (crowdsec.lapi_url)")
    else:
        health = f"unreachable: {cs['last_error']}" if cs["lapi_down"] else "reachable"
        lines.append(f"crowdsec: LAPI {health}; last pull {_when(cs['last_pull_at'])}; {cs['decisions']} decisions "
                     f"mirrored, {cs['enforced']} enforced, {cs['refused']} refused; pushed {cs['pushed_total']}, "
                     f"{cs['pending']} pending, {cs['dropped']} dropped")
    return "\n".join(lines)
