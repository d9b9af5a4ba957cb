"""The collector's round logic over FAKE pinned maps (no root, no kernel): differences, restarts,
evictions, snapshots across runs, per-CPU sums, payload extremes by epoch, many-port detail.

The same logic against the real XDP program is tests/threads/test_collection.py (kernel).
"""
from __future__ import annotations

import sqlite3

import pytest

from app.db.connection import connect
from app.services.kernel import maps
from app.services.kernel.bpf_structs import (GLOBAL_NAMES, PwAddr, PwBlacklistValue, PwConfig, PwFlowKey, PwFlowValue,
                                      PwGlobal, PwPortKey, PwPortValue, PwSourceValue, PwSrcportKey, addr_bytes,
                                      lpm_key)
from app.services.collector.collector import Collector, Observations
from tests.fakes import fake_maps
from tests.helpers import make_settings

TCP, UDP = 6, 17
INDEX_0 = bytes(4)


def addr(text: str) -> PwAddr:
    return PwAddr.from_buffer_copy(addr_bytes(text))


def port_key(port: int, proto: int) -> bytes:
    return bytes(PwPortKey(port=port, proto=proto))


def srcport_key(src: str, port: int, proto: int) -> bytes:
    return bytes(PwSrcportKey(src=addr(src), port=port, proto=proto))


def flow_key(src: str, sport: int, dst: str, dport: int, proto: int) -> bytes:
    return bytes(PwFlowKey(src=addr(src), dst=addr(dst), sport=sport, dport=dport, proto=proto))


def global_value(**counts: int) -> PwGlobal:
    g = PwGlobal()
    for name, value in counts.items():
        g.c[GLOBAL_NAMES.index(name)] = value
    return g


def collector_on(tmp_path, fakes, **collector_settings) -> Collector:
    """A Collector writing to tmp_path's database and reading ``fakes`` (what open() would set up)."""
    s = make_settings(tmp_path, **collector_settings)
    s.general.pin_root = str(tmp_path / "no-pins")
    c = Collector(s, "fake0")
    c.conn = connect(c.db_path)
    c._maps = fakes
    c._born = {m.info.id for m in fakes.values()}             # fresh maps, as a first load creates them
    return c


@pytest.fixture
def fakes():
    return fake_maps(ncpu=2)


def rows(c: Collector, sql: str, *args) -> list[tuple]:
    conn = sqlite3.connect(c.db_path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def port_rows(c, round_id):
    return rows(c, "SELECT p.value, p.protocol, ps.packets, ps.bytes, ps.min_payload, ps.max_payload FROM port_stats ps "
                   "JOIN ports p ON p.id = ps.port_id WHERE ps.round_id = ? ORDER BY p.value", round_id)


def test_rounds_record_per_cpu_sums_then_only_the_differences(tmp_path, fakes):
    # round epoch 0 (the config map's zeroed value): the payload extremes of this round
    fakes["port_stats"].put(port_key(443, TCP), PwPortValue(packets=3, bytes=300, round_min=10, round_max=90),
                            PwPortValue(packets=2, bytes=200, round_min=5, round_max=60))
    fakes["port_stats"].put(port_key(53, UDP), PwPortValue(packets=1, bytes=90, round_min=48, round_max=48))
    fakes["sources"].put(bytes(addr("198.18.20.2")), PwSourceValue(packets=4, bytes=400), PwSourceValue(packets=1))
    fakes["sources"].put(bytes(addr("2001:db8::")), PwSourceValue(packets=1, bytes=90))   # trailing NUL bytes
    fakes["global"].put(INDEX_0, global_value(total=6, bytes=990, parsed=5), global_value(total=1, parsed=1))
    c = collector_on(tmp_path, fakes)
    try:
        first = c.close_round(0.0, Observations())
        assert (first.packets, first.bytes, first.active_ports, first.sources) == (7, 990, 2, 2)
        assert port_rows(c, first.round_id) == [(53, "udp", 1, 90, 48, 48), (443, "tcp", 5, 500, 5, 90)]
        assert rows(c, "SELECT address, packets, bytes FROM source_stats WHERE round_id = ? ORDER BY address",
                    first.round_id) == [("198.18.20.2", 5, 400), ("2001:db8::", 1, 90)]

        fakes["port_stats"].put(port_key(443, TCP), PwPortValue(packets=10, bytes=1000, round_min=7, round_max=8, epoch=1),
                                PwPortValue(packets=2, bytes=200, round_min=5, round_max=60))   # cpu1: no packet in epoch 1
        fakes["global"].put(INDEX_0, global_value(total=13, bytes=1690, parsed=12), global_value(total=1, parsed=1))
        second = c.close_round(1.0, Observations())
        # 53/udp and both sources did not change: no rows; 443/tcp: (10 + 2) - (3 + 2)
        assert port_rows(c, second.round_id) == [(443, "tcp", 7, 700, 7, 8)]
        assert rows(c, "SELECT COUNT(*) FROM source_stats WHERE round_id = ?", second.round_id) == [(0,)]
        assert dict(rows(c, "SELECT name, value FROM global_stats WHERE round_id = ?", second.round_id))["total"] == 7
        assert rows(c, "SELECT total_packets, port_entries, source_entries FROM rounds WHERE id = ?",
                    second.round_id) == [(7, 2, 2)]
    finally:
        c.close()


def test_a_key_whose_counters_went_backwards_counts_whole(tmp_path, fakes):
    key = bytes(addr("198.18.20.3"))
    fakes["sources"].put(key, PwSourceValue(packets=100, bytes=10000))
    c = collector_on(tmp_path, fakes)
    try:
        c.close_round(0.0, Observations())
        fakes["sources"].evict(key)                                # evicted, then seen again
        fakes["sources"].put(key, PwSourceValue(packets=4, bytes=400))
        second = c.close_round(1.0, Observations())
        assert rows(c, "SELECT address, packets, bytes FROM source_stats WHERE round_id = ?",
                    second.round_id) == [("198.18.20.3", 4, 400)]
    finally:
        c.close()


def test_evictions_are_inserts_minus_growth(tmp_path, fakes):
    flows = fakes["flows"]
    keys = [flow_key("198.18.20.2", 40000 + i, "198.18.20.1", 80, TCP) for i in range(7)]
    for k in keys[:3]:
        flows.put(k, PwFlowValue(packets=1, bytes=60))
    fakes["global"].put(INDEX_0, global_value(flow_inserts=3, srcport_inserts=0))
    c = collector_on(tmp_path, fakes)
    try:
        c.close_round(0.0, Observations())
        flows.evict(keys[0])
        flows.evict(keys[1])
        for k in keys[3:]:                                         # 4 new keys, 2 evicted: growth 2
            flows.put(k, PwFlowValue(packets=1, bytes=60))
        fakes["global"].put(INDEX_0, global_value(flow_inserts=7))
        second = c.close_round(1.0, Observations())
        assert rows(c, "SELECT flow_entries, flow_evictions, srcport_evictions FROM rounds WHERE id = ?",
                    second.round_id) == [(5, 2, 0)]
    finally:
        c.close()


def test_the_snapshot_carries_counts_over_to_the_next_run(tmp_path, fakes):
    fakes["port_stats"].put(port_key(5001, UDP), PwPortValue(packets=30, bytes=3000))
    first_run = collector_on(tmp_path, fakes)
    first = first_run.close_round(0.0, Observations())
    first_run.close()
    end_of_first = rows(first_run, "SELECT end_time FROM rounds WHERE id = ?", first.round_id)[0][0]
    snaps = rows(first_run, "SELECT map_name, entries, round_id FROM counter_snapshots WHERE interface = 'fake0' "
                            "ORDER BY map_name")
    assert ("port_stats", 1, first.round_id) in snaps and len(snaps) == 6

    fakes["port_stats"].put(port_key(5001, UDP), PwPortValue(packets=42, bytes=4200))
    second_run = collector_on(tmp_path, fakes)                      # a new process: only the database remembers
    try:
        second = second_run.close_round(5.0, Observations())
        assert port_rows(second_run, second.round_id) == [(5001, "udp", 12, 1200, None, None)]
        assert rows(second_run, "SELECT counts_since FROM rounds WHERE id = ?", second.round_id) == [(end_of_first,)]
    finally:
        second_run.close()


def test_payload_extremes_come_from_this_epoch_and_the_epoch_advances(tmp_path, fakes):
    fakes["config"].update(INDEX_0, bytes(PwConfig(epoch=7)))
    fakes["port_stats"].put(port_key(8080, TCP), PwPortValue(packets=3, round_min=10, round_max=40, epoch=7),
                            PwPortValue(packets=2, round_min=1, round_max=900, epoch=6))
    c = collector_on(tmp_path, fakes)
    try:
        first = c.close_round(0.0, Observations())
        assert port_rows(c, first.round_id) == [(8080, "tcp", 5, 0, 10, 40)]
        assert maps.read_struct(fakes["config"], maps.INDEX_0, PwConfig).epoch == 8
    finally:
        c.close()


def test_a_many_port_source_keeps_its_ports_and_flows(tmp_path, fakes):
    scanner, talker, here = "198.18.20.0", "2001:db8:18:20::", "198.18.20.1"   # both end in NUL bytes
    for port in (1001, 1002, 1003):
        fakes["srcports"].put(srcport_key(scanner, port, TCP), 1, 1)
        fakes["flows"].put(flow_key(scanner, 50000, here, port, TCP), PwFlowValue(packets=2, bytes=120, tcp_flags=2))
    fakes["srcports"].put(srcport_key(talker, 443, TCP), 9)
    fakes["flows"].put(flow_key(talker, 40000, "2001:db8:18:20::1", 443, TCP), PwFlowValue(packets=9, bytes=9000))
    fakes["sources"].put(bytes(addr(scanner)), PwSourceValue(packets=6, bytes=360, syn=6))
    fakes["sources"].put(bytes(addr(talker)), PwSourceValue(packets=9, bytes=9000))
    c = collector_on(tmp_path, fakes, many_ports_threshold=3, top_flows=1)
    try:
        r = c.close_round(0.0, Observations())
        assert rows(c, "SELECT address, distinct_ports FROM source_stats WHERE round_id = ? ORDER BY address",
                    r.round_id) == [("198.18.20.0", 3), ("2001:db8:18:20::", 1)]
        assert rows(c, "SELECT address, port, protocol, packets FROM source_ports WHERE round_id = ? ORDER BY port",
                    r.round_id) == [(scanner, 1001, "tcp", 2), (scanner, 1002, "tcp", 2), (scanner, 1003, "tcp", 2)]
        assert rows(c, "SELECT src_address, src_port, dst_address, dst_port, protocol, packets, bytes, tcp_flags, "
                       "reason FROM flows WHERE round_id = ? ORDER BY bytes DESC, dst_port", r.round_id) == [
            (talker, 40000, "2001:db8:18:20::1", 443, "tcp", 9, 9000, 0, "top"),
            (scanner, 50000, here, 1001, "tcp", 2, 120, 2, "many-ports"),
            (scanner, 50000, here, 1002, "tcp", 2, 120, 2, "many-ports"),
            (scanner, 50000, here, 1003, "tcp", 2, 120, 2, "many-ports")]
    finally:
        c.close()


def test_blacklist_drops_are_recorded_per_prefix(tmp_path, fakes):
    import ipaddress
    fakes["blacklist"].put(lpm_key(ipaddress.ip_network("198.18.20.0/24")), PwBlacklistValue(drops=5, drop_bytes=300))
    fakes["blacklist"].put(lpm_key(ipaddress.ip_network("2001:db8:18::/48")), PwBlacklistValue())
    c = collector_on(tmp_path, fakes)
    try:
        r = c.close_round(0.0, Observations())
        assert rows(c, "SELECT address, drops FROM blacklist_drops WHERE round_id = ?", r.round_id) == [
            ("198.18.20.0/24", 5)]
        assert rows(c, "SELECT blacklist_entries FROM rounds WHERE id = ?", r.round_id) == [(2,)]
    finally:
        c.close()
