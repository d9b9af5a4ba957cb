"""`collect`: K rounds (default 1) of N seconds (default 60) on one interface."""
from __future__ import annotations

import sys

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.services.text import json_dumps
from app.durations import arg as duration


def register(sub) -> None:
    p = add_command(sub, "collect", "collect rounds of kernel counters, occupancy and packet metadata",
                    "Collect K rounds of N seconds on one interface into SQLite. The first run on an interface "
                    "compiles and attaches the XDP program (in a separate process); later runs only read its "
                    "pinned maps.")
    p.add_argument("--interface", "-i", help="interface to watch (default: general.interface, else the default-route one)")
    p.add_argument("--round-seconds", type=duration(maximum=86400), help="seconds per round (default: collector.round_seconds, 60)")
    p.add_argument("--rounds", type=count_arg(), help="rounds to collect, 0 = until stopped (default: collector.rounds, 1)")
    p.add_argument("--no-sniffer", action="store_true", help="skip the pyshark sniffer")
    p.add_argument("--no-scanner", action="store_true", help="skip the occupancy scanner")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per round on stdout (JSON Lines); the start line goes to stderr")
    p.add_argument("--takeover", action="store_true",
                   help="move the interface to this database when another database enforces it")
    p.add_argument("--replace", action="store_true",
                   help="replace an XDP program portwatch did not load (it stops working): refused without this")
    p.set_defaults(func=run)


def start_line(collector, settings) -> str:
    """'round 1 of 3 on eth0, 60 s each, XDP native (program 812, compiled in 4.1 s), database X'."""
    state = collector.load_state
    n = settings.collector.rounds
    rounds = f"round 1 of {n}" if n else "rounds until stopped"
    how = {"first-load": "compiled in", "source-changed": "recompiled (source changed) in",
           "not-attached": "re-attached, compiled in", "maps-recreated": "recompiled (map layout changed) in"}
    if state.compiled:
        program = f"program {state.program_id}, {how.get(state.reason, 'compiled in')} {state.compile_seconds:.1f} s"
    else:
        program = f"program {state.program_id} already attached"
    return (f"{rounds} on {collector.interface}, {settings.collector.round_seconds:g} s each, XDP {state.mode} "
            f"({program}), database {settings.general.db}")


def on_start(collector, settings, as_json: bool = False) -> None:
    """The takeover's baseline round (stored before the interface changed hands), then the start line (on
    stderr under --json, so stdout holds only the rounds' objects)."""
    out = sys.stderr if as_json else sys.stdout
    if collector.takeover_round is not None:
        print(collector.takeover_round.line(), flush=True, file=out)
    print(start_line(collector, settings), flush=True, file=out)


def _round_printer(as_json: bool, show: bool):
    """What each finished round prints: its line, or (--json) its summary as one JSON object."""
    if as_json:
        import dataclasses
        return lambda s: print(json_dumps(dataclasses.asdict(s), sort_keys=True), flush=True)
    return (lambda s: print(s.line(), flush=True)) if show else None


def run(args, settings) -> int:
    from app.errors import UsageError
    from app.services import host
    from app.threads.collection import run_collection
    settings.override("collector", "round_seconds", args.round_seconds)
    settings.override("collector", "rounds", args.rounds)
    if args.no_sniffer:
        settings.override("sniffer", "enabled", False)
    if args.no_scanner:
        settings.override("scanner", "enabled", False)
    if settings.collector.round_seconds < 0 or settings.collector.rounds < 0:
        raise UsageError("--round-seconds and --rounds must not be negative")
    settings.override("general", "interface", args.interface)
    interface = settings.general.interface or host.default_interface()
    from app.services.ops.metrics import job_metrics
    show = not getattr(args, "quiet", False)
    with job_metrics(settings, "collector") as values:
        summaries = run_collection(settings, interface, settings.collector.round_seconds, settings.collector.rounds,
                                   on_round=_round_printer(args.json, show),
                                   on_start=(lambda c: on_start(c, settings, args.json)) if show else None,
                                   takeover=getattr(args, "takeover", False), replace=getattr(args, "replace", False))
        values["rounds"] = len(summaries)
        values["packets"] = sum(s.packets for s in summaries)
        values["bytes"] = sum(s.bytes for s in summaries)
        values["dropped_packets"] = sum(s.dropped for s in summaries)
        values["unparsed_packets"] = sum(s.unparsed for s in summaries)
    return 0
