"""The subcommand registry: which modules app/commands/ holds, in --help order, and the parser pieces
they share (common options, exit-code epilog). Commands import this module, never app.cli."""
from __future__ import annotations

import argparse
import importlib

# subcommand module names, in --help order
COMMAND_MODULES = ["run", "collect", "evaluate", "anomalies", "blacklist", "allow", "report", "status", "top",
                   "model", "down", "cleanup", "doctor", "install_cron", "config_cmd", "fleet", "replay", "score"]

EPILOG = """exit codes: 0 ok, 1 error (status, doctor: unhealthy), 2 bad usage or input, 3 needs root,
4 database problem, 5 kernel/BPF problem, 6 another run holds the lock, 7 missing dependency,
141 output pipe closed (e.g. piped into head): the rest is dropped quietly"""


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name too (``collect --db X``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML config file (default: $PORTWATCH_CONFIG or /etc/portwatch/config.toml)")
    parent.add_argument("--db", default=argparse.SUPPRESS, help="SQLite database (default: general.db)")
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    return parent


def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with the common options; the caller adds its own and set_defaults(func=...)."""
    return sub.add_parser(name, help=help, description=description or help, parents=[common_options()],
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)


def register_all(sub) -> None:
    """Import each command module in COMMAND_MODULES order and let it add its parser to ``sub``
    (an argparse subparsers action); a module missing from this installation is left out."""
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"app.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"app.commands.{name}":
                raise
            continue
        module.register(sub)
