"""outbound_scan, exfiltration and beaconing as pure functions of hand-made batches (exact numbers)."""
from __future__ import annotations

import statistics

from app.config import Evaluator
from app.services.evaluation import outbound_rules
from app.services.evaluation.findings import Finding
from tests.services.evaluation.outbound_batches import T0, batch, flow

LAB = "198.18.20.2"
CLIENT = "198.18.20.9"
PORTS = {1: (45000, "udp"), 2: (-1, "udp"), 3: (8080, "tcp"), 4: (-1, "tcp")}


def by(findings, detector):
    return [f for f in findings if f.detector == detector]


# --- outbound scan ---------------------------------------------------------------------------------

def test_udp_sweep_from_a_bound_socket_names_destination_ports_and_process():
    sweep = [flow(3, LAB, port, 45000, "udp") for port in range(1000, 1200)]
    occupancy = [(3, 1, 4242, "sweeper", 0, "root", "0.0.0.0")]
    b = batch(ports=dict(PORTS), occupancy=occupancy, outbound_flows=sweep,
              destination_stats=[(3, LAB, 200, 200 * 60, 0, 200)])
    [scan] = outbound_rules.outbound_scans(b, Evaluator())
    assert (scan.detector, scan.score, scan.threshold) == ("outbound_scan", 200.0, 25.0)
    assert (scan.first_round_id, scan.last_round_id) == (3, 3)
    assert scan.source == LAB and scan.addresses == [LAB]
    assert scan.details["kind"] == "ports" and scan.details["destination"] == LAB
    assert scan.details["remote_ports"]["udp"] == list(range(1000, 1100))     # listed up to 100
    assert scan.details["distinct_ports"] == 200
    assert scan.details["processes"] == [{"pid": 4242, "process": "sweeper", "port": 45000, "protocol": "udp"}]
    assert scan.details["local_ports"] == [45000]
    assert scan.covers == [(1, 3, 3)]
    assert scan.sources[0].bytes == 12000 and scan.sources[0].note == "destination"
    assert "sweeper (pid 4242)" in scan.summary and LAB in scan.summary
    # the stored form reads back exactly
    again = Finding.from_json(scan.to_json(), detector=scan.detector, port_id=None, port=None, protocol=None,
                              first_round_id=3, last_round_id=3, score=scan.score, threshold=scan.threshold)
    assert again.details == scan.details and again.sources == scan.sources


def test_24_ports_is_below_the_threshold_and_25_within_the_span_is_a_scan():
    below = [flow(2, LAB, port, 45000, "udp") for port in range(24)]
    assert outbound_rules.outbound_scans(batch(ports=dict(PORTS), outbound_flows=below), Evaluator()) == []
    # 10 + 10 + 5 ports in three consecutive minute rounds: united within the 300 s span
    spread = [flow(r, LAB, 100 * r + k, 45000, "udp") for r, n in ((2, 10), (3, 10), (4, 5)) for k in range(n)]
    [scan] = outbound_rules.outbound_scans(batch(ports=dict(PORTS), outbound_flows=spread), Evaluator())
    assert scan.details["distinct_ports"] == 25 and (scan.first_round_id, scan.last_round_id) == (4, 4)
    # a span of 60 s sees one round's ports at a time: no scan
    assert outbound_rules.outbound_scans(batch(ports=dict(PORTS), outbound_flows=spread),
                                         Evaluator(scan_span_seconds=60)) == []


def test_a_servers_replies_to_many_client_ports_are_not_a_scan():
    """This host serves tcp/8080: its replies go to 40 ephemeral ports of one client, without SYNs."""
    replies = [flow(5, CLIENT, 40000 + k, 8080, flags=0x12) for k in range(40)]
    occupancy = [(5, 3, 77, "webd", 40, "www", "0.0.0.0")]
    b = batch(ports=dict(PORTS), occupancy=occupancy, outbound_flows=replies,
              destination_stats=[(5, CLIENT, 400, 400_000, 0, 40)])
    assert outbound_rules.outbound_scans(b, Evaluator()) == []


def test_answers_to_someone_elses_scan_are_not_an_outbound_scan():
    """A SYN scan of 150 closed ports of this host: its RST|ACK answers leave from 150 local ports (none
    served) to the scanner's 150 source ports, but this host sent no SYN to it: nothing was opened."""
    answers = [flow(3, CLIENT, 2000 + k, 1000 + k, flags=0x14) for k in range(150)]
    b = batch(ports=dict(PORTS), outbound_flows=answers, destination_stats=[(3, CLIENT, 150, 8100, 0, 150)])
    assert outbound_rules.outbound_scans(b, Evaluator()) == []
    # the same flows in a round where this host did send SYNs to that address: a scan by this host
    b.destination_stats = [(3, CLIENT, 150, 8100, 150, 150)]
    [scan] = outbound_rules.outbound_scans(b, Evaluator())
    assert scan.source == CLIENT and scan.details["distinct_ports"] == 150


def test_tcp_syn_sweep_seen_by_the_counters_alone():
    """No outbound flow kept (a busy round): SYNs sent to 30 ports of one address in one round."""
    b = batch(ports=dict(PORTS), destination_stats=[(6, LAB, 30, 1800, 30, 30), (6, CLIENT, 500, 9000, 1, 30)])
    [scan] = outbound_rules.outbound_scans(b, Evaluator())
    assert scan.source == LAB and scan.score == 30.0 and scan.details["processes"] == []
    assert "a process the scanner did not see" in scan.summary


def test_sweep_of_many_addresses():
    hosts = [f"198.18.21.{i}" for i in range(1, 61)]
    b = batch(ports=dict(PORTS), destination_stats=[(4, h, 1, 60, 1, 1) for h in hosts])
    assert outbound_rules.outbound_scans(b, Evaluator()) == []                     # default: 100 addresses
    [sweep] = outbound_rules.outbound_scans(b, Evaluator(outbound_scan_addresses=50))
    assert sweep.details["kind"] == "addresses" and sweep.details["distinct_addresses"] == 60
    assert sweep.score == 60.0 and sweep.threshold == 50.0 and sweep.source is None
    assert sweep.source_count == 60 and len(sweep.sources) == 10
    assert outbound_rules.outbound_scans(b, Evaluator(outbound_scan_addresses=61)) == []


# --- exfiltration ----------------------------------------------------------------------------------

def test_upload_far_above_the_destinations_usual_rate():
    dest = "198.18.20.5"
    rows = [(r, dest, 40, 50_000, 0, 1) for r in range(1, 11) if r != 7] + [(7, dest, 36_000, 52_428_800, 1, 1)]
    b = batch(destination_stats=rows, baseline_rounds=100, destination_baseline={dest: (100, 5_000_000, 80_000)},
              host_out_bytes=[(r, 200_000) for r in range(-99, 1)])
    [exfil] = outbound_rules.exfiltrations(b, Evaluator())
    assert exfil.detector == "exfiltration" and exfil.source == dest
    assert exfil.details["usual_from"] == "destination" and exfil.details["usual_bytes_per_round"] == 50_000.0
    assert exfil.details["peak_round"] == {"round_id": 7, "bytes": 52_428_800}
    assert exfil.details["flagged_by"] == "round" and exfil.details["factor"] == 1048.6
    assert exfil.details["bytes"] == 9 * 50_000 + 52_428_800
    assert exfil.score == 52_428_800 / 50_000 and exfil.threshold == 10.0
    assert exfil.sources[0].bytes == 9 * 50_000 + 52_428_800


def test_new_destination_is_judged_against_the_hosts_usual_rate():
    new = "198.18.20.6"
    background = [(r, f"198.18.22.{r}", 10, 100_000, 1, 1) for r in range(1, 11)]
    b = batch(destination_stats=background + [(4, new, 20_000, 25_000_000, 1, 1)], baseline_rounds=50,
              host_out_bytes=[(r, 100_000) for r in range(-49, 1)])
    [exfil] = outbound_rules.exfiltrations(b, Evaluator())
    # median of 50 baseline rounds and 10 batch rounds at 100,000 (round 4: 25,100,000)
    assert exfil.source == new and exfil.details["usual_from"] == "host"
    assert exfil.details["usual_bytes_per_round"] == 100_000.0 and exfil.details["factor"] == 250.0
    # min_bytes above the upload: nothing
    assert outbound_rules.exfiltrations(b, Evaluator(exfiltration_min_bytes=25_000_001)) == []


def test_a_backup_server_that_always_gets_30_mb_a_round_is_usual():
    backup = "198.18.20.7"
    b = batch(destination_stats=[(r, backup, 25_000, 30_000_000, 0, 1) for r in range(1, 11)], baseline_rounds=100,
              destination_baseline={backup: (100, 3_000_000_000, 31_000_000)},
              host_out_bytes=[(r, 30_000_000) for r in range(-99, 1)])
    assert outbound_rules.exfiltrations(b, Evaluator()) == []


def test_slow_exfiltration_over_the_batch():
    """3 MB a round for 10 rounds to a new address (below 20 MB in any round, 30 MB in the batch)."""
    dest = "198.18.20.8"
    b = batch(destination_stats=[(r, dest, 2_000, 3_000_000, 0, 1) for r in range(1, 11)], baseline_rounds=100,
              host_out_bytes=[(r, 20_000) for r in range(-99, 1)])
    [exfil] = outbound_rules.exfiltrations(b, Evaluator())
    # host usual: median of 100 baseline rounds at 20,000 and 10 batch rounds at 3,000,000
    assert exfil.details["flagged_by"] == "batch" and exfil.details["usual_bytes_per_round"] == 20_000.0
    assert exfil.details["factor"] == 150.0 and (exfil.first_round_id, exfil.last_round_id) == (1, 10)


# --- beaconing -------------------------------------------------------------------------------------

def _connections(dst, times, port=443):
    """One outbound TCP flow per connection (a new local port each), in the round its start falls in."""
    return [flow(int((t - T0) // 60) + 1, dst, port, 50000 + k, first_seen=t, last_seen=t + 0.2)
            for k, t in enumerate(times)]


def test_connections_every_30_seconds_are_a_beacon():
    c2 = "198.18.20.10"
    times = [T0 + 0.5 + 30 * k + (0.3 if k % 2 else 0.0) for k in range(20)]
    flows = _connections(c2, times)
    flows.append(flows[3][:0] + (flows[3][0] + 1,) + flows[3][1:])        # the same flow again next round: one start
    [beacon] = outbound_rules.beacons(batch(outbound_flows=flows), Evaluator())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert beacon.detector == "beaconing" and beacon.source == c2
    assert beacon.details["connections"] == 20 and beacon.details["rounds_seen"] == 10
    assert beacon.details["interval_seconds"] == round(statistics.fmean(gaps), 3)
    assert beacon.details["interval_cv"] == round(statistics.pstdev(gaps) / statistics.fmean(gaps), 4)
    assert beacon.details["remote_ports"] == [443]
    assert (beacon.first_round_id, beacon.last_round_id) == (1, 10)


def test_irregular_browsing_and_ntp_are_not_beacons():
    human = [T0 + t for t in (1, 6, 53, 56, 176, 185, 218, 220, 300, 315, 375, 500)]
    ntp = [T0 + 1 + 64 * k for k in range(9)]
    flows = _connections("198.18.20.11", human) + _connections("198.18.20.12", ntp, port=123)
    assert outbound_rules.beacons(batch(outbound_flows=flows), Evaluator()) == []
    # NTP is a beacon by shape: only beacon_ignore_ports keeps it out
    [ntp_beacon] = outbound_rules.beacons(batch(outbound_flows=flows), Evaluator(beacon_ignore_ports=[]))
    assert ntp_beacon.source == "198.18.20.12" and ntp_beacon.details["interval_seconds"] == 64.0


def test_a_beacon_must_reach_into_the_batch_and_span_enough_rounds():
    times = [T0 + 1 + 10 * k for k in range(12)]                # 12 connections within 2 rounds
    assert outbound_rules.beacons(batch(outbound_flows=_connections("198.18.20.13", times)), Evaluator()) == []
    assert len(outbound_rules.beacons(batch(outbound_flows=_connections("198.18.20.13", times)),
                                      Evaluator(beacon_min_rounds=2))) == 1


def test_detect_runs_all_three_on_an_empty_batch():
    assert outbound_rules.detect(batch(), Evaluator()) == []
