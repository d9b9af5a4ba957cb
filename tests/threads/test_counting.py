"""Counting that cannot be dodged (issue 9 item 5), through the real XDP program in network namespaces:
IPv4-mapped IPv6 sources stay IPv6, fragment scans (nmap -f) are visible per source, LRU evictions
and new sources are stored per round, per-source TTL ranges, and the per-port SYN limit.
Frames are crafted with scapy (or sent by nmap) in the peer namespace; every assertion is an exact
number read back from a real SQLite file (root + kernel)."""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from app.services.kernel import synlimit
from tests.helpers import collect, make_settings

pytestmark = pytest.mark.kernel

SCAPY = r'''
import logging, sys
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import Ether, IP, IPv6, TCP, UDP, Raw, sendp, get_if_hwaddr, conf
conf.verb = 0
iface, dst_mac = sys.argv[1], sys.argv[2]
src_mac = get_if_hwaddr(iface)
def E():
    return Ether(src=src_mac, dst=dst_mac)
frames = eval(sys.argv[3])
sendp(frames, iface=iface, verbose=False)
print(len(frames))
'''


def send_frames(lab, expr: str) -> int:
    """Send the scapy frames of python expression ``expr`` (E() is the Ethernet header) from the peer."""
    root_mac = Path(f"/sys/class/net/{lab.interface}/address").read_text().strip()
    out = lab.run(sys.executable, "-c", SCAPY, lab.peer_interface, root_mac, expr, timeout=120)
    return int(out.stdout.strip())


def db(settings):
    conn = sqlite3.connect(settings.general.db)
    conn.row_factory = sqlite3.Row
    return conn


def last_round(conn):
    return conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()


def source_row(conn, round_id, address):
    return conn.execute("SELECT * FROM source_stats WHERE round_id = ? AND address = ?", (round_id, address)).fetchone()


def test_ipv4_mapped_ipv6_sources_stay_ipv6_in_counts_and_in_the_blacklist(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    v4 = f"198.18.{lab.subnet}.50"
    mapped = f"::ffff:{v4}"
    both = (f'[E()/IPv6(src="{mapped}", dst="{lab.root_v6}")/UDP(sport=40000, dport=5100)/Raw(b"m"*10)] * 7'
            f' + [E()/IP(src="{v4}", dst="{lab.root_v4}")/UDP(sport=40000, dport=5100)/Raw(b"4"*10)] * 5')
    assert send_frames(lab, both) == 12
    collect(s, lab)
    conn = db(s)
    rid = last_round(conn)["id"]
    assert source_row(conn, rid, mapped)["packets"] == 7          # stored as IPv6 text
    assert source_row(conn, rid, v4)["packets"] == 5              # the IPv4 host: only its own packets
    # a blacklist entry for the IPv4 host drops its packets, never the IPv6 ::ffff: ones
    # (through the ledger: a collector run reconciles the map before its round, so an entry written by
    # hand would be gone before the round read its drops)
    from app.db.connection import connect
    from app.services.blocklist import blocklist
    from app.services.kernel import enforcement
    ledger = connect(s.general.db)
    blocklist.add_manual(ledger, s, v4, reason="test")
    enforcement.reconcile(ledger, s, Path(s.general.pin_root) / lab.interface)     # this lab's map only
    ledger.close()
    assert send_frames(lab, both) == 12
    collect(s, lab)
    r = last_round(conn)
    assert r["dropped_packets"] == 5
    assert source_row(conn, r["id"], mapped)["packets"] == 7
    assert source_row(conn, r["id"], v4) is None                  # dropped before any per-source counting
    assert [tuple(x) for x in conn.execute("SELECT address, drops FROM blacklist_drops WHERE round_id = ?",
                                           (r["id"],))] == [(f"{v4}/32", 5)]


def test_nmap_fragment_scan_is_visible_per_source(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    out = lab.run("nmap", "-f", "-sS", "-n", "-Pn", "--max-retries", "0", "-p", "7000-7149", "-e", lab.peer_interface,
                  lab.root_v4, timeout=180)
    assert "150 closed" in out.stdout or "Not shown: 150 closed" in out.stdout, out.stdout
    collect(s, lab)
    conn = db(s)
    r = last_round(conn)
    row = source_row(conn, r["id"], lab.peer_v4)
    # 150 probes of a 24-byte TCP header (SYN + MSS option) in 8-byte fragments: 3 fragments each; the
    # first fragment holds the ports, so every probed port is seen for this source
    assert row["distinct_ports"] == 150
    assert row["fragments"] == 450 and row["packets"] == 450
    assert r["short_fragments"] == 150
    assert r["unparsed_packets"] == 0
    ports = conn.execute("SELECT COUNT(*), MIN(port), MAX(port), SUM(packets) FROM source_ports WHERE round_id = ? "
                         "AND address = ?", (r["id"], lab.peer_v4)).fetchone()
    assert tuple(ports) == (150, 7000, 7149, 150)


def test_forged_source_flood_records_evictions_and_marks_the_round_incomplete(lab, tmp_path):
    s = make_settings(tmp_path, source_map_size=64, srcport_map_size=64)
    collect(s, lab)
    assert send_frames(lab, f'[E()/IP(src="{lab.host_v4(1)}", dst="{lab.root_v4}")/UDP(sport=40000, dport=5200)] * 3') == 3
    collect(s, lab)
    conn = db(s)
    quiet = last_round(conn)
    assert (quiet["source_evictions"], quiet["srcport_evictions"], quiet["per_source_incomplete"]) == (0, 0, 0)
    assert quiet["new_sources"] == 1
    # forged sources inside the lab's own /24, so this host's answers (ICMP port unreachable) route
    # back into the lab veth and nowhere else
    n = 240
    flood = (f'[E()/IP(src="198.18.{lab.subnet}.%d" % i, dst="{lab.root_v4}")/UDP(sport=40000, dport=5201) '
             f'for i in range(10, {10 + n})]')
    assert send_frames(lab, flood) == n
    collect(s, lab)
    r = last_round(conn)
    assert r["new_sources"] == n                                   # every forged source was new to the map
    assert r["source_entries"] <= 64 and r["srcport_entries"] <= 64
    # evictions = inserts - growth of the map
    assert r["source_evictions"] == n - (r["source_entries"] - quiet["source_entries"])
    assert r["srcport_evictions"] == n - (r["srcport_entries"] - quiet["srcport_entries"])
    assert r["source_evictions"] >= n - 64 and r["per_source_incomplete"] == 1
    assert conn.execute("SELECT SUM(value) FROM global_stats WHERE round_id = ? AND name = 'total'",
                        (r["id"],)).fetchone()[0] == n


def test_ttl_and_hop_limit_ranges_per_source_and_round(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    v4, v6 = lab.host_v4(1), lab.host_v6(1)
    frames = (f'[E()/IP(src="{v4}", dst="{lab.root_v4}", ttl=t)/UDP(sport=40000, dport=5300) for t in (50, 61, 55)]'
              f' + [E()/IPv6(src="{v6}", dst="{lab.root_v6}", hlim=h)/UDP(sport=40000, dport=5300) for h in (200, 33)]')
    assert send_frames(lab, frames) == 5
    collect(s, lab)
    conn = db(s)
    rid = last_round(conn)["id"]
    assert (source_row(conn, rid, v4)["ttl_min"], source_row(conn, rid, v4)["ttl_max"]) == (50, 61)
    assert (source_row(conn, rid, v6)["ttl_min"], source_row(conn, rid, v6)["ttl_max"]) == (33, 200)
    # the next round starts its own range
    assert send_frames(lab, f'[E()/IP(src="{v4}", dst="{lab.root_v4}", ttl=64)/UDP(sport=40000, dport=5300)] * 2') == 2
    collect(s, lab)
    rid = last_round(conn)["id"]
    row = source_row(conn, rid, v4)
    assert (row["packets"], row["ttl_min"], row["ttl_max"]) == (2, 64, 64)


def test_syn_limit_drops_exactly_the_syns_over_budget(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    synlimit.set_limit(pdir, 7300, per_second=20, ttl_seconds=600)
    syns = (f'[E()/IP(src="{lab.host_v4(2)}", dst="{lab.root_v4}")/TCP(sport=41000 + i, dport=7300, flags="S") '
            f'for i in range(50)]')
    # a SYN to another port and a non-SYN to the limited one pass untouched
    others = (f'[E()/IP(src="{lab.host_v4(2)}", dst="{lab.root_v4}")/TCP(sport=42000, dport=7301, flags="S")] * 5'
              f' + [E()/IP(src="{lab.host_v4(2)}", dst="{lab.root_v4}")/TCP(sport=42001, dport=7300, flags="A")] * 4')
    assert send_frames(lab, f"{syns} + {others}") == 59      # one sendp: well inside one one-second window
    collect(s, lab)
    conn = db(s)
    r = last_round(conn)
    assert r["syn_limited_packets"] == 30 and r["dropped_packets"] == 0
    syn = dict(conn.execute("SELECT p.value, ps.syn FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                            "WHERE ps.round_id = ? AND p.protocol = 'tcp'", (r["id"],)).fetchall())
    assert syn[7300] == 50 and syn[7301] == 5                  # counted before the drop
    [entry] = synlimit.list_limits(pdir)
    assert (entry.port, entry.per_second, entry.dropped) == (7300, 20, 30) and entry.expires_at is not None
    assert synlimit.clear_limit(pdir, 7300) and synlimit.list_limits(pdir) == []
    assert send_frames(lab, syns) == 50
    collect(s, lab)
    assert last_round(conn)["syn_limited_packets"] == 0
