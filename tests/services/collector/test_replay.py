"""Replay a labelled capture through the real programs (BPF_PROG_TEST_RUN), evaluate in capture time with
the closed loop, score against the labels; and the same capture live through a netns lab with tcpreplay
gives exactly the same counts per port, per source and per flow."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from app.cli import main
from app.services.collector import capture_file, replay, sniffer_file
from app.services.collector.collector import Collector, Observations
from tests.helpers import make_settings
from tests.services.collector.replay_captures import T0, labelled_capture

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("capture")
    plan = labelled_capture(d / "lab.pcap", d / "labels.csv")
    return d, plan


def _config(tmp_path, more: str = ""):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[general]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                   f'pin_root = "{tmp_path}/no-pins"\n[evaluator]\nexfiltration_min_bytes = 1000000\n'
                   # a 12-minute capture: the outbound detectors' baselines may warm up in 5 rounds, not 30
                   'exfiltration_warmup_rounds = 5\nbeacon_warmup_rounds = 5\n' + more)
    return cfg


class _Hook(BaseHTTPRequestHandler):
    """A webhook that counts what it is sent."""
    received: list = []

    def do_POST(self):
        self.received.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_replay_evaluate_every_and_score(labelled, tmp_path, capsys):
    d, plan = labelled
    db = tmp_path / "ports.db"
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    # the host's alert channels and metrics textfile are configured: a replay must use neither
    host_channels = (f'[alerts]\nwebhook_url = "http://127.0.0.1:{hook.server_address[1]}/"\n'
                     f'[metrics]\ntextfile_dir = "{tmp_path}/textfiles"\n')
    (tmp_path / "textfiles").mkdir()
    try:
        rc = main(["replay", str(d / "lab.pcap"), "--db", str(db), "--config", str(_config(tmp_path, host_channels)),
                   "--evaluate-every", "5m"])
    finally:
        hook.shutdown()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _Hook.received == [] and list((tmp_path / "textfiles").iterdir()) == []
    alerted = [json.loads(line) for line in (tmp_path / "ports.db.replay-alerts.jsonl").read_text().splitlines()]
    assert {a["kind"] for a in alerted} == {"anomaly", "block"}
    assert all(a["replayed"] and a["capture"] == "lab.pcap" and T0 < a["at"] <= T0 + 720 for a in alerted)
    written = sum(int(line.split(": ")[1].split()[0]) for line in out.splitlines()
                  if line.startswith("alerts (replayed, never sent): "))
    assert written == len(alerted)
    assert f"host {plan.host} (the capture's most-answered address)" in out
    assert "100 packets dropped by the replay's blocklist and SYN limit" in out          # the scanner's return, blocked
    c = sqlite3.connect(db)
    rounds = c.execute("SELECT replayed, capture, xdp_mode, start_time, end_time FROM rounds ORDER BY id").fetchall()
    assert len(rounds) == 12 and {r[:3] for r in rounds} == {(1, "lab.pcap", "test-run")}
    assert rounds[0][3] == pytest.approx(T0, abs=1) and rounds[-1][4] == pytest.approx(T0 + 720, abs=1)
    first, last = c.execute("SELECT min(first_seen), max(last_seen) FROM flows").fetchone()
    assert T0 <= first and last <= T0 + 720                                  # the programs ran on capture time
    held = set(c.execute("SELECT p.value, p.protocol, o.inferred, o.pid FROM rounds_ports o JOIN ports p "
                         "ON p.id = o.port_id").fetchall())
    assert held == {(443, "tcp", 1, None), (123, "udp", 1, None)}
    assert c.execute("SELECT sum(dropped_packets) FROM rounds").fetchone()[0] == 100
    assert c.execute("SELECT count(*) FROM packets WHERE qry_name LIKE '%.tunnel-example.org'").fetchone()[0] == 300
    # the evaluations' clock was the store's: blocks and findings dated in capture time
    created = [r[0] for r in c.execute("SELECT created_at FROM blacklist")]
    assert created and all(T0 < t <= T0 + 720 for t in created)
    ledger = c.execute("SELECT channel, count(*) FROM alerts_sent GROUP BY 1").fetchall()
    assert ledger == [("replay", len({a["key"] for a in alerted}))]

    rc = main(["score", "--db", str(db), "--labels", str(d / "labels.csv"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    by = {r["detector"]: r for r in result["detectors"]}
    for detector in ("port_scan", "syn_flood", "dns_tunnel", "exfiltration", "beaconing"):
        assert by[detector]["recall"] == 1.0, by[detector]
    # the tunnel's name server answered the host's queries on many ephemeral ports: answers to this host's
    # own datagrams are never scan evidence, so no port_scan names it (no false positive anywhere)
    assert by["port_scan"]["false_positives"] == 0 and by["port_scan"]["true_positives"] == 2
    assert sum(r["false_positives"] for r in result["detectors"] if r["detector"] != "all") == 0
    assert result["innocents_blocked"] == []
    assert sorted(result["attackers_blocked"]) == [f"{plan.attackers['syn_scan']}/32", f"{plan.attackers['udp_scan']}/32"]
    assert by["port_scan"]["ttd_max_seconds"] <= 300 and by["exfiltration"]["ttd_max_seconds"] <= 60
    assert by["all"]["recall"] == 1.0


@pytest.mark.slow
def test_evaluate_and_report_judge_a_replayed_store_in_capture_time(labelled, tmp_path, capsys):
    """Without the closed loop nothing is blocked during the replay; a later `evaluate` and `report` read the
    store's clock (its last round's end), not the wall clock."""
    d, plan = labelled
    db, cfg = tmp_path / "ports.db", str(_config(tmp_path))
    assert main(["replay", str(d / "lab.pcap"), "--db", str(db), "--config", cfg, "--round-seconds", "2m",
                 "--no-sniffer", "-q"]) == 0
    assert "6 rounds of capture time" in capsys.readouterr().out
    c = sqlite3.connect(db)
    assert c.execute("SELECT sum(dropped_packets) FROM rounds").fetchone()[0] == 0     # no loop: nothing blocked
    assert c.execute("SELECT count(*) FROM packets").fetchone()[0] == 0               # --no-sniffer
    assert main(["evaluate", "--db", str(db), "--config", cfg]) == 0
    end = c.execute("SELECT max(end_time) FROM rounds").fetchone()[0]
    assert {r[0] for r in c.execute("SELECT created_at FROM anomalies")} == {end}
    assert {r[0] for r in c.execute("SELECT created_at FROM blacklist")} == {end}
    assert main(["report", "--db", str(db), "--config", cfg, "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "No data yet" not in page and "port_scan" in page                         # "24h" back from the capture's end


def test_bad_capture_and_labels_are_one_sentence(tmp_path, capsys):
    (tmp_path / "x.pcap").write_text("not a capture")
    db = tmp_path / "ports.db"
    assert main(["replay", str(tmp_path / "x.pcap"), "--db", str(db), "--config", str(_config(tmp_path))]) == 2
    assert "neither a pcap nor a pcapng" in capsys.readouterr().err
    assert not db.exists()                                               # nothing stored
    assert main(["replay", str(tmp_path / "x.pcap"), "--db", str(db), "--host", "nope"]) == 2
    (tmp_path / "labels.csv").write_text("start,end,address,detector,label\n1,2,300.1.1.1,,attack\n")
    assert main(["score", "--db", str(db), "--labels", str(tmp_path / "labels.csv")]) == 2
    assert "line 2: '300.1.1.1' is not an address or CIDR" in capsys.readouterr().err


def _counts(db, addresses):
    """Per port, per source, per flow counts (inbound and outbound) of a store, for these addresses."""
    c = sqlite3.connect(db)
    q = {
        "ports": "SELECT p.value, p.protocol, sum(s.packets), sum(s.bytes), sum(s.syn) FROM port_stats s JOIN ports p "
                 "ON p.id = s.port_id GROUP BY 1, 2",
        "egress_ports": "SELECT p.value, p.protocol, sum(s.packets), sum(s.bytes) FROM egress_port_stats s JOIN ports p "
                        "ON p.id = s.port_id GROUP BY 1, 2",
        # distinct_ports is left out: an answer to this host's own datagram is not scan evidence, and whether a
        # frame is an answer depends on the order of the two directions, which two tcpreplay streams do not keep
        "sources": "SELECT address, sum(packets), sum(bytes), sum(syn) FROM source_stats GROUP BY 1",
        "destinations": "SELECT address, sum(packets), sum(bytes), sum(syn) FROM destination_stats GROUP BY 1",
        "flows": "SELECT src_address, src_port, dst_address, dst_port, protocol, direction, sum(packets), sum(bytes) "
                 "FROM flows GROUP BY 1, 2, 3, 4, 5, 6",
    }
    out = {k: {tuple(r) for r in c.execute(sql)} for k, sql in q.items()}
    for k in ("sources", "destinations"):
        out[k] = {r for r in out[k] if r[0] in addresses}
    out["flows"] = {r for r in out["flows"] if r[0] in addresses and r[2] in addresses}
    # the lab's own link chatter (IPv6 router solicitations...) is not in the capture
    for k in ("ports", "egress_ports"):
        out[k] = {r for r in out[k] if r[1] in ("tcp", "udp", "icmp")}
    return out


@pytest.mark.slow
def test_live_through_tcpreplay_and_replay_agree(lab, tmp_path):
    assert shutil.which("tcpreplay"), "tcpreplay is missing: make setup installs it"
    cap_path = tmp_path / "lab.pcap"
    plan = labelled_capture(cap_path, tmp_path / "labels.csv", subnet=lab.subnet, minutes=3)
    assert plan.host == lab.root_v4
    cap = capture_file.read(cap_path)
    outbound = replay.directions(capture_file.headers(cap), [plan.host])
    sniffer_file.write_pcap(tmp_path / "in.pcap", cap, [i for i in range(len(cap)) if not outbound[i]])
    sniffer_file.write_pcap(tmp_path / "out.pcap", cap, [i for i in range(len(cap)) if outbound[i]])

    (tmp_path / "live").mkdir()
    live = make_settings(tmp_path / "live", top_flows=100000)
    with Collector(live, lab.interface) as collector:
        start = time.time()
        # inbound frames arrive at the watched end from the peer; outbound ones leave through it
        to_host = lab.popen("tcpreplay", "-q", "--pps=4000", "-i", lab.peer_interface, str(tmp_path / "in.pcap"))
        subprocess.run(["tcpreplay", "-q", "--pps=4000", "-i", lab.interface, str(tmp_path / "out.pcap")],
                       check=True, capture_output=True, timeout=120)
        assert to_host.wait(timeout=120) == 0
        time.sleep(0.5)
        collector.close_round(start, Observations())

    (tmp_path / "replayed").mkdir()
    replayed = make_settings(tmp_path / "replayed", top_flows=100000)
    result = replay.replay(replayed, cap_path, [plan.host], round_seconds=3600, sniff=False)
    assert result.stats.inbound + result.stats.outbound == len(cap) == plan.packets

    addresses = {capture_file.address_text(a) for a in np.unique(capture_file.headers(cap).src)} | {plan.host}
    got_live, got_replay = _counts(live.general.db, addresses), _counts(replayed.general.db, addresses)
    for table in got_live:
        assert got_live[table] == got_replay[table], table
    assert len(got_replay["flows"]) > 20 and len(got_replay["sources"]) >= 5 and len(got_replay["ports"]) > 50


def test_replay_json_parses(labelled, tmp_path, capsys):
    """--json: the replay (capture, hosts, packets, each round) as one JSON object, nothing else on stdout."""
    d, plan = labelled
    rc = main(["replay", str(d / "lab.pcap"), "--db", str(tmp_path / "ports.db"), "--config", str(_config(tmp_path)),
               "--no-sniffer", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(out)
    assert data["replay"]["hosts"] == [plan.host] and len(data["replay"]["rounds"]) == 12
    assert data["evaluations"] == []
