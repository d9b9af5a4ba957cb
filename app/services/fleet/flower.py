"""Flower's deployment engine for portwatch: the coordinator's SuperLink and federations (:func:`serve`),
each host's SuperNode (:func:`node`). Processes and command lines only (the pinned ``flwr`` executables
of this environment); the model work is learning.py, run inside Flower's ServerApp/ClientApp
(flower_app/). What crosses the wire, and what a host does while the coordinator is down: README,
"One model (Flower)".
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.errors import DependencyError, PortwatchError, UsageError

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flower_app"
PACKAGE_ROOT = Path(__file__).resolve().parents[3]          # the directory holding the app package
CONNECTION = "portwatch"


def _exe(name: str) -> str:
    """A Flower executable of this Python environment."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise DependencyError(f"{name} is not installed: install the pinned requirements (make setup)")
    return found


def coordinator_dir(settings) -> Path:
    return Path(settings.general.state_dir) / "fleet"


def superlink_command(settings) -> list[str]:
    cfg = settings.fleet
    host, _, port = cfg.listen.rpartition(":")
    coordinator_dir(settings).mkdir(parents=True, exist_ok=True)
    cmd = [_exe("flower-superlink"), "--host", host, "--port", port,
           "--database", str(coordinator_dir(settings) / "superlink.db"), "--disable-runtime-dependency-installation"]
    if cfg.insecure:
        return cmd + ["--insecure"]
    return cmd + ["--ssl-ca-certfile", cfg.ca_cert, "--ssl-certfile", cfg.server_cert, "--ssl-keyfile", cfg.server_key]


def supernode_command(settings) -> list[str]:
    cfg = settings.fleet
    node_config = {"db": str(Path(settings.general.db).resolve()),
                   "state-dir": str(Path(settings.general.state_dir).resolve()),
                   "config": settings.config_path or ""}
    cmd = [_exe("flower-supernode"), "--superlink", cfg.superlink, "--host", "127.0.0.1", "--port", str(cfg.node_port),
           "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]
    return cmd + (["--insecure"] if cfg.insecure else ["--root-certificates", cfg.ca_cert])


def run_config(settings) -> dict:
    cfg, ev = settings.fleet, settings.evaluator
    return {"num-server-rounds": cfg.rounds, "fraction": cfg.fraction, "min-hosts": cfg.min_hosts,
            "aggregation": cfg.aggregation, "trim-fraction": cfg.trim_fraction,
            "round-timeout": float(cfg.round_timeout_seconds), "state-dir": str(coordinator_dir(settings).resolve()),
            "window": ev.window, "lstm-units": ev.lstm_units, "bottleneck": ev.bottleneck, "seed": ev.seed}


def _flwr_home(settings) -> Path:
    """A Flower CLI home of the coordinator's own, naming its SuperLink (never ~/.flwr)."""
    cfg = settings.fleet
    home = coordinator_dir(settings) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    host, _, port = cfg.listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{host}:{port}"']
    lines.append("insecure = true" if cfg.insecure else f'root-certificates = "{Path(cfg.ca_cert).resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def record(settings) -> dict:
    """The coordinator's record of finished federations ({} before the first)."""
    path = coordinator_dir(settings) / "fleet.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def submit(settings) -> str:
    """Start one federation on the running SuperLink; returns its run id."""
    env = dict(flower_env(), FLWR_HOME=str(_flwr_home(settings)))
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config(settings).items())
    proc = subprocess.run([_exe("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", overrides,
                           "--format", "json"], capture_output=True, text=True, env=env, timeout=120)
    try:
        answer = json.loads(proc.stdout[proc.stdout.index("{"):]) if "{" in proc.stdout else {}
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        detail = (answer.get("error-message") or proc.stderr.strip() or proc.stdout.strip())[-400:]
        raise PortwatchError(f"the SuperLink did not start the federation: {detail}")
    return str(answer.get("run-id"))


def wait_for_federation(settings, before: int, timeout: float, superlink: subprocess.Popen | None = None) -> dict:
    """Wait until the ServerApp records federation number ``before + 1``; returns the record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = record(settings)
        if int(rec.get("federations", 0)) > before:
            return rec
        if superlink is not None and superlink.poll() is not None:
            raise PortwatchError(f"the SuperLink exited (status {superlink.returncode}) during the federation")
        time.sleep(0.5)
    raise PortwatchError(f"the federation did not finish within {timeout:.0f} s: are fleet.min_hosts "
                         f"({settings.fleet.min_hosts}) hosts' nodes connected?")


def flower_env(home: Path | None = None) -> dict:
    """The environment for Flower's processes: they start their helpers (flower-superexec,
    flwr-serverapp, flwr-clientapp) by name, so this environment's bin directory comes first; and
    they keep installed apps under FLWR_HOME, here portwatch's state dir rather than ~/.flwr; and they
    import this portwatch (PYTHONPATH), not another installed copy."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    # the ServerApp/ClientApp import portwatch: the same portwatch as the command that starts them
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(home)
    return env


def start(cmd: list[str], log_path: Path, home: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=flower_env(home))


def node_home(settings) -> Path:
    return Path(settings.general.state_dir) / "fleet" / "node-home"


def stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """End a process group started by :func:`start` (its ServerApp/ClientApp children too)."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(settings, once: bool = False, stop_event=None) -> dict:
    """The coordinator: SuperLink up, then a federation now and every fleet.interval_seconds.

    flower-superlink (TLS: fleet.ca_cert/server_cert/server_key) on fleet.listen, then per federation
    `flwr run <flower_app> portwatch` with the [fleet]/[evaluator] run config (:func:`run_config`); the
    ServerApp records each finished federation in <state_dir>/fleet/fleet.json (:func:`record`)."""
    problems = settings.fleet.problems("serve")
    if problems:
        raise UsageError("; ".join(problems))
    directory = coordinator_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o750)
    superlink = start(superlink_command(settings), directory / "superlink.log", directory / "link-home")
    try:
        time.sleep(2.0)
        if superlink.poll() is not None:
            raise PortwatchError(f"flower-superlink exited at once: see {directory / 'superlink.log'}")
        while True:
            before = int(record(settings).get("federations", 0))
            run_id = _submit_retrying(settings, superlink)
            log.info("federation started (run %s), waiting for %d host(s)", run_id, settings.fleet.min_hosts)
            rec = wait_for_federation(settings, before, settings.fleet.rounds * settings.fleet.round_timeout_seconds
                                      + 120, superlink)
            log.info("federation %d finished", rec["federations"])
            if once or (stop_event is not None and stop_event.wait(settings.fleet.interval_seconds)):
                return rec
            if stop_event is None:
                time.sleep(settings.fleet.interval_seconds)
    finally:
        stop(superlink)


def _submit_retrying(settings, superlink, attempts: int = 10) -> str:
    for k in range(attempts):
        try:
            return submit(settings)
        except PortwatchError as exc:
            if k == attempts - 1 or superlink.poll() is not None:
                raise
            log.debug("submit failed (%s); the SuperLink may still be starting", exc)
            time.sleep(1.0)
    raise AssertionError("unreachable")


RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)   # seconds before the SuperNode's 1st, 2nd, ... restart


def node(settings, stop_event=None) -> int:
    """This host's SuperNode in the foreground, restarted after it dies (a crash, a kill: the delays
    of RESTART_DELAYS, the last one repeated) until SIGTERM/SIGINT or ``stop_event``; returns 0 then.
    A lost coordinator does not end it: the SuperNode retries the SuperLink by itself.

    flower-supernode --superlink fleet.superlink --root-certificates fleet.ca_cert, its node config
    naming this host's config file, database and state dir (:func:`supernode_command`)."""
    problems = settings.fleet.problems("node")
    if problems:
        raise UsageError("; ".join(problems))
    import threading
    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop_event.set())
    restarts = 0
    while not stop_event.is_set():
        proc = subprocess.Popen(supernode_command(settings), env=flower_env(node_home(settings)),
                                start_new_session=True)
        log.info("fleet: SuperNode started (pid %d)", proc.pid)
        while proc.poll() is None and not stop_event.wait(0.5):
            pass
        if stop_event.is_set():
            stop(proc)
            return 0
        delay = RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)]
        restarts += 1
        log.warning("fleet: the SuperNode exited (status %s): restarting it in %.0f s (restart %d)",
                    proc.returncode, delay, restarts)
        stop_event.wait(delay)
    return 0
