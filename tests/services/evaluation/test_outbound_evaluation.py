"""What leaves the host, through the real schema: the batch loader reads the egress tables, outbound
flows and the DNS sample exactly; an evaluation stores outbound findings (alerts, never blocks)."""
from __future__ import annotations

import sqlite3

import pytest

from app import config
from app.db import series as dbs
from app.db.connection import connect
from app.services.evaluation import evaluation
from app.services.evaluation.batch import assemble
from tests.services.evaluation.synthetic import SyntheticStore, upload

LAB = "198.18.20.2"


@pytest.fixture
def env(state_env, monkeypatch):
    monkeypatch.setenv("PORTWATCH_EVALUATOR_WARMUP_ROUNDS", "100000")   # rules only: no model fit
    monkeypatch.setenv("PORTWATCH_EVALUATOR_MIN_ACTIVE_SHARE", "1.0")
    return state_env


def test_the_batch_loads_egress_destinations_outbound_flows_and_dns(tmp_path):
    conn = connect(tmp_path / "ports.db")
    with conn:
        for i in range(1, 6):
            conn.execute("INSERT INTO rounds (id, start_time, end_time, counts_since, interface) VALUES (?, ?, ?, ?, 'x')",
                         (i, 60.0 * (i - 1), 60.0 * i, 60.0 * (i - 1)))
        conn.execute("INSERT INTO ports (id, value, protocol) VALUES (1, 45000, 'udp'), (2, -1, 'tcp'), (3, 53, 'udp')")
        conn.executemany("INSERT INTO egress_port_stats (round_id, port_id, packets, bytes) VALUES (?, ?, ?, ?)",
                         [(4, 1, 200, 12_000), (5, 2, 7, 700)])
        conn.executemany("INSERT INTO destination_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                         "VALUES (?, ?, ?, ?, ?, ?)", [(1, LAB, 1, 100, 0, 1), (2, LAB, 3, 300, 0, 1),
                                                       (4, LAB, 200, 12_000, 0, 200)])
        conn.executemany("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                         "bytes, first_seen, last_seen, reason, direction) VALUES (?, '198.18.20.1', ?, ?, ?, ?, 1, 60, "
                         "?, ?, 'many-ports', ?)",
                         [(4, 45000, LAB, 1000, "udp", 190.0, 190.0, "out"), (4, 53, LAB, 999, "udp", 191.0, 191.0, "in")])
        conn.executemany("INSERT INTO packets (timestamp, qry_name, src_address, dst_address, qry_type, rcode, resp_name, "
                         "round_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [(200.0, "a.t.tunnel.test", LAB, "198.18.20.1", 16, None, None, 4),
                          (200.1, "a.t.tunnel.test", "198.18.20.1", LAB, 16, 3, None, 4),
                          (10.0, "old.example", LAB, "198.18.20.1", 1, None, None, 1)])
    rounds = dbs.rounds_after(conn, 3, 10)
    batch = assemble(conn, rounds, since_time=100.0, beacon_since=0.0, baseline_since=0.0)
    assert batch.egress_port_stats == [(4, 1, 200, 12_000), (5, 2, 7, 700)]
    # the scan span: rounds ending at or after 100 s (2, 3) and the batch
    assert batch.destination_stats == [(2, LAB, 3, 300, 0, 1), (4, LAB, 200, 12_000, 0, 200)]
    assert [r["id"] for r in batch.beacon_rounds] == [1, 2, 3]
    assert batch.outbound_flows == [(4, LAB, 1000, "udp", 45000, 1, 60, 190.0, 190.0, 0)]   # the 'in' flow is not
    assert batch.baseline_rounds == 3 and batch.destination_baseline == {LAB: (2, 400, 300)}
    assert batch.host_out_bytes == [(1, 100), (2, 300)]
    assert batch.dns_queries == [(4, 200.0, LAB, "198.18.20.1", "a.t.tunnel.test", 16, None, 0),
                                 (4, 200.1, "198.18.20.1", LAB, "a.t.tunnel.test", 16, 3, 1)]
    assert batch.ports[1] == (45000, "udp") and batch.port_id(53, "udp") == 3
    conn.close()


def test_views_for_sqlite_users(tmp_path):
    conn = connect(tmp_path / "ports.db")
    import time
    now = time.time()
    with conn:
        conn.execute("INSERT INTO rounds (id, start_time, end_time, interface) VALUES (1, ?, ?, 'x')", (now - 60, now))
        conn.executemany("INSERT INTO destination_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                         "VALUES (1, ?, ?, ?, ?, ?)", [(LAB, 40_000, 52_428_800, 1, 1), ("198.18.20.3", 10, 900, 0, 1)])
        rows = [(now, f"{k}x.t.tunnel.test", LAB, "198.18.20.1", 16, None, None, 1) for k in range(3)]
        rows += [(now, f"{k}x.t.tunnel.test", "198.18.20.1", LAB, 16, 3, None, 1) for k in range(2)]
        rows += [(now, "www.example.org", "198.18.20.4", "198.18.20.1", 1, None, None, 1)]
        conn.executemany("INSERT INTO packets (timestamp, qry_name, src_address, dst_address, qry_type, rcode, resp_name, "
                         "round_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    top = conn.execute("SELECT address, packets, bytes_out, syn, rounds_active FROM v_top_destinations").fetchall()
    assert [tuple(r) for r in top] == [(LAB, 40_000, 52_428_800, 1, 1), ("198.18.20.3", 10, 900, 0, 1)]
    clients = conn.execute("SELECT client, queries, distinct_names, mean_name_length, txt_null_cname, responses, "
                           "nxdomain FROM v_dns_clients").fetchall()
    assert [tuple(r) for r in clients] == [(LAB, 3, 3, 16.0, 3, 2, 2), ("198.18.20.4", 1, 1, 15.0, 0, 0, 0)]
    conn.close()


def test_an_evaluation_stores_an_exfiltration_finding_that_blocks_nothing(env):
    store = SyntheticStore(str(env / "ports.db"), seed=5)
    try:
        settings = config.load()
        store.add_rounds(30)                                       # the usual rates
        evaluation.run(settings)
        store.add_rounds(10, {6: [upload(LAB, 50 * 1024 * 1024)]})
        result = evaluation.run(settings)
        [exfil] = [f for f in result.anomalies if f.detector == "exfiltration"]
        assert exfil.source == LAB and exfil.details["bytes"] == 50 * 1024 * 1024
        assert exfil.details["peak_round"]["round_id"] == 37 and exfil.details["usual_from"] == "host"
        assert [f.detector for f in result.anomalies if f.detector in ("outbound_scan", "beaconing", "dns_tunnel")] == []
        conn = sqlite3.connect(settings.general.db)
        stored = conn.execute("SELECT detector, source, json_extract(reasons, '$.destination') FROM anomalies "
                              "WHERE detector = 'exfiltration'").fetchall()
        assert stored == [("exfiltration", LAB, LAB)]
        assert conn.execute("SELECT COUNT(*) FROM blacklist").fetchone()[0] == 0
        conn.close()
    finally:
        store.close()
