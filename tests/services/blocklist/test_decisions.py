"""Block decisions from findings: interlocks, escalation, caps, dry-run, grace, model shares (tmp
SQLite, no XDP), and with the real XDP map in network namespaces (kernel): expiry and escalation,
protected sources never blocked, a real evaluation's findings blocked end to end.
"""
from __future__ import annotations

import json
import logging

import pytest

from app.config import ConfigError
from app.db import blacklist as queries
from app.db import series as dbs
from app.db.connection import connect
from app.services import host
from app.services.blocklist import blocklist
from app.services.kernel import enforcement
from app.services.evaluation import finding_sources
from app.services.evaluation.batch import assemble
from app.services.kernel.enforcement import parse_network
from app.services.blocklist.decisions import Protection, after_evaluation, decide, ttl_for
from tests.helpers import (UdpSink, add_evaluation, blocklist_settings, collect, finding, ledger_events, loaded,  # noqa: F401
                           map_drops, bpftool_entries, pin_root, port_row, scan, send_udp)

T0 = 1_800_000_000.0
NOBODY = Protection()          # no interlocks: unit tests that are not about them


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "bl.db")
    yield c
    c.close()


# --- interlocks ---------------------------------------------------------------------------------------


def test_protection_refuses_overlaps_both_ways():
    p = Protection()
    p.add("198.18.5.7", "allowlisted")
    p.add("2001:db8:5::/48", "allowlisted")
    assert "overlaps 198.18.5.7/32" in p.refusal(parse_network("198.18.5.0/24"))      # contains it
    assert p.refusal(parse_network("198.18.5.7")) is not None                         # is it
    assert p.refusal(parse_network("198.18.5.8")) is None
    assert p.refusal(parse_network("2001:db8:5:1::9")) is not None                    # inside the prefix
    assert p.refusal(parse_network("2001:db8::/32")) is not None                      # contains the prefix
    assert p.refusal(parse_network("2001:db8:6::1")) is None


def test_gather_protects_host_addresses_loopback_and_allowlist(tmp_path):
    s = blocklist_settings(tmp_path, allowlist=["198.18.250.0/24"])
    p = Protection.gather(s)
    assert "loopback" in p.refusal(parse_network("127.0.0.53"))
    assert "loopback" in p.refusal(parse_network("::1"))
    assert "allowlisted" in p.refusal(parse_network("198.18.250.200"))
    for own in host.local_addresses():
        assert p.refusal(parse_network(own.split("%")[0])) is not None, own
    for gw in host.default_gateways():
        assert p.refusal(parse_network(gw.split("%")[0])) is not None, gw
    assert p.refusal(parse_network("0.0.0.0/0")) is not None                          # contains everything
    s.blocklist.allowlist = ["not-a-prefix"]
    with pytest.raises(ConfigError, match="blocklist.allowlist"):
        Protection.gather(s)


def test_interlocks_refuse_automatic_blocks_and_record_it(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    p = Protection()
    p.add("198.18.0.1", "an address of this host")
    p.add("198.18.7.0/24", "allowlisted")
    found = add_evaluation(conn, [scan("198.18.0.1"), scan("198.18.7.9"), scan("198.18.0.66")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=p)
    assert [(d.address, d.action) for d in decisions] == [
        ("198.18.0.1/32", "refused"), ("198.18.7.9/32", "refused"), ("198.18.0.66/32", "block")]
    assert "an address of this host" in decisions[0].detail and "allowlisted" in decisions[1].detail
    assert [r["address"] for r in queries.entries(conn)] == ["198.18.0.66/32"]
    assert ledger_events(conn) == [("198.18.0.1/32", "refused"), ("198.18.7.9/32", "refused"), ("198.18.0.66/32", "block")]


# --- decisions, escalation, caps, dry-run, grace ----------------------------------------------------------


def test_ttl_escalates_and_is_capped(tmp_path):
    s = blocklist_settings(tmp_path, base_ttl_seconds=600.0, escalation=3.0, max_ttl_seconds=10_000.0)
    assert [ttl_for(s, n) for n in (1, 2, 3, 4, 500)] == [600, 1800, 5400, 10_000, 10_000]


def test_repeat_offender_gets_a_longer_block(conn, tmp_path):
    s = blocklist_settings(tmp_path, base_ttl_seconds=3600.0, escalation=2.0, max_ttl_seconds=5 * 3600.0)
    ttls = []
    now = T0
    for _ in range(4):
        found = add_evaluation(conn, [scan("198.18.0.66", port=22)], at=now)
        [d] = decide(conn, s, found, now=now, protection=NOBODY)
        assert d.action == "block" and d.anomaly_id is not None and d.created_at == now
        assert "port scan on tcp/22" in d.reason
        ttls.append((d.offences, d.expires_at - now))
        enforcement.apply(conn, s, now=d.expires_at)          # no pins: only the expiry is recorded
        assert queries.get_entry(conn, d.address)["status"] == "expired"
        now = d.expires_at + 60
    assert ttls == [(1, 3600), (2, 7200), (3, 14400), (4, 18000)]
    row = queries.get_entry(conn, "198.18.0.66/32")
    assert row["offences"] == 4 and row["origin"] == "auto" and json.loads(row["evidence"])["port"] == "tcp/22"
    assert [a for _, a in ledger_events(conn)] == ["block", "expire"] * 4


def test_already_listed_source_is_skipped(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    blocklist.add_manual(conn, s, "198.18.4.0/24", ttl=600, now=T0, protection=NOBODY)
    found = add_evaluation(conn, [scan("198.18.4.9")], at=T0)
    [d] = decide(conn, s, found, now=T0 + 1, protection=NOBODY)
    assert d.action == "skipped" and "198.18.4.0/24" in d.detail
    assert len(queries.entries(conn)) == 1


def test_cap_per_evaluation_and_total_cap_warn(conn, tmp_path, caplog):
    s = blocklist_settings(tmp_path, max_new_per_evaluation=2, max_entries=3)
    found = add_evaluation(conn, [scan(f"198.18.1.{i}") for i in range(10, 15)], at=T0)
    with caplog.at_level(logging.WARNING, logger="app.services.blocklist.decisions"):
        decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [d.action for d in decisions] == ["block", "block", "refused", "refused", "refused"]
    assert "cap of 2 new blocks per evaluation" in decisions[2].detail
    assert any("max_new_per_evaluation" in r.message for r in caplog.records)
    caplog.clear()
    found = add_evaluation(conn, [scan(f"198.18.2.{i}") for i in range(10, 13)], at=T0)
    with caplog.at_level(logging.WARNING, logger="app.services.blocklist.decisions"):
        decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [d.action for d in decisions] == ["block", "refused", "refused"]
    assert "blocklist full (3 entries)" in decisions[1].detail
    assert any("full at 3 entries" in r.message for r in caplog.records)
    assert queries.count_status(conn, "active") == 3
    # the map's size caps the ledger too
    s.blocklist.max_entries, s.collector.blacklist_map_size = 10_000, 3
    assert enforcement.capacity(s) == 3


def test_dry_run_records_would_block_and_never_reaches_a_map(conn, tmp_path):
    s = blocklist_settings(tmp_path, dry_run=True)
    found = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    [d] = decide(conn, s, found, now=T0, protection=NOBODY)
    assert d.action == "would-block"
    assert queries.get_entry(conn, "198.18.0.66/32")["status"] == "dry-run"
    assert ledger_events(conn) == [("198.18.0.66/32", "would-block")]
    # a repeated finding while listed as dry-run is not recorded twice
    found = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    assert [d.action for d in decide(conn, s, found, now=T0 + 5, protection=NOBODY)] == ["skipped"]
    # dry-run rows are not 'active': reconcile never writes them (see _sync: only active rows)
    assert queries.entries(conn, ("active",)) == []


def test_manual_remove_grace(conn, tmp_path):
    s = blocklist_settings(tmp_path, manual_remove_grace_seconds=3600.0)
    found = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    decide(conn, s, found, now=T0, protection=NOBODY)
    blocklist.remove_manual(conn, s, "198.18.0.66", now=T0 + 10)
    found = add_evaluation(conn, [scan("198.18.0.66")], at=T0 + 100)
    [d] = decide(conn, s, found, now=T0 + 100, protection=NOBODY)
    assert d.action == "refused" and "removed by hand 90 s ago" in d.detail
    [d] = decide(conn, s, found, now=T0 + 3700, protection=NOBODY)
    assert d.action == "block" and d.offences == 2
    assert [a for _, a in ledger_events(conn)] == ["block", "remove", "refused", "block"]


def test_disabled_blocklist_decides_nothing(conn, tmp_path):
    s = blocklist_settings(tmp_path, enabled=False)
    found = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    assert decide(conn, s, found, now=T0, protection=NOBODY) == []


def test_model_anomaly_blocks_dominant_sources_only(conn, tmp_path):
    # the model-only path (corroboration is the default: tests/services/evaluation/test_forged.py)
    s = blocklist_settings(tmp_path, model_source_share=0.5, model_needs_corroboration=False)
    with conn:
        rounds = [conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, 'x')",
                               (T0 + i, T0 + i + 1)).lastrowid for i in range(3)]
        pid = port_row(conn, 8080, "tcp")
        for r in rounds:
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes) VALUES (?, ?, 100, 1, 1)",
                         (r, pid))
            conn.execute("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                         "bytes, reason) VALUES (?, '198.18.0.70', 4000, '198.18.0.1', 8080, 'tcp', 70, 1, 'top')", (r,))
            conn.execute("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                         "bytes, reason) VALUES (?, '198.18.0.71', 4001, '198.18.0.1', 8080, 'tcp', 20, 1, 'top')", (r,))
            # the same source's many-port record must not double its count
            conn.execute("INSERT INTO source_ports (round_id, address, port, protocol, packets) "
                         "VALUES (?, '198.18.0.70', 8080, 'tcp', 70)", (r,))
            # another port's traffic does not count for this one
            conn.execute("INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, packets, "
                         "bytes, reason) VALUES (?, '198.18.0.71', 4001, '198.18.0.1', 9090, 'tcp', 500, 1, 'top')", (r,))
    # the sources the evaluation names, from its loaded batch (port-specific counts from flows/source_ports)
    batch = assemble(conn, dbs.rounds_after(conn, 0, 10))
    packets = finding_sources.port_totals(batch, pid, rounds[0], rounds[-1])[0]
    named, _ = finding_sources.port_sources(batch, 8080, "tcp", packets, rounds[0], rounds[-1])
    assert [(n.address, n.packets, n.share) for n in named] == [("198.18.0.70", 210, 0.7), ("198.18.0.71", 60, 0.2)]
    found = add_evaluation(conn, [finding("model", port=8080, sources=named, first_round_id=rounds[0],
                                          last_round_id=rounds[-1], packets=packets),
                                  finding("model", port=8080, sources=[("2001:db8::7", 0.9)], first_round_id=rounds[0],
                                          last_round_id=rounds[0]),
                                  finding("new_listener", port=8080, source="198.18.0.72")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.70/32", "block"), ("2001:db8::7/128", "block")]
    assert decisions[0].evidence["share"] == 0.7 and decisions[0].evidence["packets"] == 210
    assert "70% of its packets" in decisions[0].reason


def test_weak_model_anomaly_alerts_but_does_not_block(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5, model_block_factor=2.0, model_needs_corroboration=False)
    found = add_evaluation(conn, [finding("model", port=53, protocol="udp", score=1.27, threshold=1.0,
                                          sources=[("198.18.0.90", 1.0)]),
                                  finding("model", port=80, score=3.1, threshold=1.0, sources=[("198.18.0.91", 0.9)])],
                           at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.91/32", "block")]


def test_model_finding_spares_a_source_at_its_usual_rate(conn, tmp_path):
    """The model flags the port, but only the source that surged is blocked."""
    s = blocklist_settings(tmp_path, model_source_share=0.5, model_source_surge=3.0, model_needs_corroboration=False)
    with conn:
        rounds = [conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, 'x')",
                               (T0 + i, T0 + i + 1)).lastrowid for i in range(12)]
        for r in rounds:
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes) VALUES (?, '198.18.0.40', 60, 1)", (r,))
        conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes) VALUES (?, '198.18.0.41', 900, 1)",
                     (rounds[-1],))
        conn.execute("UPDATE source_stats SET packets = 75 WHERE round_id = ? AND address = '198.18.0.40'", (rounds[-2],))
    steady = [("198.18.0.40", 1.0)]
    surged = [("198.18.0.41", 0.94)]
    found = add_evaluation(conn, [finding("model", port=8080, first_round_id=rounds[-2], last_round_id=rounds[-2],
                                          sources=steady),
                                  finding("model", port=8080, first_round_id=rounds[-1], last_round_id=rounds[-1],
                                          sources=surged)], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.41/32", "block")]


def test_syn_flood_blocks_source_and_named_dominant_sources(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5)
    found = add_evaluation(conn, [finding("syn_flood", port=80, source="198.18.0.80",
                                          sources=[("198.18.0.81", 0.6), ("198.18.0.82", 0.1)])], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [d.address for d in decisions] == ["198.18.0.80/32", "198.18.0.81/32"]
    assert all("SYN flood on tcp/80" in d.reason for d in decisions)


# --- kernel: decisions enforced on the real XDP map ----------------------------------------------------


@pytest.mark.kernel
def test_expiry_lifts_the_block_and_escalation_on_repeat(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root, base_ttl_seconds=600.0, escalation=2.0)
    conn = connect(s.general.db)
    src = lab.host_v4(2)
    found = add_evaluation(conn, [scan(src, port=22)])
    decisions, results = after_evaluation(conn, s, found)
    [d] = decisions
    assert d.action == "block" and d.ttl_seconds == 600 and results[0].added == [f"{src}/32"]
    with UdpSink(lab.root_v4, 7300) as sink:
        send_udp(lab, src, lab.root_v4, 7300, 10)
        assert sink.drain() == {}
        [r] = enforcement.apply(conn, s, now=d.expires_at + 1)         # ten minutes later
        assert r.expired == [f"{src}/32"] and r.removed == [f"{src}/32"] and r.drops == 10 and r.entries == 0
        assert map_drops(pdir, src) is None
        send_udp(lab, src, lab.root_v4, 7300, 12)
        assert sink.drain() == {src: 12}              # traffic flows again
        # it scans again: the second block lasts twice as long
        found = add_evaluation(conn, [scan(src, port=22)])
        [d2], _ = after_evaluation(conn, s, found, now=d.expires_at + 120)
        assert (d2.action, d2.offences, d2.ttl_seconds) == ("block", 2, 1200)
        send_udp(lab, src, lab.root_v4, 7300, 9)
        assert sink.drain() == {}
    enforcement.apply(conn, s, now=d.expires_at + 130)
    row = queries.get_entry(conn, f"{src}/32")
    assert (row["status"], row["offences"], row["drops"]) == ("active", 2, 19)
    assert [a for _, a in ledger_events(conn)] == ["block", "map-add", "expire", "map-remove", "block", "map-add"]
    conn.close()


@pytest.mark.kernel
def test_local_and_allowlisted_sources_are_never_blocked(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root, allowlist=[lab.host_v4(1)])
    conn = connect(s.general.db)
    found = add_evaluation(conn, [scan(lab.root_v4), scan(lab.host_v4(1)), scan(lab.root_v6),
                                finding("syn_flood", port=80, source="127.0.0.1")])
    decisions, [r] = after_evaluation(conn, s, found)
    assert [d.action for d in decisions] == ["refused"] * 4
    assert r.entries == 0 and bpftool_entries(pdir) == 0
    assert queries.entries(conn, None) == []
    with UdpSink(lab.root_v4, 7400) as sink:
        send_udp(lab, lab.host_v4(1), lab.root_v4, 7400, 8)
        assert sink.drain() == {lab.host_v4(1): 8}
    # dry-run: a would-block is recorded and the map stays untouched
    s.blocklist.dry_run = True
    found = add_evaluation(conn, [scan(lab.host_v4(3))])
    [d], [r] = after_evaluation(conn, s, found)
    assert d.action == "would-block" and r.entries == 0 and bpftool_entries(pdir) == 0
    conn.close()


@pytest.mark.kernel
def test_port_scan_evaluated_then_blocked_end_to_end(lab, tmp_path, pin_root):
    """Real collector rounds, a SYN scan from one lab host, the real evaluator, then the blocklist."""
    from app.services.evaluation import evaluation
    s, pdir = loaded(lab, tmp_path, pin_root)
    scanner, benign = lab.host_v4(2), lab.host_v4(0)
    send_udp(lab, benign, lab.root_v4, 7800, 20)
    collect(s, lab)
    assert int(lab.send("--kind", "syn", "--src", scanner, "--dst", lab.root_v4, "--ports", "1000-1039",
                        "--count", "1", "--iface", lab.peer_interface)) == 40
    send_udp(lab, benign, lab.root_v4, 7800, 20)
    collect(s, lab)
    result = evaluation.run(s)
    assert [a.source for a in result.anomalies if a.detector == "port_scan"] == [scanner]
    conn = connect(s.general.db)
    decisions, [r] = after_evaluation(conn, s, result.anomalies)
    assert [d.address for d in decisions if d.action == "block"] == [f"{scanner}/32"]
    assert r.added == [f"{scanner}/32"] and r.entries == 1
    with UdpSink(lab.root_v4, 7800) as sink:
        send_udp(lab, scanner, lab.root_v4, 7800, 15)
        send_udp(lab, benign, lab.root_v4, 7800, 10)
        assert sink.drain() == {benign: 10}           # the scanner is cut off, the benign host is not
    assert enforcement.apply(conn, s)[0].drops == 15
    row = queries.get_entry(conn, f"{scanner}/32")
    assert row["origin"] == "auto" and row["anomaly_id"] == decisions[0].anomaly_id and "port scan" in row["reason"]
    conn.close()


def test_simulate_per_detector_records_would_block_for_those_only(conn, tmp_path):
    s = blocklist_settings(tmp_path, simulate=["syn_flood"])
    found = add_evaluation(conn, [finding("syn_flood", source="198.18.0.70", port=80, sources=["198.18.0.70"]),
                                  scan("198.18.0.71")], at=T0)
    decisions = {d.address: d.action for d in decide(conn, s, found, now=T0, protection=NOBODY)}
    assert decisions == {"198.18.0.70/32": "would-block", "198.18.0.71/32": "block"}
    assert queries.get_entry(conn, "198.18.0.70/32")["status"] == "dry-run"
    assert queries.get_entry(conn, "198.18.0.71/32")["status"] == "active"
    assert [r["address"] for r in queries.entries(conn, ("active",))] == ["198.18.0.71/32"]   # what a map gets
    # a scan by the simulated flood's source is enforced (a simulated row covers no real block) ...
    found = add_evaluation(conn, [scan("198.18.0.70")], at=T0 + 1)
    assert [d.action for d in decide(conn, s, found, now=T0 + 1, protection=NOBODY)] == ["block"]
    assert queries.get_entry(conn, "198.18.0.70/32")["status"] == "active"
    # ... and a simulated decision never downgrades an active block
    found = add_evaluation(conn, [finding("syn_flood", source="198.18.0.71", port=80, sources=["198.18.0.71"])],
                           at=T0 + 2)
    assert [d.action for d in decide(conn, s, found, now=T0 + 2, protection=NOBODY)] == ["skipped"]
    assert queries.get_entry(conn, "198.18.0.71/32")["status"] == "active"


def test_the_database_allowlist_is_honoured_and_lifts_blocks(conn, tmp_path):
    from app.services.blocklist import allowlist
    s = blocklist_settings(tmp_path)
    found = add_evaluation(conn, [scan("198.18.0.80"), scan("198.18.0.81")], at=T0)
    decide(conn, s, found, now=T0, protection=NOBODY)
    address, lifted = allowlist.add(conn, "198.18.0.80/31", "lab hosts", now=T0 + 1)
    assert address == "198.18.0.80/31" and sorted(lifted) == ["198.18.0.80/32", "198.18.0.81/32"]
    assert queries.entries(conn, queries.LISTED) == []
    protection = Protection.gather(s, conn)
    assert "allowlisted (python -m app allow)" in protection.refusal(parse_network("198.18.0.81"))
    found = add_evaluation(conn, [scan("198.18.0.81")], at=T0 + 2)
    [d] = decide(conn, s, found, now=T0 + 2, protection=protection)
    assert d.action == "refused" and "allowlisted" in d.detail
