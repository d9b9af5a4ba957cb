"""`python -m app top [--interface IF] [--interval 1] [--count N] [--rows R]`: the live view (:func:`run`).

Exit codes: 0 done; 2 bad option or no pinned maps for the interface; 3 not root; 5 portwatch's
XDP program is not attached where its maps are pinned (the counters shown do not move: each
refresh says so on its first line, and one sentence on stderr at the end).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from app.commands.registry import add_command
from app.config_rules import count_arg
from app.durations import arg as duration
from app.services.text import json_dumps

DESCRIPTION = """Live view of what XDP counts right now on one interface, from the pinned maps
(nothing is written): rates per second of packets, bytes, drops and unparsed packets, the busiest
ports and sources, and the blocklist with its drop counters. On a terminal it refreshes in place
until Ctrl-C; piped, it prints --count refreshes (default 1) and exits.

examples:
  sudo .venv/bin/python -m app top
  sudo .venv/bin/python -m app top --interface eth1 --interval 2
  sudo .venv/bin/python -m app top --count 3 > snapshot.txt"""

CLEAR = "\x1b[H\x1b[2J"


def register(sub) -> None:
    parser = add_command(sub, "top", "live view of ports, sources, drops and the blocklist from the pinned maps",
                         DESCRIPTION)
    parser.add_argument("--interface", "-i", metavar="IF",
                        help="interface (default: general.interface, else the only one with pins, else the "
                             "default-route one)")
    parser.add_argument("--interval", type=duration(maximum=3600), default=1.0, metavar="S",
                        help="seconds between refreshes (default 1)")
    parser.add_argument("--count", type=count_arg(1), metavar="N",
                        help="stop after N refreshes (default: until Ctrl-C on a terminal, 1 otherwise)")
    parser.add_argument("--rows", type=count_arg(1, 10000), default=None, metavar="R",
                        help="lines per section (default: fits the terminal, 10 otherwise)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per refresh (JSON Lines), as when piped: --count refreshes (default 1)")
    parser.set_defaults(func=run)


def pick_interface(settings, requested: str | None) -> str:
    from app.services import host
    if requested or settings.general.interface:
        return requested or settings.general.interface
    root = Path(settings.general.pin_root)
    try:
        pinned = sorted(p.name for p in root.iterdir() if (p / "port_stats").exists())
    except OSError:
        pinned = []
    if len(pinned) == 1:
        return pinned[0]
    if len(pinned) > 1:
        from app.errors import UsageError
        raise UsageError(f"several interfaces have pinned maps ({', '.join(pinned)}): pass --interface IF")
    return host.default_interface()


def run(args, settings) -> int:
    """Read the pinned maps of one interface twice per refresh interval and show per-second rates:
    totals (packets, bytes, drops, unparsed), the busiest ports and sources, and the blocklist with
    its drop counters, in the spirit of ``xdp-filter poll`` and ``iftop``. Writes nothing (no database,
    no lock, no map update), so it runs beside the collector's cron job. On a terminal it redraws in
    place until Ctrl-C (or --count refreshes); otherwise it prints --count refreshes (default 1) as
    plain text, separated by blank lines, and exits."""
    import os
    from app.errors import NeedsRootError, UsageError
    from app.services.ops import live
    if args.interval <= 0:
        raise UsageError(f"--interval must be above 0 seconds, got {args.interval:g}")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be 1 or more, got {args.count}")
    if os.geteuid() != 0:                # the bpf() system call: the pinned maps are root's
        raise NeedsRootError("top reads the pinned XDP maps, which needs root: run it with sudo")
    interface = pick_interface(settings, args.interface)
    pin_dir = Path(settings.general.pin_root) / interface
    if not (pin_dir / "port_stats").exists():
        if not Path(f"/sys/class/net/{interface}").exists():
            raise UsageError(f"interface {interface} does not exist: pick one from `ip link`")
        raise UsageError(f"no pinned maps for {interface} under {settings.general.pin_root}: "
                         f"run python -m app collect --interface {interface} first")
    tty = sys.stdout.isatty() and not args.json
    if tty:   # the screen says Ctrl-C quits: true even when started with SIGINT ignored (a shell's & inherits that)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    count = args.count if args.count is not None else (0 if tty else 1)
    previous = live.read(pin_dir)
    shown, problem = 0, None
    try:
        while count == 0 or shown < count:
            time.sleep(args.interval)
            current = live.read(pin_dir)
            view = live.rates(previous, current)
            previous = current
            size = shutil.get_terminal_size((100, 40))
            rows = args.rows or (max(3, (size.lines - 12) // 3) if tty else 10)
            lines = live.render(view, rows=rows, width=size.columns if tty else 200)
            problem = detached(interface, settings.general.pin_root)
            if problem:
                lines.insert(0, f"WARNING: {problem}")
            if args.json:
                sys.stdout.write(json_dumps({**dataclasses.asdict(view), "attached": problem is None,
                                             "problem": problem}, sort_keys=True) + "\n")
            elif tty:
                getattr(sys.stdout, "raw", sys.stdout).write(CLEAR)       # our own control sequence
                sys.stdout.write("\n".join(lines) + "\n(Ctrl-C quits)\n")
            else:
                if shown:
                    sys.stdout.write("\n")
                sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            shown += 1
    except KeyboardInterrupt:
        pass
    if problem:
        from app.errors import EXIT_BPF
        print(f"portwatch: error: {problem}", file=sys.stderr)
        return EXIT_BPF
    return 0


def detached(interface: str, pin_root: str) -> str | None:
    """One sentence when the counters top shows cannot move: portwatch's XDP program is not attached
    to ``interface`` (detached by hand, replaced, or the interface gone); None when it is."""
    from app.services.ops.health import describe_interface
    x = describe_interface(interface, pin_root)
    if not x.get("exists", True):
        return f"interface {interface} no longer exists: its pins are left over (python -m app down --interface {interface})"
    if not x.get("attached") or x.get("ours") is False:
        return (f"portwatch's XDP program is not attached to {interface}: these counters do not move and its traffic "
                f"is neither counted nor filtered (python -m app collect --interface {interface} re-attaches it)")
    return None
