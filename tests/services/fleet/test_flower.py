"""The federated model through Flower's deployment engine, for real: a coordinator (`fleet serve`'s
SuperLink with TLS from certificates generated here) and three hosts' SuperNodes on the loopback, each
host with its own state dir, config and database of synthetic rounds. After one federation round each
host holds a model version with origin 'fleet': identical network weights, its own threshold; a host
with 20 rounds of history (a local model would warm up for 360) flags a traffic spike at once.
With tshark installed the round is captured on the loopback (the SuperLink's port and the nodes'): the
weights cross it (bytes counted) but none of the hosts' source addresses or process names do.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import config
from app.db.connection import connect
from app.services.fleet import flower
from tests.services.evaluation.synthetic import SyntheticStore, volume_spike

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


def test_one_round_gives_every_host_the_same_fleet_network_and_its_own_threshold(tmp_path):
    """Hosts h1-h3 have 60 rounds each; 'new' has 20 (it could not even fit a local model)."""
    make_certs(tmp_path)
    port = free_port()
    coordinator = settings_for(tmp_path, "coordinator", port)
    hosts = [settings_for(tmp_path, name, port) for name in HOSTS]
    for i, s in enumerate(hosts):
        store = SyntheticStore(s.general.db, seed=i, ports={(22, "tcp"): (20 + 30 * i, "sshd"),
                                                            (443, "tcp"): (900 * (i + 1), "nginx")})
        store.add_rounds(20 if i == 3 else 60)
        store.close()
    nodes = []
    pcap = tmp_path / "lo.pcapng"
    capture = start_capture(pcap, [port] + [s.fleet.node_port for s in hosts])
    try:
        for name, s in zip(HOSTS, hosts):           # the nodes wait for the SuperLink (they retry)
            nodes.append(flower.start(flower.supernode_command(s), tmp_path / name / "supernode.log",
                                      flower.node_home(s)))
        record = flower.serve(coordinator, once=True)
    finally:
        for proc in nodes:
            flower.stop(proc)
        stop_capture(capture)
    assert (record["federations"], record["rounds"], record["hosts"]) == (1, 1, len(HOSTS))
    # the coordinator's view: each host's false-alert rate against its budget, counts only (no names)
    assert len(record["per_host"]) == len(HOSTS)
    assert all(h["budget_per_day"] == 1.0 and h["held_out_windows"] > 0 for h in record["per_host"])
    assert set(record["per_host"][0]) == {"held_out_windows", "held_out_rate_per_day", "budget_per_day"}
    rows = []
    for s in hosts:
        conn = connect(s.general.db)
        [row] = conn.execute("SELECT version, origin, status, threshold, path FROM models").fetchall()
        conn.close()
        assert (row["origin"], row["status"]) == ("fleet", "active")
        rows.append(row)
    first = weights(rows[0]["path"])
    assert len(first) == 12                          # conv, encoder, bottleneck, decoder, output: the whole network
    for row in rows[1:]:
        other = weights(row["path"])
        assert [n for n, _ in other] == [n for n, _ in first]
        assert all((a == b).all() for (_, a), (_, b) in zip(first, other))      # identical fleet weights
    assert len({round(r["threshold"], 9) for r in rows}) == len(HOSTS)          # each calibrated locally
    if capture is not None:
        # the loopback: the weights crossed it (each host: the fleet network in, its own out, then the
        # aggregate in), yet no source address or process name of any host's store did
        weight_bytes = sum(a.nbytes for _, a in first)
        assert tcp_payload_bytes(pcap, port) > 3 * len(HOSTS) * weight_bytes
        wire = pcap.read_bytes()
        secrets = set()
        for s in hosts:
            conn = connect(s.general.db)
            secrets |= {r[0] for r in conn.execute("SELECT DISTINCT address FROM source_stats")}
            conn.close()
        assert len(secrets) >= 3
        secrets |= {"sshd", "nginx"}
        assert not sorted(x for x in secrets if x.encode() in wire), "a host's address or process name on the wire"
    out = subprocess.run([sys.executable, "-m", "app", "fleet", "status", "--json", "--db", hosts[0].general.db],
                         capture_output=True, text=True, timeout=60,
                         env={"PORTWATCH_CONFIG": str(tmp_path / "h1" / "config.toml"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state["fleet_model"]["version"] == rows[0]["version"] and state["active_model"]["origin"] == "fleet"
    # the new host: 20 rounds, then 15 more with a spike on tcp/443 in the last; far inside the local
    # warm-up (360 rounds), the fleet model judges its first evaluation and flags the spike
    from app.services.evaluation import evaluation
    new = hosts[-1]
    assert new.evaluator.warmup_rounds > 35
    # issue 9 holds a model's alerts until its held-out pool can support the budget (a 35-round host's
    # cannot): this acceptance check of the fleet switches that gate off (evaluator.calibration_min_expected)
    new.evaluator.calibration_min_expected = 0
    store = SyntheticStore(new.general.db, seed=3, ports={(22, "tcp"): (110, "sshd"), (443, "tcp"): (3600, "nginx")})
    store.add_rounds(15, events={14: [volume_spike(443, "tcp", 60000, "198.51.100.250")]})
    store.close()
    result = evaluation.run(new)
    assert (result.status, result.model_version) == ("ok", rows[-1]["version"]) and result.windows > 0
    flagged = [(a.port, a.last_round_id) for a in result.anomalies if a.detector == "model"]
    assert flagged == [(443, result.last_round_id)]           # the spike, and nothing else


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
