"""Enforcement: the ledger ⇄ the pinned XDP map. The LPM key layout; the collector's import path
never loads the decisions; and the real map in network namespaces (kernel): drops with exact counts,
prefixes, IPv6, reconcile after a hand flush (bpftool) and after program reloads.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from app.db import blacklist as queries
from app.db.connection import connect
from app.errors import UsageError
from app.services.blocklist import blocklist
from app.services.kernel import enforcement
from app.services.kernel import bpf_structs, maps
from app.services.kernel.enforcement import parse_network
from tests.helpers import (REPO, UdpSink, bpftool_entries, collect, ledger_events, loaded, map_drops,  # noqa: F401
                           pin_root, send_udp)


def test_collector_path_never_imports_the_decisions():
    code = ("import sys, app.services.collector.collector, app.services.kernel.enforcement; "
            "print('app.services.blocklist.decisions' in sys.modules, 'app.services.evaluation.findings' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_lpm_key_layout():
    key = bpf_structs.lpm_key(parse_network("198.18.3.0/24"))
    # prefixlen counts the family byte: 8 + 96 + 24 for an IPv4 /24, 8 + 64 for an IPv6 /64
    assert key[:4] == (128).to_bytes(4, "little") and key[4:] == bpf_structs.addr_bytes("198.18.3.0")
    assert bpf_structs.lpm_key(parse_network("2001:db8::/64"))[:4] == (72).to_bytes(4, "little")


# --- kernel: the real XDP map -------------------------------------------------------------------------


@pytest.mark.kernel
def test_blocked_source_is_dropped_exactly_others_pass(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    conn = connect(s.general.db)
    blocked, other = lab.host_v4(0), lab.host_v4(1)
    blocklist.add_manual(conn, s, blocked, reason="test")
    [result] = enforcement.apply(conn, s)
    assert result.interface == lab.interface and result.added == [f"{blocked}/32"] and result.entries == 1
    with UdpSink(lab.root_v4, 7100) as sink:
        assert send_udp(lab, blocked, lab.root_v4, 7100, 60) == 60
        assert send_udp(lab, other, lab.root_v4, 7100, 25) == 25
        assert sink.drain() == {other: 25}            # nothing from the blocked source reached the stack
    assert map_drops(pdir, blocked) == 60
    assert enforcement.reconcile(conn, s, pdir).drops == 60
    assert enforcement.reconcile(conn, s, pdir).drops == 0          # counted once
    collect(s, lab)                                   # the collector's round and its own reconcile
    assert queries.get_entry(conn, f"{blocked}/32")["drops"] == 60
    assert conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?", (f"{blocked}/32",)).fetchone()[0] == 60
    assert conn.execute("SELECT SUM(packets) FROM source_stats WHERE address = ?", (other,)).fetchone()[0] == 25
    assert conn.execute("SELECT COUNT(*) FROM source_stats WHERE address = ?", (blocked,)).fetchone()[0] == 0
    conn.close()


@pytest.mark.kernel
def test_prefix_and_ipv6_entries(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
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
    [result] = enforcement.apply(conn, s)
    assert sorted(result.added) == sorted([f"{net}.0/24", f"{lab.host_v6(0)}/128"])
    with UdpSink(lab.root_v4, 7200) as sink4, UdpSink(lab.root_v6, 7200) as sink6:
        sent = {src: send_udp(lab, src, lab.root_v4, 7200, n) for src, n in ((f"{net}.2", 30), (f"{net}.3", 20),
                                                                             (lab.host_v4(0), 15))}
        sent6 = {src: send_udp(lab, src, lab.root_v6, 7200, n) for src, n in ((lab.host_v6(0), 40), (lab.host_v6(1), 11))}
        assert sink4.drain() == {lab.host_v4(0): 15}
        assert sink6.drain() == {lab.host_v6(1): 11}
    assert map_drops(pdir, f"{net}.0/24") == sent[f"{net}.2"] + sent[f"{net}.3"] == 50
    assert map_drops(pdir, lab.host_v6(0)) == sent6[lab.host_v6(0)] == 40
    enforcement.apply(conn, s)
    assert queries.get_entry(conn, f"{net}.0/24")["drops"] == 50
    assert queries.get_entry(conn, f"{lab.host_v6(0)}/128")["drops"] == 40
    conn.close()


def _peer_mac(lab) -> str:
    return lab.run("cat", f"/sys/class/net/{lab.peer_interface}/address").stdout.strip()


@pytest.mark.kernel
def test_reconcile_after_hand_flush_with_bpftool(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
    conn = connect(s.general.db)
    a, b = lab.host_v4(0), lab.host_v6(1)
    blocklist.add_manual(conn, s, a)
    blocklist.add_manual(conn, s, b)
    enforcement.apply(conn, s)
    with UdpSink(lab.root_v4, 7500) as sink:
        send_udp(lab, a, lab.root_v4, 7500, 40)
        assert sink.drain() == {}
    assert enforcement.apply(conn, s)[0].drops == 40
    # an operator empties the map by hand: one entry with bpftool, the other through libbpf
    key = bpf_structs.lpm_key(parse_network(a))
    subprocess.run(["bpftool", "map", "delete", "pinned", str(pdir / "blacklist"), "key", "hex",
                    *(f"{x:02x}" for x in key)], check=True, capture_output=True)
    with maps.PinnedMap(pdir / "blacklist") as m:
        assert m.delete(bpf_structs.lpm_key(parse_network(b)))
    assert bpftool_entries(pdir) == 0
    # an unknown entry someone added by hand is removed too
    with maps.PinnedMap(pdir / "blacklist") as m:
        m.update(bpf_structs.lpm_key(parse_network(lab.host_v4(3))), bytes(bpf_structs.PwBlacklistValue()))
    with UdpSink(lab.root_v4, 7500) as sink:
        send_udp(lab, a, lab.root_v4, 7500, 5)
        assert sink.drain() == {a: 5}                 # unprotected while the map was empty
        collect(s, lab)                               # the collector's reconcile puts both back
        assert bpftool_entries(pdir) == 2
        send_udp(lab, a, lab.root_v4, 7500, 25)
        send_udp(lab, lab.host_v4(3), lab.root_v4, 7500, 3)
        assert sink.drain() == {lab.host_v4(3): 3}
    [r] = enforcement.apply(conn, s)
    assert r.drops == 25
    assert queries.get_entry(conn, f"{a}/32")["drops"] == 65
    assert (f"{a}/32", "reconcile-add") in ledger_events(conn) and (f"{b}/128", "reconcile-add") in ledger_events(conn)
    assert (f"{lab.host_v4(3)}/32", "reconcile-remove") in ledger_events(conn)
    conn.close()


@pytest.mark.kernel
def test_reconcile_after_program_reload_and_map_recreation(lab, tmp_path, pin_root):
    s, pdir = loaded(lab, tmp_path, pin_root)
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
        assert map_drops(pdir, src) == 0
        sent += send_udp(lab, src, lab.root_v4, 7600, 40)
        assert sink.drain() == {}
    collect(s, lab)
    reasons = [r[0] for r in conn.execute("SELECT reason FROM xdp_loads ORDER BY id")]
    assert reasons == ["first-load", "source-changed", "maps-recreated"]
    row = queries.get_entry(conn, f"{src}/32")
    assert row["drops"] == sent == 90
    assert conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?", (f"{src}/32",)).fetchone()[0] == 90
    assert (f"{src}/32", "map-prefill") in ledger_events(conn)      # in the new map before its program ran
    conn.close()
