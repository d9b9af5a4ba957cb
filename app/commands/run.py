"""`run`: the main job in the foreground — rounds back to back, an evaluation every hour.

What cron does with two entries (minute collector, hourly evaluator) this does in one
terminal, printing one line per round. The evaluation runs in a child process, so the
collector process never imports TensorFlow. Stop with Ctrl-C; the XDP program stays
attached and pinned (as under cron) until `python -m app down --interface IF`.
"""
from __future__ import annotations

import subprocess
import sys
import time

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.durations import arg as duration


def register(sub) -> None:
    p = add_command(sub, "run", "collect continuously and evaluate every hour, in the foreground")
    p.add_argument("--interface", "-i", help="interface (default: the default-route interface)")
    p.add_argument("--round-seconds", type=duration(maximum=86400), help="seconds per round (default 60)")
    p.add_argument("--evaluate-every", type=duration(maximum=366 * 86400), default=3600.0, help="seconds between evaluations (default 3600)")
    p.add_argument("--max-rounds", type=count_arg(), default=0, help="stop after this many rounds (default: never)")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    import threading

    from app.services import host
    from app.threads.collection import run_collection
    settings.override("collector", "round_seconds", args.round_seconds)
    settings.override("general", "interface", args.interface)
    interface = settings.general.interface or host.default_interface()
    print(f"portwatch: watching {interface}, rounds of {settings.collector.round_seconds:g} s, evaluation every "
          f"{args.evaluate_every:g} s, database {settings.general.db} (Ctrl-C stops; "
          f"`python -m app down --interface {interface}` detaches XDP)", flush=True)
    last_eval = time.monotonic()
    done = 0
    stop = threading.Event()
    try:
        while args.max_rounds == 0 or done < args.max_rounds:
            run_collection(settings, interface, settings.collector.round_seconds, 1, stop=stop,
                           on_round=lambda s: print(s.line(), flush=True))
            if stop.is_set():
                break
            done += 1
            if time.monotonic() - last_eval >= args.evaluate_every:
                last_eval = time.monotonic()
                cmd = [sys.executable, "-m", "app", "evaluate", "--db", settings.general.db]
                if getattr(args, "config", None):
                    cmd += ["--config", args.config]
                subprocess.run(cmd, check=False)
    except KeyboardInterrupt:
        print(f"portwatch: stopped after {done} rounds", flush=True)
    return 0
