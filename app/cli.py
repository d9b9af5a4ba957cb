# PYTHON_ARGCOMPLETE_OK  (argcomplete: tab completion of subcommands and options, see below)
"""The `python -m app` / `portwatch` command line: parse, configure logging, dispatch, exit code.

Each subcommand lives in app/commands/<name>.py, listed in app/commands/registry.py, and exposes
``register(subparsers)``, which adds its parser and sets ``func(args, settings) -> int``. Command
modules import nothing heavy at module level (TensorFlow, matplotlib, BCC only inside functions).
Errors a user can cause are PortwatchError: printed as one sentence, mapped to an exit code.
"""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys

from app import __version__
from app import config as config_mod
from app.commands.registry import EPILOG, register_all
from app.errors import EXIT_DB, EXIT_ERROR, EXIT_PIPE, EXIT_ROOT, EXIT_USAGE, PortwatchError

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portwatch", description="Host network anomaly detector (XDP counters, SQLite rounds, "
        "CNN-LSTM autoencoder, XDP blocklist).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"portwatch {__version__}")
    parser.add_argument("--config", help="TOML config file (default: $PORTWATCH_CONFIG or /etc/portwatch/config.toml)")
    parser.add_argument("--db", help="SQLite database (default: general.db)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_all(sub)
    return parser


def configure_logging(level: str, quiet: bool, verbose: bool) -> None:
    from app.services.text import InertFormatter
    if verbose:
        level = "DEBUG"
    elif quiet:
        level = "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def print_config_error(exc: config_mod.ConfigError) -> None:
    """One line for one problem; a count and one line per problem when there are several."""
    from app.services.text import inert
    if len(exc.problems) == 1:
        _error(exc)
        return
    print(f"portwatch: error: {len(exc.problems)} problems in the configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {inert(problem)}", file=sys.stderr)


def closed_pipe() -> int:
    """The reader of stdout went away (``status | head``): no traceback, no "Exception ignored" at
    exit (stdout now points at /dev/null), and the exit code of a process killed by SIGPIPE."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's tab completion and exit, when the shell asked (argcomplete's _ARGCOMPLETE);
    otherwise return at once. Installed by scripts/setup.sh for bash (register-python-argcomplete)."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def secure_files(settings) -> None:
    """Once per process: the umask and group of app.permissions (nothing portwatch creates is
    world-readable), and its step for every database file a writer opens (app/db knows no modes)."""
    from app import permissions
    from app.db import connection
    permissions.configure(settings)
    connection.use_file_step(permissions.prepare_db)


def main(argv: list[str] | None = None) -> int:
    """Parse, configure, dispatch; everything the command prints goes through an InertStream (names from
    the network or other users can carry terminal control sequences)."""
    from app.services.text import InertStream
    stdout = sys.stdout
    sys.stdout = InertStream(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout = stdout


def _error(message) -> None:
    from app.services.text import inert
    print(f"portwatch: error: {inert(message)}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    complete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:              # --help, --version, a usage error: flush before leaving
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return closed_pipe()
        raise done
    except BrokenPipeError:
        return closed_pipe()
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        settings = config_mod.load(args.config)
        settings.override("general", "db", args.db)
    except config_mod.ConfigError as exc:
        print_config_error(exc)
        if getattr(args, "json", False):     # `config check --json`: the verdict as data too
            from app.services.text import json_dumps
            print(json_dumps({"valid": False, "config_file": args.config, "problems": list(exc.problems)}))
        return EXIT_USAGE
    configure_logging(settings.general.log_level, args.quiet, args.verbose)
    secure_files(settings)
    try:
        code = int(args.func(args, settings) or 0)
        sys.stdout.flush()                  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return closed_pipe()
    except PermissionError as exc:          # a root-only file, directory or pinned map
        if os.geteuid() == 0:
            return _unexpected(args.command)
        what = f": {exc.filename} is root-only" if exc.filename else ""
        print(f"portwatch: error: '{args.command}' needs root{what}; run it with sudo", file=sys.stderr)
        return EXIT_ROOT
    except PortwatchError as exc:
        _error(exc)
        return exc.exit_code
    except config_mod.ConfigError as exc:
        _error(exc)
        return EXIT_USAGE
    except sqlite3.DatabaseError as exc:
        from app.db.connection import database_error
        _error(database_error(exc, settings.general.db))
        return EXIT_DB
    except KeyboardInterrupt:
        print("portwatch: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback in the log, one line for the user
        return _unexpected(args.command)


def _unexpected(command: str) -> int:
    """A bug: the traceback goes to the log, one line to the user."""
    log.exception("unexpected failure in %s", command)
    print(f"portwatch: error: unexpected failure in '{command}' (traceback above); please report it", file=sys.stderr)
    return EXIT_ERROR
