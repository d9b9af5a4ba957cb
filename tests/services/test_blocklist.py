"""The blocklist: decisions, interlocks, escalation, caps, dry-run (tmp SQLite, no XDP), and the real
XDP map in network namespaces (kernel): drops with exact counts, prefixes, IPv6, expiry,
escalation, interlocks, reconcile after a hand flush (bpftool) and after program reloads.
"""
from __future__ import annotations

import json
import logging
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from app.config import ConfigError
from app.db import blacklist as queries
from app.db.connection import connect
from app.errors import UsageError
from app.services import blocklist, bpf_structs, maps
from app.services.blocklist import Protection, parse_network
from tests.helpers import UdpSink, add_evaluation, blocklist_settings, pin_root, port_row, send_udp  # noqa: F401
from tests.helpers import collect

T0 = 1_800_000_000.0
NOBODY = Protection()          # no interlocks: unit tests that are not about them


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "bl.db")
    yield c
    c.close()


def events(conn, action=None):
    rows = queries.events(conn)
    return [(r["address"], r["action"]) for r in rows if action is None or r["action"] == action]


def scan(source, **kw):
    return dict(detector="port_scan", source=source, reasons={"rule": "port scan", "sources": [source]}, **kw)


# --- parsing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("198.18.0.9", "198.18.0.9/32"), ("198.18.0.0/24", "198.18.0.0/24"), ("2001:db8::1", "2001:db8::1/128"),
    ("2001:db8::/64", "2001:db8::/64"), ("::ffff:198.18.0.7", "198.18.0.7/32"), (" 198.18.1.0/24 ", "198.18.1.0/24"),
])
def test_parse_network_accepts(text, expected):
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize("text,says", [
    ("nonsense", "is not an IPv4 or IPv6 address"), ("198.18.0.1/33", "out of range for IPv4 (0-32)"),
    ("2001:db8::/129", "out of range for IPv6 (0-128)"), ("198.18.0.5/24", "has host bits set: give 198.18.0.0/24"),
    ("198.18.0.0/-1", "is not a number"), ("", "required"),
])
def test_parse_network_refuses_with_one_sentence(text, says):
    with pytest.raises(UsageError) as err:
        parse_network(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_lpm_key_layout():
    key = blocklist.lpm_key(parse_network("198.18.3.0/24"))
    assert key[:4] == (128).to_bytes(4, "little") and key[4:] == bpf_structs.addr_bytes("198.18.3.0")  # 8 family bits + 96 + 24
    assert blocklist.lpm_key(parse_network("2001:db8::/64"))[:4] == (72).to_bytes(4, "little")  # 8 + 64


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
    for own in blocklist.local_addresses():
        assert p.refusal(parse_network(own.split("%")[0])) is not None, own
    for gw in blocklist.default_gateways():
        assert p.refusal(parse_network(gw.split("%")[0])) is not None, gw
    assert p.refusal(parse_network("0.0.0.0/0")) is not None                          # contains everything
    s.blocklist.allowlist = ["not-a-prefix"]
    with pytest.raises(ConfigError, match="blocklist.allowlist"):
        Protection.gather(s)


def test_resolvers_and_ssh_peers(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch lab\nnameserver 198.18.77.53\nnameserver 2001:db8::53\noptions edns0\n")
    assert blocklist.resolvers([conf, tmp_path / "absent"]) == ["198.18.77.53", "2001:db8::53"]
    import psutil
    Addr = namedtuple("Addr", "ip port")
    Conn = namedtuple("Conn", "laddr raddr status pid")
    fake = [Conn(Addr("198.18.0.1", 22), Addr("198.18.0.50", 50000), psutil.CONN_ESTABLISHED, None),
            Conn(Addr("198.18.0.1", 2222), Addr("198.18.0.51", 50001), psutil.CONN_ESTABLISHED, 4242),
            Conn(Addr("198.18.0.1", 80), Addr("198.18.0.52", 50002), psutil.CONN_ESTABLISHED, 4343),
            Conn(Addr("198.18.0.1", 22), Addr("198.18.0.53", 50003), psutil.CONN_TIME_WAIT, None)]
    monkeypatch.setattr(psutil, "net_connections", lambda kind: fake)

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def name(self):
            return "sshd" if self.pid == 4242 else "nginx"
    monkeypatch.setattr(psutil, "Process", Proc)
    assert blocklist.ssh_peers() == ["198.18.0.50", "198.18.0.51"]


def test_interlocks_refuse_automatic_blocks_and_record_it(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    p = Protection()
    p.add("198.18.0.1", "an address of this host")
    p.add("198.18.7.0/24", "allowlisted")
    eid = add_evaluation(conn, [scan("198.18.0.1"), scan("198.18.7.9"), scan("198.18.0.66")], at=T0)
    decisions = blocklist.decide(conn, s, eid, now=T0, protection=p)
    assert [(d.address, d.action) for d in decisions] == [
        ("198.18.0.1/32", "refused"), ("198.18.7.9/32", "refused"), ("198.18.0.66/32", "block")]
    assert "an address of this host" in decisions[0].detail and "allowlisted" in decisions[1].detail
    assert [r["address"] for r in queries.entries(conn)] == ["198.18.0.66/32"]
    assert events(conn) == [("198.18.0.1/32", "refused"), ("198.18.7.9/32", "refused"), ("198.18.0.66/32", "block")]


# --- decisions, escalation, caps, dry-run, grace ----------------------------------------------------------

def test_ttl_escalates_and_is_capped(tmp_path):
    s = blocklist_settings(tmp_path, base_ttl_seconds=600.0, escalation=3.0, max_ttl_seconds=10_000.0)
    assert [blocklist.ttl_for(s, n) for n in (1, 2, 3, 4, 500)] == [600, 1800, 5400, 10_000, 10_000]


def test_repeat_offender_gets_a_longer_block(conn, tmp_path):
    s = blocklist_settings(tmp_path, base_ttl_seconds=3600.0, escalation=2.0, max_ttl_seconds=5 * 3600.0)
    ttls = []
    now = T0
    for _ in range(4):
        eid = add_evaluation(conn, [scan("198.18.0.66", port=22)], at=now)
        [d] = blocklist.decide(conn, s, eid, now=now, protection=NOBODY)
        assert d.action == "block" and d.anomaly_id is not None and d.created_at == now
        assert "port scan on tcp/22" in d.reason
        ttls.append((d.offences, d.expires_at - now))
        blocklist.apply(conn, s, now=d.expires_at)          # no pins: only the expiry is recorded
        assert queries.get_entry(conn, d.address)["status"] == "expired"
        now = d.expires_at + 60
    assert ttls == [(1, 3600), (2, 7200), (3, 14400), (4, 18000)]
    row = queries.get_entry(conn, "198.18.0.66/32")
    assert row["offences"] == 4 and row["origin"] == "auto" and json.loads(row["evidence"])["port"] == "tcp/22"
    assert [a for _, a in events(conn)] == ["block", "expire"] * 4


def test_already_listed_source_is_skipped(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    blocklist.add_manual(conn, s, "198.18.4.0/24", ttl=600, now=T0, protection=NOBODY)
    eid = add_evaluation(conn, [scan("198.18.4.9")], at=T0)
    [d] = blocklist.decide(conn, s, eid, now=T0 + 1, protection=NOBODY)
    assert d.action == "skipped" and "198.18.4.0/24" in d.detail
    assert len(queries.entries(conn)) == 1


def test_cap_per_evaluation_and_total_cap_warn(conn, tmp_path, caplog):
    s = blocklist_settings(tmp_path, max_new_per_evaluation=2, max_entries=3)
    eid = add_evaluation(conn, [scan(f"198.18.1.{i}") for i in range(10, 15)], at=T0)
    with caplog.at_level(logging.WARNING, logger="app.services.blocklist"):
        decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [d.action for d in decisions] == ["block", "block", "refused", "refused", "refused"]
    assert "cap of 2 new blocks per evaluation" in decisions[2].detail
    assert any("max_new_per_evaluation" in r.message for r in caplog.records)
    caplog.clear()
    eid = add_evaluation(conn, [scan(f"198.18.2.{i}") for i in range(10, 13)], at=T0)
    with caplog.at_level(logging.WARNING, logger="app.services.blocklist"):
        decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [d.action for d in decisions] == ["block", "refused", "refused"]
    assert "blocklist full (3 entries)" in decisions[1].detail
    assert any("full at 3 entries" in r.message for r in caplog.records)
    assert queries.count_status(conn, "active") == 3
    # the map's size caps the ledger too
    s.blocklist.max_entries, s.collector.blacklist_map_size = 10_000, 3
    assert blocklist.capacity(s) == 3


def test_dry_run_records_would_block_and_never_reaches_a_map(conn, tmp_path):
    s = blocklist_settings(tmp_path, dry_run=True)
    eid = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    [d] = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert d.action == "would-block"
    assert queries.get_entry(conn, "198.18.0.66/32")["status"] == "dry-run"
    assert events(conn) == [("198.18.0.66/32", "would-block")]
    # a repeated finding while listed as dry-run is not recorded twice
    eid = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    assert [d.action for d in blocklist.decide(conn, s, eid, now=T0 + 5, protection=NOBODY)] == ["skipped"]
    # dry-run rows are not 'active': reconcile never writes them (see _sync: only active rows)
    assert queries.entries(conn, ("active",)) == []


def test_manual_remove_grace(conn, tmp_path):
    s = blocklist_settings(tmp_path, manual_remove_grace_seconds=3600.0)
    eid = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    blocklist.remove_manual(conn, s, "198.18.0.66", now=T0 + 10)
    eid = add_evaluation(conn, [scan("198.18.0.66")], at=T0 + 100)
    [d] = blocklist.decide(conn, s, eid, now=T0 + 100, protection=NOBODY)
    assert d.action == "refused" and "removed by hand 90 s ago" in d.detail
    [d] = blocklist.decide(conn, s, eid, now=T0 + 3700, protection=NOBODY)
    assert d.action == "block" and d.offences == 2
    assert [a for _, a in events(conn)] == ["block", "remove", "refused", "block"]


def test_disabled_blocklist_decides_nothing(conn, tmp_path):
    s = blocklist_settings(tmp_path, enabled=False)
    eid = add_evaluation(conn, [scan("198.18.0.66")], at=T0)
    assert blocklist.decide(conn, s, eid, now=T0, protection=NOBODY) == []


def test_model_anomaly_blocks_dominant_sources_only(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5)
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
    eid = add_evaluation(conn, [dict(detector="model", port=8080, protocol="tcp", first_round_id=rounds[0],
                                     last_round_id=rounds[-1], reasons={"sources": ["198.18.0.71", "198.18.0.70"]}),
                                dict(detector="model", port=8080, protocol="tcp", first_round_id=rounds[0],
                                     last_round_id=rounds[0], reasons={"sources": [{"address": "2001:db8::7", "share": 0.9}]}),
                                dict(detector="new_listener", port=8080, protocol="tcp", source="198.18.0.72")], at=T0)
    decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.70/32", "block"), ("2001:db8::7/128", "block")]
    assert decisions[0].evidence["share"] == 0.7 and decisions[0].evidence["packets"] == 210
    assert "70% of its packets" in decisions[0].reason


def test_weak_model_anomaly_alerts_but_does_not_block(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5, model_block_factor=2.0)
    named = {"sources": [{"address": "198.18.0.90", "share": 1.0}]}
    eid = add_evaluation(conn, [dict(detector="model", port=53, protocol="udp", score=1.27, threshold=1.0, reasons=named),
                                dict(detector="model", port=80, protocol="tcp", score=3.1, threshold=1.0,
                                     reasons={"sources": [{"address": "198.18.0.91", "share": 0.9}]})], at=T0)
    decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.91/32", "block")]


def test_model_finding_spares_a_source_at_its_usual_rate(conn, tmp_path):
    """The model flags the port, but only the source that surged is blocked."""
    s = blocklist_settings(tmp_path, model_source_share=0.5, model_source_surge=3.0)
    with conn:
        rounds = [conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (?, ?, 'x')",
                               (T0 + i, T0 + i + 1)).lastrowid for i in range(12)]
        for r in rounds:
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes) VALUES (?, '198.18.0.40', 60, 1)", (r,))
        conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes) VALUES (?, '198.18.0.41', 900, 1)",
                     (rounds[-1],))
        conn.execute("UPDATE source_stats SET packets = 75 WHERE round_id = ? AND address = '198.18.0.40'", (rounds[-2],))
    steady = {"sources": [{"address": "198.18.0.40", "share": 1.0}]}
    surged = {"sources": [{"address": "198.18.0.41", "share": 0.94}]}
    eid = add_evaluation(conn, [dict(detector="model", port=8080, protocol="tcp", first_round_id=rounds[-2],
                                     last_round_id=rounds[-2], reasons=steady),
                                dict(detector="model", port=8080, protocol="tcp", first_round_id=rounds[-1],
                                     last_round_id=rounds[-1], reasons=surged)], at=T0)
    decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [(d.address, d.action) for d in decisions] == [("198.18.0.41/32", "block")]


def test_syn_flood_blocks_source_and_named_dominant_sources(conn, tmp_path):
    s = blocklist_settings(tmp_path, model_source_share=0.5)
    eid = add_evaluation(conn, [dict(detector="syn_flood", port=80, source="198.18.0.80",
                                     reasons={"sources": [{"address": "198.18.0.81", "share": 0.6},
                                                          {"address": "198.18.0.82", "share": 0.1}]})], at=T0)
    decisions = blocklist.decide(conn, s, eid, now=T0, protection=NOBODY)
    assert [d.address for d in decisions] == ["198.18.0.80/32", "198.18.0.81/32"]
    assert all("SYN flood on tcp/80" in d.reason for d in decisions)


def test_manual_add_checks_before_changing_anything(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    p = Protection()
    p.add("198.18.0.1", "an address of this host")
    for text, kw in [("198.18.0.1", {}), ("198.18.0.0/24", {}), ("198.18.0.9", {"ttl": 0}),
                     ("198.18.0.9", {"ttl": -5}), ("bad", {})]:
        with pytest.raises(UsageError):
            blocklist.add_manual(conn, s, text, protection=p, now=T0, **kw)
    assert queries.entries(conn, None) == [] and events(conn) == []
    d = blocklist.add_manual(conn, s, "198.18.0.1", force=True, protection=p, now=T0)
    assert d.action == "block" and "forced" in d.detail


# --- kernel: the real XDP map -------------------------------------------------------------------------

def _loaded(lab, tmp_path, pin_root, **blocklist_keys):
    s = blocklist_settings(tmp_path, pin_root, **blocklist_keys)
    collect(s, lab)                                   # compile, attach, pin under the private root
    return s, Path(s.general.pin_root) / lab.interface


def _map_drops(pdir, cidr) -> int | None:
    with maps.PinnedMap(pdir / "blacklist") as m:
        raw = m.lookup(blocklist.lpm_key(parse_network(cidr)))
    return None if raw is None else bpf_structs.PwBlacklistValue.from_buffer_copy(raw[:24]).drops


def _bpftool_entries(pdir) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pdir / "blacklist")],
                         capture_output=True, text=True, check=True)
    return len(json.loads(out.stdout))


@pytest.mark.kernel
def test_blocked_source_is_dropped_exactly_others_pass(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root)
    conn = connect(s.general.db)
    blocked, other = lab.host_v4(0), lab.host_v4(1)
    blocklist.add_manual(conn, s, blocked, reason="test")
    [result] = blocklist.apply(conn, s)
    assert result.interface == lab.interface and result.added == [f"{blocked}/32"] and result.entries == 1
    with UdpSink(lab.root_v4, 7100) as sink:
        assert send_udp(lab, blocked, lab.root_v4, 7100, 60) == 60
        assert send_udp(lab, other, lab.root_v4, 7100, 25) == 25
        assert sink.drain() == {other: 25}            # nothing from the blocked source reached the stack
    assert _map_drops(pdir, blocked) == 60
    assert blocklist.reconcile(conn, s, pdir).drops == 60
    assert blocklist.reconcile(conn, s, pdir).drops == 0          # counted once
    collect(s, lab)                                   # the collector's round and its own reconcile
    assert queries.get_entry(conn, f"{blocked}/32")["drops"] == 60
    assert conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?", (f"{blocked}/32",)).fetchone()[0] == 60
    assert conn.execute("SELECT SUM(packets) FROM source_stats WHERE address = ?", (other,)).fetchone()[0] == 25
    assert conn.execute("SELECT COUNT(*) FROM source_stats WHERE address = ?", (blocked,)).fetchone()[0] == 0
    conn.close()


@pytest.mark.kernel
def test_prefix_and_ipv6_entries(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root)
    net = f"198.19.{lab.subnet}"                      # a second lab /24 behind the veth (the first holds our .1)
    for i in (2, 3):
        lab.run("ip", "addr", "add", f"{net}.{i}/24", "dev", lab.peer_interface)
        subprocess.run(["ip", "neigh", "replace", f"{net}.{i}", "lladdr", _peer_mac(lab), "dev", lab.interface,
                        "nud", "permanent"], check=True)
    subprocess.run(["ip", "route", "add", f"{net}.0/24", "dev", lab.interface], check=True)
    conn = connect(s.general.db)
    with pytest.raises(UsageError, match="an address of this host"):
        blocklist.add_manual(conn, s, f"198.18.{lab.subnet}.0/24")         # would cut off this host's own /24
    blocklist.add_manual(conn, s, f"{net}.0/24")
    blocklist.add_manual(conn, s, lab.host_v6(0))
    [result] = blocklist.apply(conn, s)
    assert sorted(result.added) == sorted([f"{net}.0/24", f"{lab.host_v6(0)}/128"])
    with UdpSink(lab.root_v4, 7200) as sink4, UdpSink(lab.root_v6, 7200) as sink6:
        sent = {src: send_udp(lab, src, lab.root_v4, 7200, n) for src, n in ((f"{net}.2", 30), (f"{net}.3", 20),
                                                                             (lab.host_v4(0), 15))}
        sent6 = {src: send_udp(lab, src, lab.root_v6, 7200, n) for src, n in ((lab.host_v6(0), 40), (lab.host_v6(1), 11))}
        assert sink4.drain() == {lab.host_v4(0): 15}
        assert sink6.drain() == {lab.host_v6(1): 11}
    assert _map_drops(pdir, f"{net}.0/24") == sent[f"{net}.2"] + sent[f"{net}.3"] == 50
    assert _map_drops(pdir, lab.host_v6(0)) == sent6[lab.host_v6(0)] == 40
    blocklist.apply(conn, s)
    assert queries.get_entry(conn, f"{net}.0/24")["drops"] == 50
    assert queries.get_entry(conn, f"{lab.host_v6(0)}/128")["drops"] == 40
    conn.close()


def _peer_mac(lab) -> str:
    return lab.run("cat", f"/sys/class/net/{lab.peer_interface}/address").stdout.strip()


@pytest.mark.kernel
def test_expiry_lifts_the_block_and_escalation_on_repeat(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root, base_ttl_seconds=600.0, escalation=2.0)
    conn = connect(s.general.db)
    src = lab.host_v4(2)
    eid = add_evaluation(conn, [scan(src, port=22)])
    decisions, results = blocklist.after_evaluation(conn, s, eid)
    [d] = decisions
    assert d.action == "block" and d.ttl_seconds == 600 and results[0].added == [f"{src}/32"]
    with UdpSink(lab.root_v4, 7300) as sink:
        send_udp(lab, src, lab.root_v4, 7300, 10)
        assert sink.drain() == {}
        [r] = blocklist.apply(conn, s, now=d.expires_at + 1)         # ten minutes later
        assert r.expired == [f"{src}/32"] and r.removed == [f"{src}/32"] and r.drops == 10 and r.entries == 0
        assert _map_drops(pdir, src) is None
        send_udp(lab, src, lab.root_v4, 7300, 12)
        assert sink.drain() == {src: 12}              # traffic flows again
        # it scans again: the second block lasts twice as long
        eid = add_evaluation(conn, [scan(src, port=22)])
        [d2], _ = blocklist.after_evaluation(conn, s, eid, now=d.expires_at + 120)
        assert (d2.action, d2.offences, d2.ttl_seconds) == ("block", 2, 1200)
        send_udp(lab, src, lab.root_v4, 7300, 9)
        assert sink.drain() == {}
    blocklist.apply(conn, s, now=d.expires_at + 130)
    row = queries.get_entry(conn, f"{src}/32")
    assert (row["status"], row["offences"], row["drops"]) == ("active", 2, 19)
    assert [a for _, a in events(conn)] == ["block", "map-add", "expire", "map-remove", "block", "map-add"]
    conn.close()


@pytest.mark.kernel
def test_local_and_allowlisted_sources_are_never_blocked(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root, allowlist=[lab.host_v4(1)])
    conn = connect(s.general.db)
    eid = add_evaluation(conn, [scan(lab.root_v4), scan(lab.host_v4(1)), scan(lab.root_v6),
                                dict(detector="syn_flood", port=80, source="127.0.0.1")])
    decisions, [r] = blocklist.after_evaluation(conn, s, eid)
    assert [d.action for d in decisions] == ["refused"] * 4
    assert r.entries == 0 and _bpftool_entries(pdir) == 0
    assert queries.entries(conn, None) == []
    with UdpSink(lab.root_v4, 7400) as sink:
        send_udp(lab, lab.host_v4(1), lab.root_v4, 7400, 8)
        assert sink.drain() == {lab.host_v4(1): 8}
    # dry-run: a would-block is recorded and the map stays untouched
    s.blocklist.dry_run = True
    eid = add_evaluation(conn, [scan(lab.host_v4(3))])
    [d], [r] = blocklist.after_evaluation(conn, s, eid)
    assert d.action == "would-block" and r.entries == 0 and _bpftool_entries(pdir) == 0
    conn.close()


@pytest.mark.kernel
def test_reconcile_after_hand_flush_with_bpftool(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root)
    conn = connect(s.general.db)
    a, b = lab.host_v4(0), lab.host_v6(1)
    blocklist.add_manual(conn, s, a)
    blocklist.add_manual(conn, s, b)
    blocklist.apply(conn, s)
    with UdpSink(lab.root_v4, 7500) as sink:
        send_udp(lab, a, lab.root_v4, 7500, 40)
        assert sink.drain() == {}
    assert blocklist.apply(conn, s)[0].drops == 40
    # an operator empties the map by hand: one entry with bpftool, the other through libbpf
    key = blocklist.lpm_key(parse_network(a))
    subprocess.run(["bpftool", "map", "delete", "pinned", str(pdir / "blacklist"), "key", "hex",
                    *(f"{x:02x}" for x in key)], check=True, capture_output=True)
    with maps.PinnedMap(pdir / "blacklist") as m:
        assert m.delete(blocklist.lpm_key(parse_network(b)))
    assert _bpftool_entries(pdir) == 0
    # an unknown entry someone added by hand is removed too
    with maps.PinnedMap(pdir / "blacklist") as m:
        m.update(blocklist.lpm_key(parse_network(lab.host_v4(3))), bytes(bpf_structs.PwBlacklistValue()))
    with UdpSink(lab.root_v4, 7500) as sink:
        send_udp(lab, a, lab.root_v4, 7500, 5)
        assert sink.drain() == {a: 5}                 # unprotected while the map was empty
        collect(s, lab)                               # the collector's reconcile puts both back
        assert _bpftool_entries(pdir) == 2
        send_udp(lab, a, lab.root_v4, 7500, 25)
        send_udp(lab, lab.host_v4(3), lab.root_v4, 7500, 3)
        assert sink.drain() == {lab.host_v4(3): 3}
    [r] = blocklist.apply(conn, s)
    assert r.drops == 25
    assert queries.get_entry(conn, f"{a}/32")["drops"] == 65
    assert (f"{a}/32", "reconcile-add") in events(conn) and (f"{b}/128", "reconcile-add") in events(conn)
    assert (f"{lab.host_v4(3)}/32", "reconcile-remove") in events(conn)
    conn.close()


@pytest.mark.kernel
def test_reconcile_after_program_reload_and_map_recreation(lab, tmp_path, pin_root):
    s, pdir = _loaded(lab, tmp_path, pin_root)
    conn = connect(s.general.db)
    src = lab.host_v4(0)
    blocklist.add_manual(conn, s, src)
    collect(s, lab)                                   # the collector enforces the new entry
    sent = 0
    with UdpSink(lab.root_v4, 7600) as sink:
        sent += send_udp(lab, src, lab.root_v4, 7600, 20)
        s.collector.extra_cflags = "-DPW_BUILD_REVISION=2"   # a new build: reloaded, pinned maps kept
        collect(s, lab)
        sent += send_udp(lab, src, lab.root_v4, 7600, 30)
        s.collector.blacklist_map_size = 8192         # a new map size: maps recreated empty, entry re-added
        collect(s, lab)
        assert _map_drops(pdir, src) == 0
        sent += send_udp(lab, src, lab.root_v4, 7600, 40)
        assert sink.drain() == {}
    collect(s, lab)
    reasons = [r[0] for r in conn.execute("SELECT reason FROM xdp_loads ORDER BY id")]
    assert reasons == ["first-load", "source-changed", "maps-recreated"]
    row = queries.get_entry(conn, f"{src}/32")
    assert row["drops"] == sent == 90
    assert conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?", (f"{src}/32",)).fetchone()[0] == 90
    assert (f"{src}/32", "reconcile-add") in events(conn)
    conn.close()


@pytest.mark.kernel
def test_port_scan_evaluated_then_blocked_end_to_end(lab, tmp_path, pin_root):
    """Real collector rounds, a SYN scan from one lab host, the real evaluator, then the blocklist."""
    from app.services import evaluation
    s, pdir = _loaded(lab, tmp_path, pin_root)
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
    decisions, [r] = blocklist.after_evaluation(conn, s, result.evaluation_id)
    assert [d.address for d in decisions if d.action == "block"] == [f"{scanner}/32"]
    assert r.added == [f"{scanner}/32"] and r.entries == 1
    with UdpSink(lab.root_v4, 7800) as sink:
        send_udp(lab, scanner, lab.root_v4, 7800, 15)
        send_udp(lab, benign, lab.root_v4, 7800, 10)
        assert sink.drain() == {benign: 10}           # the scanner is cut off, the benign host is not
    assert blocklist.apply(conn, s)[0].drops == 15
    row = queries.get_entry(conn, f"{scanner}/32")
    assert row["origin"] == "auto" and row["anomaly_id"] == decisions[0].anomaly_id and "port scan" in row["reason"]
    conn.close()
