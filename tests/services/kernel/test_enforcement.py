"""Enforcement: the ledger ⇄ the pinned XDP map. The LPM key layout; the collector's import path
never loads the decisions; and the real map in network namespaces (kernel): drops with exact counts,
prefixes, IPv6, reconcile after a hand flush (bpftool) and after program reloads.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import subprocess
import sys

import pytest

from app.db import blacklist as queries
from app.db.connection import connect
from app.errors import UsageError
from app.services.blocklist import blocklist
from app.services.kernel import enforcement
from app.services.kernel import bpf_structs, egress, maps
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
    assert key[:4] == (128).to_bytes(4, "little") and key[4:24] == bpf_structs.addr_bytes("198.18.3.0")
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


# --- kernel: what a drop costs, for every entry -------------------------------------------------------

DROP_BOUND_NS = 1000         # a drop is a trie lookup and two counters: tens of ns, never microseconds


def _random_addresses(rng: random.Random, n: int) -> list[str]:
    """n/2 IPv4 addresses in 198.19.0.0/16 and n/2 IPv6 addresses in 2001:db8:ff00::/40, all distinct."""
    v4 = {str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.19.0.0")) + rng.randrange(1, 1 << 16)))
          for _ in range(n)}
    v6 = {str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8:ff00::")) + rng.getrandbits(88)))
          for _ in range(n)}
    return sorted(v4)[:n // 2] + sorted(v6)[:n // 2]


def _frame(src: str, dst: str, flags: str | None = None, smac="02:00:00:00:00:02", dmac="02:00:00:00:00:01") -> bytes:
    """A UDP (or, with ``flags``, TCP) frame from src to dst, 64-ish bytes, built with scapy."""
    from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw
    l3 = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    l4 = TCP(sport=40000, dport=22, flags=flags, seq=1000, ack=2000 if "A" in flags else 0) if flags else UDP(sport=40000, dport=9)
    return bytes(Ether(src=smac, dst=dmac) / l3 / l4 / Raw(b"p" * 18))


def _best_ns(prog_pin, frame: bytes, want_retval: int, target: float = 0.0, tries: int = 5,
             repeat: int = 2000) -> float:
    """Best ns/run of up to ``tries`` BPF_PROG_TEST_RUN batches of ``repeat`` runs, stopping once at or
    under ``target`` (other processes share the CPUs: a disturbed batch is retried, so only a path
    that is slow every time fails); every run returned ``want_retval``."""
    from app.lab import prog_run
    best = float("inf")
    for _ in range(tries):
        retval, ns = prog_run(prog_pin, frame, repeat)
        assert retval == want_retval, f"{prog_pin.name}: return code {retval}, expected {want_retval}"
        best = min(best, ns)
        if best <= target:
            break
    return best


@pytest.mark.kernel
def test_every_blocked_address_drops_in_tens_of_ns_ingress_and_egress(lab, tmp_path, pin_root):
    """64 random IPv4 and IPv6 addresses blocked both ways: a frame from (to) each runs through the loaded
    XDP (TC egress) program: every drop under 1 µs and never slower than the pass path."""
    s, pdir = loaded(lab, tmp_path, pin_root, egress_block_enabled=True)
    seed = int.from_bytes(os.urandom(4), "little")
    blocked = _random_addresses(random.Random(seed), 64)
    conn = connect(s.general.db)
    for address in blocked:
        blocklist.add_manual(conn, s, address, reason="drop cost")
    [result] = enforcement.apply(conn, s)
    assert result.entries == 64
    conn.close()
    with maps.PinnedMap(pdir / enforcement.EGRESS_MAP) as eg_block:
        for address in blocked:              # straight into the map (the ledger's egress rows are not the point)
            enforcement.write_entry(eg_block, parse_network(address))
    xdp, tc = pdir / "prog", pdir / egress.PROG_PIN
    XDP_DROP, XDP_PASS, TC_ACT_OK, TC_ACT_SHOT = 1, 2, 0, 2
    passing = {f"{kind} {fam}": (_best_ns(xdp, _frame(src, dst, flags), XDP_PASS),
                                 _best_ns(tc, _frame(dst, src, flags), TC_ACT_OK))
               for fam, src, dst in (("v4", lab.host_v4(1), lab.root_v4), ("v6", lab.host_v6(1), lab.root_v6))
               for kind, flags in (("udp", None), ("syn", "S"), ("ack", "A"))}
    pass_xdp = min(x for x, _ in passing.values())
    pass_tc = min(t for _, t in passing.values())
    slow = []
    for address in blocked:
        local = lab.root_v6 if ":" in address else lab.root_v4
        drop_xdp = _best_ns(xdp, _frame(address, local), XDP_DROP, min(DROP_BOUND_NS, pass_xdp))
        drop_tc = _best_ns(tc, _frame(local, address), TC_ACT_SHOT, min(DROP_BOUND_NS, pass_tc))
        if drop_xdp >= DROP_BOUND_NS or drop_xdp > pass_xdp or drop_tc >= DROP_BOUND_NS or drop_tc > pass_tc:
            slow.append((address, drop_xdp, drop_tc))
    assert slow == [], (f"seed {seed}: drops (address, XDP ns, TC ns) over {DROP_BOUND_NS} ns or slower than "
                        f"the pass path (XDP {pass_xdp:.0f} ns, TC {pass_tc:.0f} ns): {slow}")
    # every drop was counted in its own entry: the counters the atomics update are the right ones
    with maps.PinnedMap(pdir / "blacklist") as m:
        assert all(_drops(m, a) >= 2000 for a in blocked)
    egress_drops = enforcement.map_drops(pdir / enforcement.EGRESS_MAP)
    assert all(n >= 2000 for n in egress_drops.values()) and len(egress_drops) == 64


def _drops(m, address: str) -> int:
    raw = m.lookup(bpf_structs.lpm_key(parse_network(address)))
    return bpf_structs.PwBlacklistValue.from_buffer_copy(raw[:ctypes.sizeof(bpf_structs.PwBlacklistValue)]).drops
