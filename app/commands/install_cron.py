"""`python -m app install-cron [--user root] [--dry-run] [--cron-file PATH]`: schedule portwatch.

Writes a system crontab (default /etc/cron.d/portwatch, the format with a user field) with three
entries, with the venv's absolute python path and the repository's absolute paths, logging to
<log-dir>/{collector,evaluator,cleanup}.log (the directory 0700, or 0750 for general.group; each entry
sets the umask first, so the logs are never world-readable). Each job takes its own lock in
general.run_dir (root-only, app/services/locks.py): a run still busy makes the next one exit 6
with one line in its log instead of overlapping it.

  every minute   app/port_collector.py --round-seconds 50   (rounds are differences since the
                 previous read, so the 10 s the run does not sleep are counted in the next round)
  hourly (:07)   app/port_detector.py                       (one evaluation; writes the report)
  daily (03:23)  python -m app cleanup                       (retention.keep_days)

crontab.example at the repository root holds the same entries for a user crontab.
Exit codes: 0 written (or printed); 2 bad user, path or file name; 3 not allowed to write it.
"""
from __future__ import annotations

import os
import pwd
import shlex
import sys
import time
from pathlib import Path

from app.cli import add_command

DEFAULT_CRON_FILE = "/etc/cron.d/portwatch"
DEFAULT_LOG_DIR = "/var/log/portwatch"
COLLECTOR_ROUND_SECONDS = 50

DESCRIPTION = """Write the cron entries that run portwatch: the collector every minute, the evaluator
hourly and the cleanup daily (each takes its lock in general.run_dir: no overlapping runs), with the
venv's absolute python path, logging to --log-dir. --dry-run prints the file instead of writing it.

examples:
  sudo .venv/bin/python -m app install-cron
  .venv/bin/python -m app install-cron --dry-run
  sudo .venv/bin/python -m app install-cron --cron-file /etc/cron.d/portwatch-eth1 --user root"""


def venv_python() -> Path:
    """The running venv's python by its venv path (not resolved: resolving leaves the venv)."""
    candidate = Path(sys.prefix) / "bin" / "python"
    if candidate.exists():
        return candidate.absolute()
    return Path(sys.executable).absolute()


def entries(python: Path, root: Path, log_dir: Path, umask: str = "077") -> list[tuple[str, str, str]]:
    """[(schedule, command, comment)] for the three jobs; paths absolute and shell-quoted."""
    py, rt, logs = shlex.quote(str(python)), Path(root), Path(log_dir)
    mask = f"umask {umask} &&"

    def q(path) -> str:
        return shlex.quote(str(path))

    return [
        ("* * * * *",
         f"{mask} {py} {q(rt / 'app' / 'port_collector.py')} "
         f"--round-seconds {COLLECTOR_ROUND_SECONDS} >> {q(logs / 'collector.log')} 2>&1",
         "collector: one round per minute"),
        ("7 * * * *",
         f"{mask} {py} {q(rt / 'app' / 'port_detector.py')} "
         f">> {q(logs / 'evaluator.log')} 2>&1",
         "evaluator: one evaluation per hour (and the report)"),
        ("23 3 * * *",
         f"{mask} cd {q(rt)} && {py} -m app cleanup "
         f">> {q(logs / 'cleanup.log')} 2>&1",
         "cleanup: retention and vacuum, daily"),
    ]


def render(python: Path, root: Path, log_dir: Path, user: str | None, now: float | None = None) -> str:
    """The crontab text; with ``user`` the /etc/cron.d format (a user field after the schedule)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() if now is None else now))
    lines = [f"# portwatch cron entries, written by `python -m app install-cron` on {stamp}.",
             "# A new install-cron run overwrites this file. Each job takes its lock in general.run_dir: a run",
             "# still busy makes the next one exit 6 instead of piling up. Logs: " + str(log_dir) + "/*.log",
             "SHELL=/bin/sh",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             ""]
    from app import permissions
    for schedule, command, comment in entries(python, root, log_dir, f"{permissions.umask():03o}"):
        lines.append(f"# {comment}")
        lines.append(f"{schedule} {user} {command}" if user else f"{schedule} {command}")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    parser = add_command(sub, "install-cron", "write the cron entries (collector, evaluator, cleanup)", DESCRIPTION)
    parser.add_argument("--user", default="root", help="user the jobs run as (default: root; XDP needs root)")
    parser.add_argument("--cron-file", default=DEFAULT_CRON_FILE, metavar="PATH",
                        help=f"system crontab to write (default: {DEFAULT_CRON_FILE})")
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR, metavar="DIR",
                        help=f"where the jobs log (default: {DEFAULT_LOG_DIR})")
    parser.add_argument("--python", metavar="PATH", help="python to run (default: this venv's python)")
    parser.add_argument("--dry-run", action="store_true", help="print the entries, write nothing")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.config import REPO_ROOT
    from app.errors import NeedsRootError, UsageError
    from app.services.files import atomic_write
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        raise UsageError(f"user {args.user!r} does not exist on this host: pass an existing one with --user") from None
    python = Path(args.python).absolute() if args.python else venv_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"{python} is not an executable python: run make setup or pass --python")
    cron_file = Path(args.cron_file).absolute()
    log_dir = Path(args.log_dir).absolute()
    text = render(python, REPO_ROOT, log_dir, args.user)
    if cron_file.parent == Path("/etc/cron.d") and "." in cron_file.name:
        raise UsageError(f"cron ignores files in /etc/cron.d whose names contain a dot: choose a name like "
                         f"{cron_file.name.replace('.', '-')}")
    if not cron_file.parent.is_dir():
        raise UsageError(f"directory {cron_file.parent} does not exist: install cron (apt-get install cron) "
                         "or choose another --cron-file")
    if args.dry_run:
        print(f"# would write {cron_file}")
        print(text, end="")
        return 0
    try:
        from app import permissions
        permissions.make_dir(log_dir)
        permissions.secure(log_dir)           # an existing one too: the logs name sources and ports
        atomic_write(cron_file, text, mode=0o644)      # cron skips group/other-writable files
    except PermissionError as exc:
        raise NeedsRootError(f"cannot write {exc.filename or cron_file}: run install-cron as root (sudo)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {cron_file}: {exc.strerror}") from None
    print(f"wrote {cron_file}: collector every minute, evaluator hourly, cleanup daily (user {args.user}, "
          f"python {python}); logs in {log_dir}")
    return 0
