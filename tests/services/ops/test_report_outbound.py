"""The report's 'What leaves the host' section: top destinations by bytes out, outbound scan and
beacon findings explained (from the detectors' own findings, stored through the real schema)."""
from __future__ import annotations

import time

from app.config import Evaluator
from app.db import evaluations as dbe
from app.db.connection import connect
from app.services.evaluation import outbound_rules
from app.services.ops.reports import outbound
from app.services.ops.reports.page import write_report
from tests.services.evaluation.outbound_batches import T0, batch, flow

LAB = "198.18.20.2"
C2 = "198.18.20.10"


def findings():
    sweep = [flow(3, LAB, port, 45000, "udp") for port in list(range(1000, 1200)) + [1500]]
    scan_batch = batch(ports={1: (45000, "udp")}, occupancy=[(3, 1, 4242, "sweeper", 0, "root", "0.0.0.0")],
                       outbound_flows=sweep)
    [scan] = outbound_rules.outbound_scans(scan_batch, Evaluator())
    beacon_flows = [flow(int(30 * k // 60) + 1, C2, 443, 50000 + k, first_seen=T0 + 0.5 + 30 * k) for k in range(20)]
    [beacon] = outbound_rules.beacons(batch(outbound_flows=beacon_flows), Evaluator())
    return scan, beacon


def test_scan_and_beacon_are_explained_in_a_sentence():
    scan, beacon = findings()
    assert outbound.sentence(scan) == (
        f"outbound scan: this host scanned 201 ports of {LAB}, from sweeper (pid 4242), round 3; "
        "ports udp 1000-1099, ...; rule: >= 25 remote ports of one address opened within 300 s")
    assert outbound.sentence(beacon).startswith(
        f"beaconing: this host contacted {C2} (remote port 443) 20 times every 30 s (CV 0) over 10 rounds")


def test_the_report_shows_top_destinations_and_explained_findings(tmp_path):
    db = tmp_path / "ports.db"
    conn = connect(db)
    now = time.time()
    scan, beacon = findings()
    with conn:
        for i in range(1, 4):
            conn.execute("INSERT INTO rounds (id, start_time, end_time, interface, total_packets) VALUES (?, ?, ?, 'x', 5)",
                         (i, now - 200 + 60 * i, now - 140 + 60 * i))
        conn.executemany("INSERT INTO destination_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                         "VALUES (?, ?, ?, ?, ?, ?)", [(3, LAB, 201, 12_060, 0, 201), (2, C2, 3, 52_428_800, 1, 1),
                                                       (3, C2, 2, 1000, 1, 1)])
        eid = dbe.insert_evaluation(conn, started_at=now, finished_at=now, first_round_id=1, last_round_id=3,
                                    model_version=None, threshold=None, windows=0, anomalies=2, duration_s=0.1,
                                    status="warm-up")
        for f in (scan, beacon):
            dbe.insert_anomaly(conn, evaluation_id=eid, port_id=None, detector=f.detector, score=f.score,
                               threshold=f.threshold, reasons=f.to_json(), first_round_id=f.first_round_id,
                               last_round_id=f.last_round_id, source=f.source, created_at=now)
    conn.close()
    page = write_report(db, tmp_path / "report", since="all").read_text()
    section = page[page.index('<h2 id="outbound">'):]
    assert "What leaves the host" in section and "Top destinations by bytes out" in section
    # most bytes out first: the beacon's destination (52,429,800 bytes), then the scanned host
    assert section.index(f"<td>{C2}</td><td>52429800</td>") < section.index(f"<td>{LAB}</td><td>12060</td>")
    assert "this host scanned 201 ports of 198.18.20.2, from sweeper (pid 4242)" in section
    assert "ports udp 1000-1099, ..." in section
    assert f"this host contacted {C2} (remote port 443) 20 times every 30 s" in section
