"""A real CrowdSec Local API for tests: Debian's `crowdsec -no-cs` (the LAPI alone) on 127.0.0.1 and a
free port, with a temporary config directory and database (a copy of /etc/crowdsec/config.yaml,
edited: no Central API, no agent, no prometheus, logs and data in the temporary directory).
Machines and bouncers are registered with `cscli -c <tmp config>`. :meth:`LocalApi.stop` ends the
process group, so no crowdsec process survives a test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SYSTEM_CONFIG = Path("/etc/crowdsec/config.yaml")
ADMIN = "pw-cscli"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> str | None:
    if not shutil.which("crowdsec") or not shutil.which("cscli"):
        return "needs Debian's crowdsec package (scripts/setup.sh installs it)"
    if not SYSTEM_CONFIG.exists():
        return f"needs {SYSTEM_CONFIG} (the crowdsec package's config)"
    return None


class LocalApi:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.config = self.dir / "config.yaml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        import yaml
        c = yaml.safe_load(SYSTEM_CONFIG.read_text())
        d = str(self.dir)
        c["common"].update(daemonize=False, log_media="file", log_dir=d, working_dir=d, log_level="info")
        c["config_paths"]["data_dir"] = f"{d}/data"
        c["db_config"].update(db_path=f"{d}/data/crowdsec.db", use_wal=True)
        c["api"]["client"]["credentials_path"] = f"{d}/local_api_credentials.yaml"
        server = c["api"]["server"]
        server["listen_uri"] = f"127.0.0.1:{self.port}"
        server.pop("online_client", None)            # no Central API: nothing leaves this machine
        server["console_path"] = f"{d}/console.yaml"
        c["prometheus"]["enabled"] = False
        c["crowdsec_service"]["acquisition_path"] = f"{d}/acquis.yaml"
        c["crowdsec_service"].pop("acquisition_dir", None)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "acquis.yaml").write_text("")
        self.config.write_text(yaml.safe_dump(c))

    def cscli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["cscli", "-c", str(self.config), "--error", *args], capture_output=True, text=True,
                              timeout=60, check=check)

    def start(self) -> "LocalApi":
        self.write_config()
        self.cscli("machines", "add", ADMIN, "--auto", "-f", str(self.dir / "local_api_credentials.yaml"))
        log = open(self.dir / "lapi.out", "w")
        self.proc = subprocess.Popen(["crowdsec", "-c", str(self.config), "-no-cs"], stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crowdsec -no-cs exited: {(self.dir / 'lapi.out').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/decisions/stream", timeout=1)
            except urllib.error.HTTPError:
                return self                               # 403 without a key: it is up
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("crowdsec -no-cs did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None

    # --- registration and inspection -----------------------------------------------------------------
    def bouncer(self, name: str) -> str:
        return self.cscli("bouncers", "add", name, "-o", "raw").stdout.strip()

    def machine(self, name: str, password: str) -> None:
        self.cscli("machines", "add", name, "--password", password, "-f", os.devnull)

    def decisions(self) -> list[dict]:
        """Every running decision, as `cscli decisions list -o json` shows it (flattened, with the alert's message)."""
        alerts = json.loads(self.cscli("decisions", "list", "-o", "json").stdout or "null") or []
        return [{**d, "message": a.get("message"), "machine_id": a.get("machine_id")}
                for a in alerts for d in a.get("decisions") or []]

    def add(self, value: str, duration: str = "1h") -> None:
        self.cscli("decisions", "add", "--range" if "/" in value else "--ip", value, "--duration", duration,
                   "--reason", "pytest")

    def delete(self, value: str) -> None:
        self.cscli("decisions", "delete", "--range" if "/" in value else "--ip", value)
