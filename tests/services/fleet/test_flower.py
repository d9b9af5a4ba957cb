"""The fleet's settings and import closure, and the helpers of the real federations (certificates,
hosts' settings, a tshark capture of the loopback) that test_fleet_survives.py runs: a
coordinator with TLS and five hosts' SuperNodes, one poisoned, one new, the coordinator lost and back.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import config

HOSTS = ("h1", "h2", "h3", "new")
SMALL = "[evaluator]\nlstm_units = 8\nbottleneck = 4\nepochs = 1\nrefit_epochs = 1\nmin_train_steps = 20\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=portwatch test CA",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "server.key"),
        "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "1", "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.pem"))


def settings_for(tmp_path: Path, name: str, port: int):
    d = tmp_path / name
    d.mkdir()
    (d / "config.toml").write_text(SMALL)
    s = config.load(environ={"PORTWATCH_CONFIG": str(d / "config.toml")})
    s.general.db, s.general.state_dir = str(d / "ports.db"), str(d / "state")
    f = s.fleet
    f.ca_cert, f.server_cert, f.server_key = (str(tmp_path / n) for n in ("ca.crt", "server.pem", "server.key"))
    f.listen = f.superlink = f"127.0.0.1:{port}"
    f.min_hosts, f.rounds, f.round_timeout_seconds = len(HOSTS), 1, 300.0
    f.node_port = free_port()
    return s


def weights(path: str) -> list:
    import h5py
    out = []
    with h5py.File(Path(path) / "model.weights.h5", "r") as h5:
        h5.visititems(lambda name, obj: out.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return out


def start_capture(path: Path, ports: list[int]) -> subprocess.Popen | None:
    """tshark on lo for ``ports`` (bounded: 10 minutes at most), once it writes; None without tshark."""
    if not shutil.which("tshark"):
        return None
    flt = " or ".join(f"tcp port {p}" for p in ports)
    proc = subprocess.Popen(["tshark", "-i", "lo", "-f", flt, "-a", "duration:600", "-w", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None and not (path.exists() and path.stat().st_size):
        time.sleep(0.2)
    time.sleep(1.0)                                  # the file header is written before the capture starts
    if proc.poll() is not None:
        pytest.fail(f"tshark did not start: {proc.stderr.read().decode(errors='replace')}")
    return proc


def stop_capture(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tcp_payload_bytes(path: Path, port: int) -> int:
    out = subprocess.run(["tshark", "-r", str(path), "-Y", f"tcp.port == {port}", "-T", "fields", "-e", "tcp.len"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return sum(int(x) for x in out.split())


def test_fleet_settings_refused_with_one_sentence(tmp_path):
    s = settings_for(tmp_path, "x", 9092)
    s.fleet.ca_cert = str(tmp_path / "missing.crt")
    assert s.fleet.problems("node") == [f"fleet.ca_cert {tmp_path / 'missing.crt'} does not exist"]
    s.fleet.insecure, s.fleet.superlink = True, "nohostport"
    assert s.fleet.problems("node") == ["fleet.superlink 'nohostport' must be HOST:PORT"]
    s.fleet.superlink = ""
    assert "fleet.superlink is not set" in s.fleet.problems("node")[0]


@pytest.mark.parametrize("module", ["app.services.fleet.crowdsec", "app.commands.fleet"])
def test_collector_closure_and_fleet_status_stay_free_of_flower_and_tensorflow(module):
    code = ("import sys; import app.port_collector, app.services.collector.collector, app.threads.collection; "
            f"import {module}; from app.cli import build_parser; build_parser(); "
            "print([m for m in ('flwr', 'grpc', 'tensorflow', 'keras', 'bcc') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
