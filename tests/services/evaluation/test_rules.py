"""Rule detectors on hand-written rounds in a real SQLite file (the real schema)."""
from __future__ import annotations

import pytest

from app.config import Evaluator
from app.db import series as dbs
from app.services.evaluation import finding_sources, flood_rules, rules
from app.services.evaluation.batch import load_batch
from tests.services.evaluation.synthetic import SyntheticStore, listen, port_scan, syn_flood

SCANNER = "203.0.113.9"


@pytest.fixture
def store(tmp_path):
    s = SyntheticStore(str(tmp_path / "ports.db"), seed=1)
    yield s
    s.close()


def detect(store, after=0, **cfg):
    cfg = Evaluator(**cfg)
    rounds = dbs.rounds_after(store.conn, after, 10_000)
    return rules.detect(load_batch(store.conn, rounds, cfg), cfg)


def by(findings, detector):
    return [f for f in findings if f.detector == detector]


def traffic(value, proto, packets, address, syn=0):
    def event(st, rows):
        st.add_port_traffic(rows, value, proto, packets, packets * 100, syn=syn)
        st.add_source_traffic(rows, address, value, proto, packets, syn=syn)
    return event


def test_benign_rounds_raise_nothing(store):
    store.add_rounds(8)
    assert detect(store) == []


def test_port_scan_in_one_round_names_the_source_and_ports(store):
    store.add_rounds(6, {3: [port_scan(SCANNER, range(1000, 1030))]})
    scans = by(detect(store), "port_scan")
    assert len(scans) == 1
    scan = scans[0]
    assert scan.source == SCANNER and scan.addresses == [SCANNER]
    assert scan.first_round_id == scan.last_round_id == 4
    assert scan.score >= 30 and scan.threshold == 25
    assert scan.details["ports"]["tcp"] == list(range(1000, 1030))
    assert scan.details["max_ports_in_one_round"] >= 30
    covered = {pid for pid, lo, hi in scan.covers}
    assert len(covered) >= 30                                  # scanned ports stay out of the refit


def test_slow_scan_is_united_across_rounds_within_the_span(store):
    # 9 ports a round (below the collector's many-ports threshold: evidence from flows), 4 rounds
    events = {k: [port_scan(SCANNER, range(2000 + 9 * k, 2009 + 9 * k))] for k in range(4)}
    events[1].append(port_scan("203.0.113.10", range(3000, 3005)))   # a small client: no scan
    store.add_rounds(5, events)
    scans = by(detect(store), "port_scan")
    assert [s.source for s in scans] == [SCANNER]
    assert scans[0].details["distinct_ports"] == 36
    assert scans[0].first_round_id == 3                         # 27 ports reached by the 3rd round
    # the same pace spread over more than the span is not a scan
    assert by(detect(store, scan_span_seconds=100.0), "port_scan") == []


def test_syn_flood_with_few_completions(store):
    busy_but_answered = traffic(8443, "tcp", 5000, "198.51.100.77", syn=500)
    store.listeners[(8443, "tcp")] = "envoy"
    store.add_rounds(6, {2: [syn_flood(22, 3000, ["203.0.113.7"]), busy_but_answered],
                         3: [syn_flood(22, 2500, ["203.0.113.7"])]})
    floods = by(detect(store), "syn_flood")
    assert len(floods) == 1
    flood = floods[0]
    assert (flood.port, flood.protocol) == (22, "tcp")
    assert (flood.first_round_id, flood.last_round_id) == (3, 4)
    assert flood.source == "203.0.113.7"
    assert flood.details["peak"]["completion_share"] < 0.2
    assert flood.details["syn"] >= 5500


def test_completion_share():
    assert flood_rules.completion_share(packets=1000, syn=1000, synack=0, rst=0) == 0.0
    assert flood_rules.completion_share(packets=5000, syn=500, synack=0, rst=0) == 1.0
    assert flood_rules.completion_share(packets=1100, syn=1000, synack=0, rst=50) == pytest.approx(0.05)


def test_new_listener_and_process_change(store):
    store.add_rounds(8, {4: [listen(8080, "tcp", "nc")], 6: [listen(22, "tcp", "evil-sshd")]})
    found = detect(store)
    new = by(found, "new_listener")
    assert [(f.port, f.protocol, f.first_round_id) for f in new] == [(8080, "tcp", 5)]
    assert new[0].details["holders"][0]["process"] == "nc"
    changed = by(found, "process_changed")
    assert [(f.port, f.first_round_id) for f in changed] == [(22, 7)]
    assert changed[0].details["previous"]["holders"][0]["process"] == "sshd"
    assert changed[0].details["holders"][0]["process"] == "evil-sshd"
    # a later batch compares with the rounds before it: nothing new any more
    store.add_rounds(3)
    assert by(detect(store, after=8), "new_listener") == [] and by(detect(store, after=8), "process_changed") == []


def test_pid_change_with_the_same_process_is_a_restart(store):
    store.add_rounds(3)
    with store.conn:
        store.conn.execute("UPDATE rounds_ports SET pid = 4242 WHERE round_id = 3")
    assert detect(store) == []


def test_traffic_to_a_port_nothing_listens_on(store):
    store.add_rounds(5, {
        2: [traffic(4444, "tcp", 50, "203.0.113.66", syn=3)],
        3: [traffic(-1, "udp", 500, "198.51.100.5"),           # the ephemeral bucket: never
            traffic(8, "icmp", 20, "198.51.100.6"),             # ICMP echo: never
            port_scan(SCANNER, range(5000, 5030))],             # left to the scan finding
    })
    found = detect(store)
    unlistened = by(found, "unlistened_port")
    assert [(f.port, f.protocol) for f in unlistened] == [(4444, "tcp")]
    f = unlistened[0]
    assert f.source == "203.0.113.66" and f.details["packets"] == 50
    assert f.sources[0].address == "203.0.113.66"
    assert len(by(found, "port_scan")) == 1


# --- pure: a hand-made batch, no SQLite ------------------------------------------------------------

def hand_batch(**rows):
    """Three 60 s rounds (ids 1..3); ports 1 = tcp/22, 2 = tcp/4444, 3 = tcp/ephemeral."""
    from app.services.evaluation.batch import Batch
    rounds = [{"id": i, "start_time": 60.0 * i, "end_time": 60.0 * (i + 1), "seconds": 60.0,
               "scanner_status": "ok"} for i in (1, 2, 3)]
    return Batch(rounds, ports={1: (22, "tcp"), 2: (4444, "tcp"), 3: (-1, "tcp")}, nominal_seconds=60.0, **rows)


def test_rules_are_pure_functions_of_the_batch():
    from app.services.evaluation.findings import ONE_WAY
    held = [(r, 1, 100, "sshd", 1, "root", "0.0.0.0") for r in (1, 2, 3)]
    batch = hand_batch(
        port_stats=[(2, 1, 3000, 180_000, 0, 0, 2990, 0, 0),          # a SYN flood on tcp/22 in round 2
                    (3, 2, 40, 2400, 0, 0, 40, 0, 0)],               # 40 packets to unheld tcp/4444 in round 3
        source_stats=[(2, "203.0.113.7", 2990, 179_400, 2990, 1),
                      (3, SCANNER, 60, 3600, 60, 30)],               # 30 distinct ports in one round
        source_ports=[(2, "203.0.113.7", 22, "tcp", 2990, 0),
                      (3, "198.51.100.4", 4444, "tcp", 30, 1800), (3, "198.51.100.3", 4444, "tcp", 10, 600)],
        occupancy=held, first_occupancy_round=1)
    found = rules.detect(batch, Evaluator(scan_ports=25, syn_flood_syns=1000, unlistened_min_packets=10))
    assert sorted(f.detector for f in found) == ["port_scan", "syn_flood", "unlistened_port"]
    [scan] = by(found, "port_scan")
    assert (scan.source, scan.first_round_id, scan.details["max_ports_in_one_round"]) == (SCANNER, 3, 30)
    assert scan.sources[0].packets == 60 and scan.sources[0].syn == 60
    [flood] = by(found, "syn_flood")
    assert (flood.port, flood.source, flood.covers) == (22, "203.0.113.7", [(1, 2, 2)])
    assert flood.sources[0].share == round(2990 / 3000, 3)
    [unheld] = by(found, "unlistened_port")
    assert [(s.address, s.packets, s.share) for s in unheld.sources] == [("198.51.100.4", 30, 0.75),
                                                                         ("198.51.100.3", 10, 0.25)]
    assert unheld.source == "198.51.100.4" and unheld.details["packets"] == 40
    # every source carries its evidence class (ingress counters: one-way), through the stored form too
    assert {s.evidence for f in found for s in f.sources} == {ONE_WAY}
    for f in found:
        again = type(f).from_json(f.to_json(), detector=f.detector, port_id=f.port_id, port=f.port,
                                  protocol=f.protocol, first_round_id=f.first_round_id,
                                  last_round_id=f.last_round_id, score=f.score, threshold=f.threshold)
        assert again == f


def test_top_sources_take_the_larger_evidence_per_round_not_the_sum():
    batch = hand_batch(source_ports=[(1, "198.18.0.70", 22, "tcp", 70, 700), (2, "198.18.0.70", 22, "tcp", 70, 0),
                                     (1, "198.18.0.71", 22, "tcp", 20, 200), (1, "198.18.0.71", 9090, "tcp", 500, 1)])
    assert finding_sources.top_sources(batch, 22, "tcp", 1, 3) == [("198.18.0.70", 140, 700), ("198.18.0.71", 20, 200)]
    assert finding_sources.top_sources(batch, 22, "tcp", 2, 3) == [("198.18.0.70", 70, 0)]
    named, dominant = finding_sources.port_sources(batch, 22, "tcp", 200, 1, 3)
    assert dominant == "198.18.0.70" and [s.share for s in named] == [0.7, 0.1]
    assert finding_sources.port_sources(batch, -1, "tcp", 200, 1, 3) == ([], None)       # the ephemeral bucket: none
    batch.port_stats = [(1, 1, 120, 1, 0, 0, 5, 0, 0), (2, 1, 80, 1, 0, 0, 1, 0, 0), (2, 2, 9, 1, 0, 0, 0, 0, 0)]
    assert finding_sources.port_totals(batch, 1, 1, 3) == (200, 2, 6) and finding_sources.port_totals(batch, 1, 2, 2) == (80, 1, 1)


# --- a scan that lasts is one finding --------------------------------------------------------------

def evaluate_rules(store, cfg=None):
    """The rules step of an evaluation and its store step (app/services/evaluation/evaluation.py): new findings
    inserted with their summaries, grown ones updated in place. Returns the findings."""
    import time
    from app.db import evaluations as dbe
    from app.services.evaluation.explain import fill_summaries
    cfg = cfg or Evaluator()
    after = dbe.last_evaluated_round(store.conn)
    rounds = dbs.rounds_after(store.conn, after, 10_000)
    found = rules.detect(load_batch(store.conn, rounds, cfg), cfg)
    now = time.time()
    with store.conn:
        eid = dbe.insert_evaluation(store.conn, started_at=now, finished_at=now, first_round_id=rounds[0]["id"],
                                    last_round_id=rounds[-1]["id"], model_version=None, threshold=None, windows=0,
                                    anomalies=len(found), duration_s=0.0, status="ok")
        fill_summaries(store.conn, found)
        for f in found:
            if f.id is not None:
                dbe.update_anomaly(store.conn, f.id, score=f.score, reasons=f.to_json(),
                                   first_round_id=f.first_round_id, last_round_id=f.last_round_id, updated_at=now)
            else:
                f.evaluation_id = eid
                f.id = dbe.insert_anomaly(store.conn, evaluation_id=eid, port_id=f.port_id, detector=f.detector,
                                          score=f.score, threshold=f.threshold, reasons=f.to_json(),
                                          first_round_id=f.first_round_id, last_round_id=f.last_round_id,
                                          source=f.source, created_at=now)
    return found


def test_a_scan_that_goes_on_grows_one_finding_and_a_later_flood_is_its_own(store):
    store.add_rounds(4, {2: [port_scan(SCANNER, range(1000, 1030))]})             # round 3
    [first] = by(evaluate_rules(store), "port_scan")
    assert (first.first_round_id, first.last_round_id) == (3, 3) and first.summary.startswith("port scan from")
    store.add_rounds(2, {0: [port_scan(SCANNER, range(1030, 1060))]})             # round 5: it goes on
    [grown] = by(evaluate_rules(store), "port_scan")
    assert grown.id == first.id and grown.evaluation_id == first.evaluation_id
    assert (grown.first_round_id, grown.last_round_id) == (3, 5)
    assert grown.details["port_ranges"] == {"tcp": [[1000, 1059]]} and grown.details["flagged_rounds"] == 2
    assert grown.details["evaluations"] == 2 and grown.sources[0].packets == 60
    assert "tcp 1000-1059 (60)" in grown.summary
    # the stored row grew in place: one port_scan row, its rounds and reasons widened
    rows = store.conn.execute("SELECT id, first_round_id, last_round_id, updated_at, "
                              "json_extract(reasons, '$.summary') FROM anomalies WHERE detector = 'port_scan'").fetchall()
    assert [tuple(r)[:3] for r in rows] == [(first.id, 3, 5)] and rows[0][3] is not None and rows[0][4] == grown.summary
    # within the scan span, 49,100 packets from the scanner to one unlistened UDP port: not the old scan again
    store.add_rounds(1, {0: [traffic(9999, "udp", 49_100, SCANNER)]})              # round 7
    found = evaluate_rules(store)
    assert by(found, "port_scan") == []
    [flood] = by(found, "unlistened_port")
    assert (flood.port, flood.protocol, flood.source, flood.details["packets"]) == (9999, "udp", SCANNER, 49_100)
    assert store.conn.execute("SELECT last_round_id FROM anomalies WHERE id = ?", (first.id,)).fetchone()[0] == 5


def test_a_flood_in_the_scan_round_is_not_left_to_the_scan(store):
    store.add_rounds(3, {1: [port_scan(SCANNER, range(1000, 1030)), port_scan(SCANNER, [1005], proto="udp"),
                             traffic(1005, "udp", 500, SCANNER)]})
    found = detect(store)
    [scan] = by(found, "port_scan")
    assert (1005, "udp") in {(p, proto) for proto, ports in scan.details["ports"].items() for p in ports}
    # the scan's probes to the other ports stay with the scan; 501 packets to udp/1005 are more than probes
    assert [(f.port, f.protocol, f.details["packets"]) for f in by(found, "unlistened_port")] == [(1005, "udp", 501)]


def test_a_stream_to_one_port_after_a_scan_in_the_same_batch_is_not_the_scan(store):
    store.add_rounds(5, {1: [port_scan(SCANNER, range(1000, 1030))],              # round 2: the scan
                         2: [traffic(9999, "udp", 49_100, SCANNER)]})             # round 3: a stream, within the span
    found = detect(store)
    [scan] = by(found, "port_scan")
    assert (scan.first_round_id, scan.last_round_id, scan.details["flagged_rounds"]) == (2, 2, 1)
    assert scan.details["port_ranges"] == {"tcp": [[1000, 1029]]}
    assert [(f.port, f.first_round_id, f.details["packets"]) for f in by(found, "unlistened_port")] == [(9999, 3, 49_100)]
