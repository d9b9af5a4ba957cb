"""Forged sources without a kernel: evidence classes, the peers table, sources judged possibly forged,
per-finding caps, forged SYN floods counted per port, source floods, model corroboration
(tmp SQLite through the real schema; the netns proof is tests/services/evaluation/test_forged_netns.py)."""
from __future__ import annotations

import json

import pytest

from app.config import Evaluator
from app.db import peers
from app.db import series as dbs
from app.db.connection import connect
from app.services.blocklist import decisions
from app.services.evaluation import finding_sources, rules
from app.services.evaluation.batch import Batch, load_batch
from app.services.blocklist.decisions import Protection, decide
from app.services.evaluation.forged import judge_sources
from app.services.evaluation.findings import ONE_WAY, TWO_WAY, Source
from tests.helpers import add_evaluation, blocklist_settings, downgrade, finding
from tests.services.evaluation.synthetic import SyntheticStore, port_scan, syn_flood

T0 = 1_800_000_000.0
NOBODY = Protection()
PEER, STRANGER = "198.18.0.10", "198.18.0.66"


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "f.db")
    yield c
    c.close()


def add_round(conn, at: float) -> int:
    return conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, 'x')",
                        (at - 60, at)).lastrowid


# --- the peers table --------------------------------------------------------------------------------

def test_migration_8_adds_the_sources_view_beside_the_peers_table(tmp_path):
    from app.db.connection import SCHEMA_VERSION
    c = connect(tmp_path / "new.db")
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 8
    cols = [r[1] for r in c.execute("PRAGMA table_info(peers)")]
    assert cols[:4] == ["address", "first_seen", "last_two_way", "two_way_rounds"]
    c.close()
    # a version-7 file (no sources view) is upgraded by migration 8
    old = tmp_path / "old.db"
    c = connect(old)
    downgrade(c, 7, "DROP VIEW v_anomaly_sources; ALTER TABLE blacklist DROP COLUMN direction;")
    c.close()
    c = connect(old)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'v_anomaly_sources'").fetchone()
    c.close()


def test_handshake_flows_and_two_way_since(conn):
    with conn:
        r1, r2 = add_round(conn, T0), add_round(conn, T0 + 60)
        rows = [(r1, PEER, 41000, 22, "tcp", 12, 0x1A),        # SYN, then ACK and data: completed
                (r2, PEER, 41000, 22, "tcp", 8, 0x18),         # the same conversation later: PSH+ACK
                (r1, STRANGER, 40000, 80, "tcp", 1, 0x02),     # a SYN: one-way
                (r1, STRANGER, 40001, 81, "tcp", 2, 0x06),     # SYN then RST (a forged SYN's victim answers)
                (r1, "198.18.0.67", 40002, 53, "udp", 9, 0x12)]  # UDP: flags mean nothing
        conn.executemany("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, "
                         "packets, bytes, tcp_flags, reason) VALUES (?, ?, ?, '198.18.0.1', ?, ?, ?, 100, ?, 'top')",
                         rows)
        conn.execute("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                     "bytes, tcp_flags, reason) VALUES (?, '198.18.0.68', 40003, '198.18.0.1', 90, 'tcp', 3, 1, ?, "
                     "'top')", (r1, 0x16))                    # SYN, ACK and the real owner's RST: a blind forgery
    assert sorted(peers.handshake_flows(conn, r1, r2)) == [(r1, PEER, 22, "tcp", 0), (r1, "198.18.0.68", 90, "tcp", 1),
                                                           (r2, PEER, 22, "tcp", 0)]
    # an answer to this host's own connection (PW_FLOW_REPLY) is no handshake of the remote's
    with conn:
        conn.execute("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                     "bytes, tcp_flags, reason) VALUES (?, '198.18.0.69', 80, '198.18.0.1', 41234, 'tcp', 5, 1, ?, "
                     "'top')", (r1, 0x118))
    assert sorted(peers.handshake_flows(conn, r1, r2)) == [(r1, PEER, 22, "tcp", 0), (r1, "198.18.0.68", 90, "tcp", 1),
                                                           (r2, PEER, 22, "tcp", 0)]
    # flows prove nothing: only a proof the kernel saw (or a socket) makes a peer
    assert not peers.two_way_since(conn, PEER, 0)
    with conn:
        assert verify(conn, PEER, T0) == 1
        verify(conn, PEER, T0 + 120)
    row = peers.peer(conn, PEER)
    assert (row["first_seen"], row["last_two_way"], row["two_way_rounds"], row["proof"]) == (T0, T0 + 120, 2,
                                                                                             "handshake")
    assert peers.two_way_since(conn, PEER, T0 + 120) and not peers.two_way_since(conn, PEER, T0 + 121)
    assert not peers.two_way_since(conn, STRANGER, 0)
    assert [r["address"] for r in peers.verified_peers(conn, T0 + 60)] == [PEER]


def verify(conn, address: str, at: float, proof: str = "handshake", ttl: int = 64) -> int:
    """``address`` proved itself at ``at`` (as the collector records the kernel's verified map)."""
    return peers.record_two_way(conn, None, at, {address: (proof, ttl, "02:00:00:00:00:02")})


# --- judged forged or not ---------------------------------------------------------------------------

def peers_of(conn) -> Batch:
    """A batch holding every verified peer (what the evaluation's load_batch reads once)."""
    return Batch([], peers={row["address"]: row for row in peers.verified_peers(conn, 0)}, peers_since=0)


def test_one_way_evidence_under_a_peer_is_its_own_only_with_its_fingerprint(conn, tmp_path):
    """A verified peer proved itself with TTL 64 from MAC 02:..:02: a scan under its address with that TTL
    and MAC is its own (judged: blocked like anyone's); another TTL or another MAC is forged (alert only)."""
    s = blocklist_settings(tmp_path)
    with conn:
        verify(conn, PEER, T0 - 3600)                                 # TTL 64, MAC 02:00:00:00:00:02
        rounds = [add_round(conn, T0 - 600 + 60 * i) for i in range(3)]
        for rid, ttl, mac in zip(rounds, (63, 40, 64), ("02:00:00:00:00:02", "02:00:00:00:00:02", "0a:0b:0c:0d:0e:0f")):
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, ttl_min, ttl_max, mac) "
                         "VALUES (?, ?, 100, 6000, ?, ?, ?)", (rid, PEER, ttl, ttl, mac))
    scans = [finding("port_scan", source=PEER, sources=[Source(PEER, evidence=ONE_WAY)], first_round_id=rid,
                     last_round_id=rid) for rid in rounds]
    assert judge_sources(conn, s, scans, peers_of(conn), now=T0) == 2
    assert [f.sources[0].forged for f in scans] == [False, True, True]
    assert "TTL 40-40, the peer's 64" in scans[1].sources[0].note
    assert "MAC 0a:0b:0c:0d:0e:0f, the peer's 02:00:00:00:00:02" in scans[2].sources[0].note


def test_handshakes_under_a_peer_are_its_own_only_with_its_fingerprint(conn, tmp_path):
    """Handshake flows of a verified peer are two-way evidence only when their rounds carry its
    fingerprint: a blind forger's SYN then ACK under its address (the owner silent, no RST) from
    another TTL or MAC is one-way and possibly forged; no TTLs recorded leaves them two-way."""
    s = blocklist_settings(tmp_path)
    with conn:
        verify(conn, PEER, T0 - 3600)                                 # TTL 64, MAC 02:00:00:00:00:02
        rounds = [add_round(conn, T0 - 600 + 60 * i) for i in range(4)]
        for rid, ttl, mac in zip(rounds[:3], (64, 40, 64), ("02:00:00:00:00:02", "02:00:00:00:00:02",
                                                             "0a:0b:0c:0d:0e:0f")):
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, ttl_min, ttl_max, mac) "
                         "VALUES (?, ?, 100, 6000, ?, ?, ?)", (rid, PEER, ttl, ttl, mac))
    scans = [finding("port_scan", source=PEER, sources=[Source(PEER, evidence=TWO_WAY)], first_round_id=rid,
                     last_round_id=rid) for rid in rounds]
    assert judge_sources(conn, s, scans, peers_of(conn), now=T0) == 2
    assert [(f.sources[0].evidence, f.sources[0].forged) for f in scans] == [
        (TWO_WAY, False), (ONE_WAY, True), (ONE_WAY, True), (TWO_WAY, False)]
    assert scans[1].sources[0].note == "possibly forged: handshakes under a verified peer's address with IP TTL 40-40, the peer's 64"
    assert "from MAC 0a:0b:0c:0d:0e:0f" in scans[2].sources[0].note
    [forged] = decide(conn, s, add_evaluation(conn, scans[1:3], at=T0), now=T0, protection=NOBODY)
    assert forged.action == "refused" and "never blocked on one-way evidence" in forged.detail
    [own] = decide(conn, s, add_evaluation(conn, scans[:1], at=T0), now=T0, protection=NOBODY)
    assert own.action == "block" and own.evidence["evidence"] == TWO_WAY


def test_one_way_evidence_naming_a_peer_is_possibly_forged(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    with conn:
        verify(conn, PEER, T0 - 3600)
        verify(conn, "198.18.0.11", T0 - 2 * 86400)
    scans = [finding("port_scan", source=a, sources=[Source(a, evidence=e)])
             for a, e in ((PEER, ONE_WAY), (STRANGER, ONE_WAY), ("198.18.0.11", ONE_WAY), ("198.18.0.12", TWO_WAY))]
    with conn:
        verify(conn, "198.18.0.12", T0 - 60)
    assert judge_sources(conn, s, scans, peers_of(conn), now=T0) == 1
    assert [f.sources[0].forged for f in scans] == [True, False, False, False]   # .11: outside the 24 h look-back
    assert "verified peer" in scans[0].sources[0].note and "no fingerprint" in scans[0].sources[0].note
    assert "possibly forged" in scans[0].summary
    stored = add_evaluation(conn, scans, at=T0)
    reasons = json.loads(conn.execute("SELECT reasons FROM anomalies WHERE id = ?", (stored[0].id,)).fetchone()[0])
    assert reasons["forged_sources"] == [PEER] and reasons["sources"][0]["evidence"] == ONE_WAY
    view = conn.execute("SELECT address, evidence, possibly_forged FROM v_anomaly_sources ORDER BY anomaly_id").fetchall()
    assert [tuple(r) for r in view] == [(PEER, "one-way", 1), (STRANGER, "one-way", 0), ("198.18.0.11", "one-way", 0),
                                        ("198.18.0.12", "two-way", 0)]
    out = decide(conn, s, stored, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in out] == [(f"{PEER}/32", "refused"), (f"{STRANGER}/32", "block"),
                                                    ("198.18.0.11/32", "block"), ("198.18.0.12/32", "block")]
    assert "never blocked on one-way evidence" in out[0].detail and out[0].evidence["forged"] is True
    assert out[3].evidence["evidence"] == TWO_WAY        # a peer is still blocked on two-way evidence


def test_the_batch_loads_the_peers_once_and_judging_reads_no_peers_table_and_source_stats_twice(conn, tmp_path):
    """load_batch reads the verified peers in one query, from the earlier of the scan span's start and
    the judge's look-back; judge_sources then reads them from the batch (no peers query per source),
    the sources' fingerprints in two queries for all of them, and refuses a batch whose peers start
    after its look-back."""
    s = blocklist_settings(tmp_path)
    with conn:
        verify(conn, PEER, T0 - 3600)                         # within the 24 h look-back, before the scan span
        verify(conn, "198.18.0.11", T0 - 2 * 86400)           # outside it
        add_round(conn, T0)
    rounds = dbs.rounds_after(conn, 0, 10)
    statements = []
    conn.set_trace_callback(statements.append)
    near = load_batch(conn, rounds, Evaluator())               # the scan span only: 5 min before the batch
    wide = load_batch(conn, rounds, Evaluator(), peers_since=T0 - s.blocklist.peer_lookback_seconds)
    assert sum("FROM peers" in q for q in statements) == 2   # one query per load
    assert set(near.peers) == set() and set(wide.peers) == {PEER}
    scans = [finding("port_scan", source=a, sources=[Source(a, evidence=ONE_WAY)]) for a in (PEER, STRANGER, PEER)]
    statements.clear()
    assert judge_sources(conn, s, scans, wide, now=T0) == 2
    conn.set_trace_callback(None)
    assert not [q for q in statements if "FROM peers" in q]
    # the sources' TTLs and MACs: two reads of source_stats per judgement, not two per source
    assert sum("FROM source_stats" in q for q in statements) == 2
    with pytest.raises(ValueError, match="judging sources needs those since"):
        judge_sources(conn, s, scans, near, now=T0)


def test_hop_count_mismatch_marks_one_way_evidence_forged_and_is_skipped_without_ttls_recorded(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    with conn:
        rounds = [add_round(conn, T0 + 60 * i) for i in range(4)]
    f = finding("syn_flood", source=STRANGER, port=80, sources=[Source(STRANGER, share=1.0)],
                first_round_id=rounds[3], last_round_id=rounds[3])
    assert judge_sources(conn, s, [f], peers_of(conn), now=T0) == 0 and f.sources[0].forged is False   # no TTLs recorded: skipped
    with conn:
        for r, lo, hi in ((rounds[0], 63, 63), (rounds[1], 62, 63), (rounds[2], None, None), (rounds[3], 63, 120)):
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, ttl_min, ttl_max) "
                         "VALUES (?, ?, 5, 500, ?, ?)", (r, STRANGER, lo, hi))
    f.sources[0].forged = None
    assert judge_sources(conn, s, [f], peers_of(conn), now=T0) == 1
    assert f.sources[0].note == "possibly forged: IP TTL 63-120 in these rounds, usually 62-63 (another hop count)"
    same = finding("syn_flood", source=STRANGER, port=80, sources=[Source(STRANGER, share=1.0)],
                   first_round_id=rounds[1], last_round_id=rounds[1])
    assert judge_sources(conn, s, [same], peers_of(conn), now=T0) == 0     # 62-63 within 2 of its usual 63


# --- caps ---------------------------------------------------------------------------------------------

def test_one_finding_adds_at_most_max_new_per_evaluation_and_a_forged_flood_none(conn, tmp_path):
    s = blocklist_settings(tmp_path, max_new_per_evaluation=3)
    many = [f"198.18.1.{i}" for i in range(1, 8)]
    wide = finding("port_scan", sources=many)                      # no main source, no shares: all candidates
    flood = finding("syn_flood", port=80, sources=[Source(a, share=0.6) for a in ("198.18.2.1", "198.18.2.2")],
                    many_one_way_sources=True)
    stored = add_evaluation(conn, [wide, flood], at=T0)
    out = decide(conn, s, stored, now=T0, protection=NOBODY)
    assert [d.action for d in out] == ["block"] * 3 + ["refused"] * 6
    assert out[3].detail == "cap of 3 new blocks from one finding reached"
    assert out[-1].detail.startswith("cap of 0 new blocks from one finding reached (a SYN flood judged forged")


# --- rules: evidence classes, floods, source floods, incomplete rounds --------------------------------

@pytest.fixture
def store(tmp_path):
    st = SyntheticStore(str(tmp_path / "ports.db"), seed=1)
    yield st
    st.close()


def batch_of(store, cfg):
    return load_batch(store.conn, dbs.rounds_after(store.conn, 0, 10_000), cfg)


def test_evidence_classes_from_completed_handshakes(store):
    cfg = Evaluator()
    store.add_rounds(4, {2: [port_scan("203.0.113.9", range(1000, 1030))]})
    batch = batch_of(store, cfg)
    client = "198.51.100.1"        # a synthetic benign client: its flows carry SYN|ACK with many packets
    assert finding_sources.evidence_class(batch, client, 1, 4) == TWO_WAY
    assert finding_sources.evidence_class(batch, client, 1, 4, ports={(9, "tcp")}) == ONE_WAY
    assert finding_sources.evidence_class(batch, client, 1, 4, kind="flood") == ONE_WAY
    scans = [f for f in rules.detect(batch, cfg) if f.detector == "port_scan"]
    assert [(f.source, f.sources[0].evidence) for f in scans] == [("203.0.113.9", ONE_WAY)]
    # a scan of completed connections (>= scan_ports ports with handshakes) is two-way
    batch.handshakes["203.0.113.9"] = {(3, p, "tcp") for p in range(1000, 1025)}
    assert finding_sources.evidence_class(batch, "203.0.113.9", 1, 4, ports={(p, "tcp") for p in range(1000, 1030)},
                                need=25, kind="scan") == TWO_WAY


def test_flood_from_many_sources_is_one_finding_with_the_count_and_forged_sources(store):
    cfg = Evaluator()
    forged = [f"10.{i // 250}.{i % 250}.1" for i in range(150)]
    store.add_rounds(3, {1: [syn_flood(80, 3000, forged)], 2: [syn_flood(22, 3000, ["203.0.113.7"])]})
    floods = sorted((f for f in rules.detect(batch_of(store, cfg), cfg) if f.detector == "syn_flood"),
                    key=lambda f: f.port)
    assert [(f.port, f.source_count, f.details["many_one_way_sources"]) for f in floods] == [(22, 1, False),
                                                                                           (80, 150, True)]
    assert floods[1].source is None and floods[1].sources and all(s.forged for s in floods[1].sources)
    assert all(s.evidence == ONE_WAY for f in floods for s in f.sources)
    assert floods[0].source == "203.0.113.7" and not floods[0].forged_sources
    assert "150 one-way sources" in floods[1].summary


def test_source_flood_finding_and_incomplete_rounds_when_the_counts_exist(store):
    cfg = Evaluator(source_flood_new_sources=1000)
    store.add_rounds(5, {3: [port_scan("203.0.113.9", range(1000, 1030))]})
    assert not [f for f in rules.detect(batch_of(store, cfg), cfg) if f.detector == "source_flood"]   # no counts
    with store.conn:
        store.conn.execute("UPDATE rounds SET new_sources = 3, source_evictions = 0, srcport_evictions = 0")
        store.conn.execute("UPDATE rounds SET new_sources = 20000, source_evictions = 4000 WHERE id = 4")
    found = rules.detect(batch_of(store, cfg), cfg)
    floods = [f for f in found if f.detector == "source_flood"]
    assert [(f.first_round_id, f.last_round_id, f.score, f.source_count) for f in floods] == [(4, 4, 20000.0, 20000)]
    assert floods[0].details["per_round"] == [{"round_id": 4, "new_sources": 20000, "source_evictions": 4000,
                                               "srcport_evictions": 0}]
    scan = next(f for f in found if f.detector == "port_scan")
    assert scan.details["incomplete"]["rounds"] == [4]


# --- the model alerts; a rule or two-way evidence corroborates a block -------------------------------

def test_model_finding_blocks_only_when_corroborated(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5)
    lone = finding("model", port=8080, score=5.0, threshold=1.0, sources=[Source("198.18.3.1", share=0.9)],
                   first_round_id=1, last_round_id=1)
    by_rule = finding("model", port=8081, score=5.0, threshold=1.0, sources=[Source("198.18.3.2", share=0.9)],
                      first_round_id=1, last_round_id=1)
    two_way = finding("model", port=8082, score=5.0, threshold=1.0,
                      sources=[Source("198.18.3.3", share=0.9, evidence=TWO_WAY)], first_round_id=1, last_round_id=1)
    rule = finding("port_scan", source="198.18.3.2", sources=["198.18.3.2"])
    stored = add_evaluation(conn, [lone, by_rule, two_way, rule], at=T0)
    out = decide(conn, s, stored, now=T0, protection=NOBODY)
    # two-way traffic alone shows the source is real, not hostile: only the rule corroborates
    assert sorted((d.address, d.action) for d in out) == [("198.18.3.2/32", "block")]


def test_forged_flood_port_limit_is_off_by_default_and_needs_a_watched_interface(conn, tmp_path):
    flood = finding("syn_flood", port=80, sources=[], many_one_way_sources=True)
    assert decisions.limit_forged_floods(conn, blocklist_settings(tmp_path), [flood]) == []
    s = blocklist_settings(tmp_path, syn_limit_enabled=True)
    assert decisions.limit_forged_floods(conn, s, [flood]) == []    # no pinned interface here: nothing to limit


def test_alert_names_the_possibly_forged_source_and_the_source_count():
    from app.services.ops.alerts import anomaly_event
    f = finding("syn_flood", source=PEER, port=8080, sources=[Source(PEER, share=1.0, forged=True)])
    f.source_count = 1
    event = anomaly_event(f)
    assert "source possibly forged (198.18.0.10): not blocked" in event.summary and "1 sources" in event.summary
    assert event.details["sources"] == [{"address": PEER, "share": 1.0, "evidence": ONE_WAY, "forged": True}]
    assert event.details["source_count"] == 1


def test_a_not_forged_finding_about_an_address_wins_over_a_forged_one(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    forged = finding("port_scan", source=PEER, sources=[Source(PEER, forged=True, note="possibly forged: x")])
    two_way = finding("port_scan", source=PEER, sources=[Source(PEER, evidence=TWO_WAY, forged=False)])
    stored = add_evaluation(conn, [forged, two_way], at=T0)
    out = decide(conn, s, stored, now=T0, protection=NOBODY)
    assert [(d.address, d.action, d.anomaly_id) for d in out] == [(f"{PEER}/32", "block", stored[1].id)]


def test_pool_needed_is_capped_at_the_pool_capacity():
    from types import SimpleNamespace
    import numpy as np
    from app.services.evaluation.model_step import pool_state
    from app.services.evaluation.model import Calibration, ModelConfig
    # 50 ports of minute rounds, budget 1/day, W 15: the budget wants 4,800 windows, the pool holds 4,000
    cal = Calibration(1.0, "pot", 0, 72000.0, 1.0, 1 / 72000.0, 0, 0.0)
    model = SimpleNamespace(calibration_windows_=np.zeros((4000, 15, 1)), calibration_=cal,
                            config=ModelConfig(window=15, calibration_windows=4000))
    assert pool_state(model, Evaluator()) == {"windows": 4000, "needed": 4000, "alerting": True, "capacity": 4000,
                                              "budget_needs": 4800}
    model.calibration_windows_ = np.zeros((120, 15, 1))
    assert pool_state(model, Evaluator())["alerting"] is False
