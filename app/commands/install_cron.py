"""`python -m app install-cron [--systemd] [--uninstall] [--interface IF] [--dry-run] ...`: schedule portwatch.

Writes a system crontab (default /etc/cron.d/portwatch), or with --systemd three service + timer unit
pairs (nothing is enabled: the command is printed), and a logrotate file; every job carries the database,
config file, interface and PORTWATCH_* settings install-cron was run with (README: Scheduling with
cron; the jobs and their times: :func:`jobs`). The jobs need root: --user must name a uid-0 account.
Exit codes: 0 written, removed (or printed); 2 bad user, path or file name; 3 not allowed to write it.
"""
from __future__ import annotations

import os
import pwd
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.commands.registry import add_command
from app.services.text import counted, utc

DEFAULT_CRON_FILE = "/etc/cron.d/portwatch"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_LOGROTATE_FILE = "/etc/logrotate.d/portwatch"
DEFAULT_LOG_DIR = "/var/log/portwatch"
COLLECTOR_ROUND_SECONDS = 50
MARK = "written by `python -m app install-cron`"
# PORTWATCH_* variables that become flags instead of being carried in the environment
AS_FLAGS = {"PORTWATCH_CONFIG", "PORTWATCH_DB", "PORTWATCH_GENERAL_DB", "PORTWATCH_INTERFACE",
            "PORTWATCH_GENERAL_INTERFACE"}

DESCRIPTION = """Schedule portwatch: the collector every minute, the evaluator hourly and the cleanup
daily, as a system crontab (default) or systemd timers (--systemd), plus a logrotate file for their
logs. The jobs carry the --db, --config, --interface and PORTWATCH_* settings this command runs
with. --dry-run prints what would be written; --uninstall removes it again.

examples:
  sudo .venv/bin/python -m app install-cron --interface eth0
  sudo .venv/bin/python -m app --db /srv/pw/ports.db install-cron --dry-run
  sudo .venv/bin/python -m app install-cron --systemd      # then: systemctl enable --now portwatch-*.timer
  sudo .venv/bin/python -m app install-cron --systemd --fleet-node   # and the fleet's per-host node
  sudo .venv/bin/python -m app install-cron --uninstall"""


@dataclass
class Job:
    name: str            # collector, evaluator, cleanup
    argv: list[str]      # the command, without redirection
    schedule: str        # cron schedule
    calendar: str        # systemd OnCalendar
    comment: str


def venv_python() -> Path:
    """The running venv's python by its venv path (not resolved: resolving leaves the venv)."""
    candidate = Path(sys.prefix) / "bin" / "python"
    if candidate.exists():
        return candidate.absolute()
    return Path(sys.executable).absolute()


def carried_environment(environ=None) -> dict[str, str]:
    """The PORTWATCH_* settings of this run that the jobs must see too (sorted by name)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith("PORTWATCH_") and k not in AS_FLAGS}


def jobs(python: Path, root: Path, db: str, config: str | None, interface: str | None) -> list[Job]:
    """The three jobs with every path absolute:

    every minute   app/port_collector.py --round-seconds 50   (rounds are differences since the
                   previous read, so the 10 s the run does not sleep are counted in the next round)
    hourly (:07)   app/port_detector.py                       (one evaluation; writes the report)
    daily (03:23)  python -m app cleanup                       (retention.keep_days)

    --fleet-node   (with --systemd) portwatch-fleet-node.service: `python -m app fleet node`, this host's
                   Flower SuperNode, a long-running service (Restart=on-failure), not a timer. A node is a
                   daemon, not a cron job: without --systemd --fleet-node is refused with that advice.

    Each logs to <log-dir>/{collector,evaluator,cleanup}.log under a root-only umask (0700 directory, or
    0750 for general.group) and takes its own lock in general.run_dir (app/services/locks.py): a run
    still busy makes the next one exit 6 with one line in its log instead of overlapping it.
    --uninstall removes what an install wrote; crontab.example holds the same entries for a user
    crontab, contrib/logrotate/portwatch the logrotate file for the default log directory."""
    common = ["--db", str(Path(db).absolute())] + (["--config", str(Path(config).absolute())] if config else [])
    collector = [str(python), str(root / "app" / "port_collector.py"), *common]
    if interface:
        collector += ["--interface", interface]
    return [
        Job("collector", collector + ["--round-seconds", str(COLLECTOR_ROUND_SECONDS)], "* * * * *",
            "*-*-* *:*:00", "collector: one round per minute"),
        Job("evaluator", [str(python), str(root / "app" / "port_detector.py"), *common], "7 * * * *",
            "*-*-* *:07:00", "evaluator: one evaluation per hour (and the report)"),
        Job("cleanup", [str(python), "-m", "app", "cleanup", *common], "23 3 * * *", "*-*-* 03:23:00",
            "cleanup: retention and vacuum, daily"),
    ]


# --- cron -----------------------------------------------------------------------------------------

def cron_command(job: Job, root: Path, log_dir: Path, env: dict[str, str], umask: str) -> str:
    """One shell command line; '%' escaped (cron turns a bare '%' into a newline)."""
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = " ".join(shlex.quote(a) for a in job.argv)
    text = (f"umask {umask} && cd {shlex.quote(str(root))} && {assignments + ' ' if assignments else ''}{command} "
            f">> {shlex.quote(str(log_dir / (job.name + '.log')))} 2>&1")
    return text.replace("%", "\\%")


def render(the_jobs: list[Job], root: Path, log_dir: Path, user: str | None, env: dict[str, str],
           now: float | None = None) -> str:
    """The crontab text; with ``user`` the /etc/cron.d format (a user field after the schedule)."""
    from app import permissions
    stamp = utc(time.time() if now is None else now, seconds=False)
    lines = [f"# portwatch cron entries, {MARK} on {stamp}.",
             "# A new install-cron run overwrites this file; install-cron --uninstall removes it. Each job takes",
             "# its lock in general.run_dir: a run still busy makes the next one exit 6 instead of piling up.",
             f"# Logs: {log_dir}/*.log (rotated by the logrotate file install-cron writes).",
             "SHELL=/bin/sh",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             ""]
    for job in the_jobs:
        command = cron_command(job, root, log_dir, env, f"{permissions.umask():03o}")
        lines.append(f"# {job.comment}")
        lines.append(f"{job.schedule} {user} {command}" if user else f"{job.schedule} {command}")
    return "\n".join(lines) + "\n"


# --- systemd --------------------------------------------------------------------------------------

def _unit_quote(word: str) -> str:
    """One ExecStart/Environment word for systemd: specifiers ('%') and variables ('$') escaped,
    double-quoted when it holds a space, quote or backslash."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\]', word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def unit_files(the_jobs: list[Job], root: Path, log_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """{file name: text} of a service and a timer per job."""
    from app import permissions
    out = {}
    for job in the_jobs:
        log = log_dir / f"{job.name}.log"
        service = [f"# {MARK}; install-cron --systemd --uninstall removes it.",
                   "[Unit]", f"Description=portwatch {job.comment}", "After=network-online.target", "",
                   "[Service]", "Type=oneshot", f"UMask={permissions.umask():04o}",
                   f"WorkingDirectory={_unit_quote(str(root))}"]
        service += [f"Environment={_unit_quote(f'{k}={v}')}" for k, v in env.items()]
        service += [f"ExecStart={' '.join(_unit_quote(a) for a in job.argv)}",
                    f"StandardOutput=append:{log}", f"StandardError=append:{log}", ""]
        timer = [f"# {MARK}; install-cron --systemd --uninstall removes it.",
                 "[Unit]", f"Description=portwatch {job.comment} (timer)", "",
                 "[Timer]", f"OnCalendar={job.calendar}", "AccuracySec=1s",
                 f"Persistent={'false' if job.name == 'collector' else 'true'}", "",
                 "[Install]", "WantedBy=timers.target", ""]
        out[f"portwatch-{job.name}.service"] = "\n".join(service)
        out[f"portwatch-{job.name}.timer"] = "\n".join(timer)
    return out


FLEET_NODE_UNIT = "portwatch-fleet-node.service"


def fleet_node_unit(python: Path, root: Path, db: str, config: str | None, log_dir: Path,
                    env: dict[str, str]) -> str:
    """The service of `python -m app fleet node` (the Flower SuperNode): long-running, restarted on failure."""
    from app import permissions
    argv = [str(python), "-m", "app", "fleet", "node", "--db", str(Path(db).absolute())] + \
        (["--config", str(Path(config).absolute())] if config else [])
    log = log_dir / "fleet-node.log"
    lines = [f"# {MARK}; install-cron --systemd --uninstall removes it.",
             "[Unit]", "Description=portwatch fleet node (Flower SuperNode of this host)",
             "Wants=network-online.target", "After=network-online.target", "",
             "[Service]", "Type=simple", f"UMask={permissions.umask():04o}",
             f"WorkingDirectory={_unit_quote(str(root))}"]
    lines += [f"Environment={_unit_quote(f'{k}={v}')}" for k, v in env.items()]
    lines += [f"ExecStart={' '.join(_unit_quote(a) for a in argv)}", "Restart=on-failure", "RestartSec=30",
              f"StandardOutput=append:{log}", f"StandardError=append:{log}", "",
              "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def timer_names(the_jobs: list[Job]) -> list[str]:
    return [f"portwatch-{job.name}.timer" for job in the_jobs]


# --- logrotate ------------------------------------------------------------------------------------

def logrotate_text(log_dir: Path, group: str = "") -> str:
    """Weekly rotation of the jobs' logs, 8 kept, compressed, recreated root-only (or group-readable)."""
    owner = f"root {group}" if group else "root root"
    mode = "0640" if group else "0600"
    return (f"# portwatch job logs, {MARK}; install-cron --uninstall removes it.\n"
            f"{log_dir}/*.log {{\n"
            "    weekly\n    rotate 8\n    maxsize 50M\n    compress\n    delaycompress\n"
            "    missingok\n    notifempty\n"
            f"    create {mode} {owner}\n"
            f"    su {owner}\n"
            "}\n")


# --- the command ----------------------------------------------------------------------------------

def register(sub) -> None:
    parser = add_command(sub, "install-cron", "schedule the collector, evaluator and cleanup (cron or systemd) "
                         "with logrotate", DESCRIPTION)
    parser.add_argument("--interface", "-i", metavar="IF",
                        help="interface the collector watches (default: general.interface, else the "
                             "default-route one at each run)")
    parser.add_argument("--user", default="root", help="user the jobs run as (default root; must have uid 0)")
    parser.add_argument("--cron-file", default=DEFAULT_CRON_FILE, metavar="PATH",
                        help=f"system crontab to write (default: {DEFAULT_CRON_FILE})")
    parser.add_argument("--systemd", action="store_true",
                        help="write systemd service and timer units instead of a crontab (not enabled)")
    parser.add_argument("--fleet-node", action="store_true",
                        help=f"with --systemd also write {FLEET_NODE_UNIT} (python -m app fleet node, a "
                             "long-running service restarted on failure)")
    parser.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, metavar="DIR",
                        help=f"where --systemd writes the units (default: {DEFAULT_UNIT_DIR})")
    parser.add_argument("--logrotate-file", default=DEFAULT_LOGROTATE_FILE, metavar="PATH",
                        help=f"logrotate file for the logs (default: {DEFAULT_LOGROTATE_FILE}; '' to skip)")
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR, metavar="DIR",
                        help=f"where the jobs log (default: {DEFAULT_LOG_DIR})")
    parser.add_argument("--python", metavar="PATH", help="python to run (default: this venv's python)")
    parser.add_argument("--uninstall", action="store_true",
                        help="remove the crontab (or with --systemd the units) and the logrotate file")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written or removed")
    parser.set_defaults(func=run)


def _check_user(name: str) -> None:
    from app.errors import UsageError
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"user {name!r} does not exist on this host: pass an existing one with --user") from None
    if entry.pw_uid != 0:
        raise UsageError(f"user {name!r} is not root (uid {entry.pw_uid}): the jobs load XDP and read pinned maps, "
                         "so they must run as root (--user root)")


def _write(path: Path, text: str) -> None:
    from app.errors import NeedsRootError, UsageError
    from app.services.files import atomic_write
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist: create it or choose another path")
    try:
        atomic_write(path, text, mode=0o644)      # cron and logrotate skip group/other-writable files
    except PermissionError as exc:
        raise NeedsRootError(f"cannot write {exc.filename or path}: run install-cron as root (sudo)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _ours(path: Path) -> bool:
    try:
        return MARK in path.read_text(errors="replace")[:400]
    except OSError:
        return False


def uninstall(args, targets: list[Path]) -> int:
    from app.errors import NeedsRootError, UsageError
    present = [p for p in targets if p.exists()]
    foreign = [p for p in present if not _ours(p)]
    if foreign:
        raise UsageError(f"{foreign[0]} was not written by install-cron: remove it yourself if it is portwatch's")
    if args.dry_run:
        print("\n".join(f"would remove {p}" for p in present) or "nothing to remove")
        return 0
    if args.systemd and Path(args.unit_dir) == Path(DEFAULT_UNIT_DIR) and Path("/run/systemd/system").is_dir():
        import subprocess
        timers = [p.name for p in present if p.suffix == ".timer" or p.name == FLEET_NODE_UNIT]
        if timers:
            subprocess.run(["systemctl", "disable", "--now", *timers], capture_output=True, check=False)
    for path in present:
        try:
            path.unlink()
        except PermissionError:
            raise NeedsRootError(f"cannot remove {path}: run install-cron --uninstall as root (sudo)") from None
    print(f"removed {counted(len(present), 'file')}" + "".join(f"\n  {p}" for p in present) if present
          else "nothing to remove: " + ", ".join(str(p) for p in targets))
    return 0


def run(args, settings) -> int:
    from app import permissions
    from app.config import REPO_ROOT
    from app.errors import UsageError
    settings.override("general", "interface", args.interface)
    _check_user(args.user)
    python = Path(args.python).absolute() if args.python else venv_python()
    cron_file = Path(args.cron_file).absolute()
    unit_dir = Path(args.unit_dir).absolute()
    rotate = Path(args.logrotate_file).absolute() if args.logrotate_file else None
    log_dir = Path(args.log_dir).absolute()
    if not args.systemd and cron_file.parent == Path("/etc/cron.d") and "." in cron_file.name:
        raise UsageError(f"cron ignores files in /etc/cron.d whose names contain a dot: choose a name like "
                         f"{cron_file.name.replace('.', '-')}")
    if args.fleet_node and not args.systemd and not args.uninstall:
        raise UsageError("a fleet node is a long-running daemon, not a cron job: install it as a service with "
                         "--systemd --fleet-node")
    the_jobs = jobs(python, REPO_ROOT, settings.general.db, settings.config_path, settings.general.interface or None)
    if args.uninstall:
        targets = ([unit_dir / name for name in [*unit_files(the_jobs, REPO_ROOT, log_dir, {}), FLEET_NODE_UNIT]]
                   if args.systemd
                   else [cron_file]) + ([rotate] if rotate else [])
        return uninstall(args, targets)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"{python} is not an executable python: run make setup or pass --python")
    env = carried_environment()
    files = _files(args, settings, the_jobs, python, cron_file, unit_dir, rotate, log_dir, env)
    if args.dry_run:
        for path, text in files.items():
            print(f"# would write {path}")
            print(text, end="" if text.endswith("\n") else "\n")
        return 0
    for path in files:
        if not path.parent.is_dir():
            raise UsageError(f"directory {path.parent} does not exist: create it or choose another path")
    try:
        permissions.make_dir(log_dir)
        permissions.secure(log_dir)           # an existing one too: the logs name sources and ports
    except PermissionError as exc:
        from app.errors import NeedsRootError
        raise NeedsRootError(f"cannot create {exc.filename or log_dir}: run install-cron as root (sudo)") from None
    for path, text in files.items():
        _write(path, text)
    _print_installed(args, settings, the_jobs, python, cron_file, unit_dir, rotate, log_dir, env)
    return 0


def _files(args, settings, the_jobs: list[Job], python: Path, cron_file: Path, unit_dir: Path, rotate: Path | None,
           log_dir: Path, env: dict[str, str]) -> dict[Path, str]:
    """Path -> text of every file to install: the systemd units (and the fleet node's) or the cron file,
    and the logrotate file. UsageError when the fleet node's settings are invalid or cron is missing."""
    from app.config import REPO_ROOT
    from app.errors import UsageError
    files: dict[Path, str] = {}
    if args.systemd:
        files.update({unit_dir / name: text for name, text in unit_files(the_jobs, REPO_ROOT, log_dir, env).items()})
        if args.fleet_node:
            problems = settings.fleet.problems("node")       # a node that cannot start would restart forever
            if problems:
                raise UsageError(f"cannot install the fleet node: {'; '.join(problems)}")
            files[unit_dir / FLEET_NODE_UNIT] = fleet_node_unit(python, REPO_ROOT, settings.general.db,
                                                                settings.config_path, log_dir, env)
    else:
        if not cron_file.parent.is_dir():
            raise UsageError(f"directory {cron_file.parent} does not exist: install cron (apt-get install cron) "
                             "or choose another --cron-file")
        files[cron_file] = render(the_jobs, REPO_ROOT, log_dir, args.user, env)
    if rotate:
        files[rotate] = logrotate_text(log_dir, settings.general.group)
    return files


def _print_installed(args, settings, the_jobs: list[Job], python: Path, cron_file: Path, unit_dir: Path,
                     rotate: Path | None, log_dir: Path, env: dict[str, str]) -> None:
    """What was written and carried, and how to enable it."""
    carried = [f"database {settings.general.db}"] + ([f"config {settings.config_path}"] if settings.config_path else []) \
        + [f"interface {settings.general.interface or 'the default-route one'}"] \
        + ([counted(len(env), "PORTWATCH_* setting")] if env else [])
    where = f"units in {unit_dir}" if args.systemd else str(cron_file)
    node = ", the fleet node as a service" if args.fleet_node else ""
    print(f"wrote {where}: collector every minute, evaluator hourly, cleanup daily{node} (user {args.user}, python "
          f"{python}; {', '.join(carried)}); logs in {log_dir}" + (f", rotated by {rotate}" if rotate else ""))
    if args.systemd:
        print(f"enable them with: systemctl daemon-reload && systemctl enable --now {' '.join(timer_names(the_jobs))}"
              + (f" {FLEET_NODE_UNIT}" if args.fleet_node else ""))
    elif settings.fleet.superlink:
        print(f"fleet.superlink is set: the fleet node is a daemon, not a cron job; install it as a service with "
              f"install-cron --systemd --fleet-node ({FLEET_NODE_UNIT})")
