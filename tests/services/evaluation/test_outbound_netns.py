"""What leaves the host, end to end in network namespaces.

dns_tunnel (runs now): dnsmasq is this host's resolver (root namespace, the lab's root address);
one client in the peer namespace asks it 200 long random TXT subdomains of one domain, another 200
ordinary lookups of varied names. The sniffer captures both on the lab's veth, the rows land in a
real SQLite file, and an evaluation finds exactly one dns_tunnel: the first client and its domain.

outbound_scan and exfiltration read the TC egress counters (egress_port_stats, destination_stats,
flows with direction 'out'): each runs collector rounds around real traffic from this host.
"""
from __future__ import annotations

import random
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import config
from app.services.evaluation import evaluation
from app.services.collector.sniffer import Sniffer
from tests.services.collector.test_sniffer import SLACK, finish, run_in_thread, stop_after_quiet, store, wait_until_receiving

REPO = Path(__file__).resolve().parents[3]
BASE32 = string.ascii_lowercase + "234567"
TUNNEL_DOMAIN = "exfil-tunnel.test"

ASK = r"""
import socket, struct, sys
source, server, qtype = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.stdin.read().split()
answered = 0
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind((source, 0))
    sock.settimeout(1.0)
    for i, name in enumerate(names):
        qid = 0x1000 + i
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        sock.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", qtype, 1),
                    (server, 53))
        try:
            while True:
                reply, _ = sock.recvfrom(4096)
                if reply[:2] == struct.pack(">H", qid):
                    answered += 1
                    break
        except socket.timeout:
            pass
print(answered)
"""


def tunnel_names(n: int) -> list[str]:
    rng = random.Random(12)
    return [f"{''.join(rng.choice(BASE32) for _ in range(40))}.{''.join(rng.choice(BASE32) for _ in range(20))}"
            f".{TUNNEL_DOMAIN}" for _ in range(n)]


def ordinary_names(n: int) -> list[str]:
    words = ["www", "mail", "api", "static", "login"]
    return [f"{words[k % 5]}.shop{k // 5}.example" for k in range(n)]


@pytest.fixture
def resolver(lab, tmp_path):
    """dnsmasq on this host (root namespace) at the lab's root address, answering every name."""
    proc = subprocess.Popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=53",
                             f"--listen-address={lab.root_v4}", "--bind-interfaces",
                             f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--address=/#/198.18.{lab.subnet}.77"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if ask(lab, lab.host_v4(3), ["ready.example"], 1) == 1:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dnsmasq did not start: {proc.stderr.read().decode(errors='replace')}")
        yield lab.root_v4
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def ask(lab, source: str, names: list[str], qtype: int) -> int:
    """Ask the resolver each name from ``source`` in the peer namespace; how many were answered."""
    proc = subprocess.run(["ip", "netns", "exec", lab.namespace, sys.executable, "-c", ASK, source, lab.root_v4,
                           str(qtype)], input="\n".join(names), capture_output=True, text=True, timeout=120, check=True)
    return int(proc.stdout.strip())


@pytest.mark.kernel
def test_dns_tunnel_from_a_namespace_client_names_client_and_domain(lab, resolver, state_env, tmp_path):
    tunnel_client, ordinary_client = lab.host_v4(1), lab.host_v4(2)
    (tmp_path / "tmp").mkdir()
    sniffer = Sniffer(lab.interface, window_seconds=90, temp_root=tmp_path / "tmp")
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab)
    assert ask(lab, tunnel_client, tunnel_names(200), 16) == 200          # TXT
    assert ask(lab, ordinary_client, ordinary_names(200), 1) == 200       # A
    stop_after_quiet(sniffer)
    result = finish(thread, outcome, sniffer.drain_seconds + SLACK)
    assert result.skipped == 0 and not result.limit_reached

    settings = config.load()
    conn, round_id = store(Path(settings.general.db), lab.interface, result.records)
    # the sniffer's DNS fields: the question's type, the response's code (NULL on queries)
    kinds = conn.execute("SELECT src_address, qry_type, rcode IS NULL, COUNT(*) FROM packets WHERE qry_name IS NOT NULL "
                         "AND src_address IN (?, ?, ?) GROUP BY 1, 2, 3 ORDER BY 1, 3",
                         (tunnel_client, ordinary_client, lab.root_v4)).fetchall()
    assert [tuple(k) for k in kinds] == [(lab.root_v4, 1, 0, 200), (lab.root_v4, 16, 0, 200),
                                         (tunnel_client, 16, 1, 200), (ordinary_client, 1, 1, 200)]
    rcodes = conn.execute("SELECT dst_address, rcode, COUNT(*) FROM packets WHERE rcode IS NOT NULL GROUP BY 1, 2").fetchall()
    # dnsmasq answers A questions (NOERROR) and refuses TXT ones without a local record (REFUSED, 5)
    assert [tuple(r) for r in rcodes] == [(tunnel_client, 5, 200), (ordinary_client, 0, 200)]
    clients = {r["client"]: r for r in conn.execute("SELECT * FROM v_dns_clients")}
    assert clients[tunnel_client]["queries"] == 200 and clients[tunnel_client]["txt_null_cname"] == 200
    assert clients[ordinary_client]["distinct_names"] == 200 and clients[ordinary_client]["txt_null_cname"] == 0
    conn.close()

    outcome = evaluation.run(settings)
    tunnels = [f for f in outcome.anomalies if f.detector == "dns_tunnel"]
    assert [(f.source, f.details["client"], f.details["domain"]) for f in tunnels] == [
        (tunnel_client, tunnel_client, TUNNEL_DOMAIN)]
    d = tunnels[0].details
    assert d["queries"] == 200 and d["subdomains"] == 200 and d["resolvers"] == [lab.root_v4]
    assert d["record_types"] == {"TXT": 200} and d["responses"] == 200
    assert set(d["signals"]) == {"name_length", "label_entropy", "record_types"}
    assert tunnels[0].first_round_id == round_id




def collect_round_around(lab, settings, traffic, seconds: float = 8.0) -> None:
    """One collector round (scanner on) on the lab's interface while ``traffic()`` runs from 1 s in
    (the egress program attached beside XDP fills the egress tables)."""
    import threading
    from app.threads.collection import run_collection

    def when_attached():
        # the first round starts after the BCC compile (seconds, more under load): traffic sent before the
        # TC egress program is attached is counted by nobody
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "bpf" not in subprocess.run(
                ["tc", "filter", "show", "dev", lab.interface, "egress"], capture_output=True, text=True).stdout:
            time.sleep(0.2)
        time.sleep(0.5)
        traffic()

    worker = threading.Timer(1.0, when_attached)
    worker.start()
    try:
        run_collection(settings, lab.interface, seconds, 1)
    finally:
        worker.cancel()
        worker.join(120)


def lab_settings(tmp_path):
    from tests.helpers import make_settings
    settings = make_settings(tmp_path)
    settings.scanner.enabled = True
    settings.blocklist.enabled = False
    return settings


@pytest.mark.kernel
def test_outbound_sweep_of_200_ports_names_destination_and_local_process(lab, tmp_path):
    settings = lab_settings(tmp_path)
    target = lab.peer_v4
    sweeper = ("import socket, time, sys\n"
               "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))\n"
               "time.sleep(3)\n"          # the scanner sees the bound socket (and its process) first
               "for p in range(1000, 1200): s.sendto(b'x', (sys.argv[2], p))\n"
               "time.sleep(6)\n")

    def traffic():
        subprocess.run([sys.executable, "-c", sweeper, lab.root_v4, target], timeout=30, check=True)

    collect_round_around(lab, settings, traffic)
    outcome = evaluation.run(settings)
    assert outcome.rounds == 1
    [scan] = [f for f in outcome.anomalies if f.detector == "outbound_scan"]
    assert scan.source == target and scan.details["distinct_ports"] == 200
    assert any(p["process"].startswith("python") for p in scan.details["processes"])


@pytest.mark.kernel
def test_an_upload_to_a_new_address_waits_for_the_baseline_then_is_one_exfiltration(lab, tmp_path):
    """30 MB to a never-seen address in the first evaluation: no finding, "warming up" said; after
    the warm-up (3 rounds here) the same upload is one exfiltration against the host's usual rate."""
    settings = lab_settings(tmp_path)
    settings.evaluator.exfiltration_warmup_rounds = 3
    usual, new = lab.peer_v4, lab.host_v4(1)
    sink = lab.popen(sys.executable, "-c", "import socket, threading\n"
                     "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                     "s.bind(('0.0.0.0', 9100)); s.listen(8)\n"
                     "def drain(c):\n while c.recv(1 << 16): pass\n c.close()\n"
                     "while True:\n c, _ = s.accept(); threading.Thread(target=drain, args=(c,)).start()\n")
    try:
        time.sleep(0.5)

        def send(nbytes: int, host: str = usual) -> None:
            with socket.create_connection((host, 9100), timeout=10) as c:
                c.sendall(b"\0" * nbytes)

        def background():
            for _ in range(20):
                send(20_000)

        def upload():
            background()
            send(30 * 1024 * 1024, new)

        collect_round_around(lab, settings, lambda: None, seconds=1.0)   # compile and attach first
        collect_round_around(lab, settings, upload)
        first = evaluation.run(settings)
        assert [f for f in first.anomalies if f.detector == "exfiltration"] == []
        assert "exfiltration: warming up, 0 of 3 rounds" in first.summary()
        collect_round_around(lab, settings, background)           # the usual rate: small transfers
        collect_round_around(lab, settings, background)
        second = evaluation.run(settings)
        assert "exfiltration: warming up, 2 of 3 rounds" in second.summary()
        collect_round_around(lab, settings, upload)
        third = evaluation.run(settings)
        assert "exfiltration: warming up" not in third.summary()
        [exfil] = [f for f in third.anomalies if f.detector == "exfiltration"]
        assert exfil.source == new and exfil.details["bytes"] >= 30 * 1024 * 1024
    finally:
        sink.kill()
        sink.wait(5)
