"""portwatch and a real CrowdSec LAPI (Debian's crowdsec -no-cs on the loopback): the pull into the ledger,
interlocks, the push of portwatch's blocks as alerts, hand unblocks deleted there, an unreachable or
stalled LAPI, the bounded queue; and (kernel) host A's scan block enforced by host B's XDP with exact counts.
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path

import pytest

from app import config
from app.config import ConfigError
from app.db import blacklist as queries
from app.db import fleet as fleet_db
from app.db.connection import connect
from app.services.blocklist import blocklist, decisions
from app.services.host import local_addresses
from app.services.fleet import crowdsec, view
from app.services.fleet.lapi import go_duration
from app.services.kernel import enforcement
from tests.helpers import UdpSink, add_evaluation, blocklist_settings, collect, finding, send_udp

SCANNER = "198.18.150.66"


def scan(source, port=22):
    return finding("port_scan", source=source, port=port, sources=[source], rule="port scan",
                   summary=f"{source} scanned 40 ports")


def host(tmp_path, name, lapi=None, pin_root=None, bouncer=True, machine=True, **blocklist_keys):
    """Settings and an open database of one host (its own state dir, db, pin root)."""
    (tmp_path / name).mkdir()
    s = blocklist_settings(tmp_path / name, pin_root, **blocklist_keys)
    if lapi is not None:
        s.crowdsec.lapi_url = lapi.url
        if bouncer:
            s.crowdsec.bouncer_key = lapi.bouncer(f"portwatch-{name}")
        if machine:
            lapi.machine(f"portwatch-{name}", f"pw-{name}-secret")
            s.crowdsec.machine_id, s.crowdsec.machine_password = f"portwatch-{name}", f"pw-{name}-secret"
    return s, connect(s.general.db)


def prom_samples(path) -> dict:
    """{(name, sorted labels): value} of a textfile, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(sm.name, tuple(sorted(sm.labels.items()))): sm.value
            for f in text_string_to_metric_families(Path(path).read_text()) for sm in f.samples}


def events(conn, action):
    return [r["address"] for r in queries.events(conn) if r["action"] == action]


# --- no LAPI needed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("1h", 3600), ("1h4m36.5s", 3876.5), ("-3.6ms", -0.0036), ("4h0m0s", 14400),
                                          ("0", 0), ("250ms", 0.25), ("1.5h", 5400)])
def test_go_duration(text, seconds):
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "1d", "h", "1h 2m", "12"])
def test_go_duration_refuses(bad):
    with pytest.raises(ValueError):
        go_duration(bad)


def test_config_problems(tmp_path):
    s = blocklist_settings(tmp_path)
    c = s.crowdsec
    assert c.problems() == []                                   # off: nothing to check
    c.lapi_url = "ftp://x"
    assert any("must be http(s)" in p for p in c.problems())
    c.lapi_url, c.machine_id = "http://127.0.0.1:8080", "m"
    assert c.problems() == ["crowdsec.machine_id is set without crowdsec.machine_password"]
    c.machine_password, c.timeout_seconds, c.max_pending = "p", 0, 0
    assert len(c.problems()) == 2
    c.timeout_seconds, c.max_pending, c.machine_id = 2, 10, ""
    assert "neither crowdsec.bouncer_key" in c.problems()[0]
    c.bouncer_key, c.push_detectors = "k", ["port_scan", "bad name!"]
    assert "push_detectors" in c.problems()[0]


def test_unreachable_lapi_keeps_local_blocking_and_queues_bounded(tmp_path):
    s, conn = host(tmp_path, "a")
    with socket.socket() as closed:                              # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    s.crowdsec.lapi_url, s.crowdsec.bouncer_key = f"http://127.0.0.1:{port}", "k"
    s.crowdsec.machine_id, s.crowdsec.machine_password, s.crowdsec.max_pending = "m", "p", 2
    found = add_evaluation(conn, [scan(f"198.18.150.{i}") for i in (1, 2, 3)])
    assert [d.action for d in decisions.decide(conn, s, found, protection=decisions.Protection())] == ["block"] * 3
    r = crowdsec.sync_round(conn, s)
    assert "unreachable" in r.error and not r.pulled and r.queued == 3 and r.pending == 2
    assert fleet_db.push_counts(conn) == {"pending": 2, "dropped": 1}
    assert queries.count_status(conn, "active") == 3            # local blocking untouched
    assert crowdsec.status(conn)["lapi_down"] is True
    r = crowdsec.sync_round(conn, s)                             # nothing queued twice
    assert r.queued == 0 and r.pending == 2
    # the collector's round exports the sync state (read back with prometheus_client's parser)
    s.metrics.textfile_dir = str(tmp_path / "textfile")
    got = prom_samples(view.write_sync(conn, s))
    assert got[("portwatch_crowdsec_lapi_up", ())] == 0 and got[("portwatch_crowdsec_pending", ())] == 2
    assert got[("portwatch_crowdsec_dropped_total", ())] == 1 and got[("portwatch_crowdsec_pulled_total", ())] == 0
    assert got[("portwatch_crowdsec_enforced", ())] == 0         # the three blocks are local ('auto'), not crowdsec's
    assert math.isnan(got[("portwatch_crowdsec_last_pull_timestamp_seconds", ())])
    assert math.isnan(got[("portwatch_fleet_model_version", ())])
    assert got[("portwatch_fleet_models", (("origin", "fleet"),))] == 0
    conn.close()


def test_stalled_lapi_costs_the_round_at_most_max_seconds(tmp_path):
    """A LAPI that accepts the connection and never answers: every request times out, the round goes on."""
    s, conn = host(tmp_path, "a")
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)                                            # the kernel accepts; nobody answers
    accepted = []
    stop = threading.Event()

    def hold():
        stalled.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(stalled.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=hold)
    t.start()
    try:
        s.crowdsec.lapi_url = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        s.crowdsec.bouncer_key, s.crowdsec.machine_id, s.crowdsec.machine_password = "k", "m", "p"
        s.crowdsec.timeout_seconds, s.crowdsec.max_seconds = 1.0, 1.5
        blocklist.add_manual(conn, s, "198.18.150.9", protection=decisions.Protection())
        s.crowdsec.push_detectors = ["manual"]
        r = crowdsec.sync_round(conn, s)
        assert "timed out" in r.error and r.pending == 1
        assert r.seconds < s.crowdsec.max_seconds + 1.0          # the bound the collector relies on
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        stalled.close()
        conn.close()


# --- a real LAPI --------------------------------------------------------------------------------------

def test_pull_adds_renews_and_lifts_with_the_lapi(lapi, tmp_path):
    s, conn = host(tmp_path, "b", lapi, machine=False)
    lapi.add("198.18.151.7", "2h")
    lapi.add("198.18.152.0/24", "30m")
    lapi.add("2001:db8:99::/48", "1h")
    t0 = time.time()
    r = crowdsec.sync_round(conn, s)
    assert r.error is None and r.pulled and r.full and r.new == 3
    assert sorted(r.added) == ["198.18.151.7/32", "198.18.152.0/24", "2001:db8:99::/48"]
    row = queries.get_entry(conn, "198.18.151.7/32")
    assert (row["origin"], row["status"]) == ("crowdsec", "active")
    assert row["expires_at"] == pytest.approx(t0 + 7200, abs=30)
    assert queries.get_entry(conn, "198.18.152.0/24")["expires_at"] == pytest.approx(t0 + 1800, abs=30)
    r = crowdsec.sync_round(conn, s)                             # nothing new: a delta pull, no change
    assert r.pulled and not r.full and r.new == 0 and r.added == [] and r.lifted == []
    lapi.delete("198.18.151.7")
    r = crowdsec.sync_round(conn, s)
    assert r.deleted == 1 and r.lifted == ["198.18.151.7/32"]
    assert queries.get_entry(conn, "198.18.151.7/32")["status"] == "expired"
    assert events(conn, "crowdsec-lift") == ["198.18.151.7/32"]
    # a hand removal here is not undone by the decision still running there
    blocklist.remove_manual(conn, s, "198.18.152.0/24")
    assert crowdsec.sync_round(conn, s).added == []
    assert queries.get_entry(conn, "198.18.152.0/24")["status"] == "removed"
    st = crowdsec.status(conn)
    assert (st["decisions"], st["enforced"], st["lapi_down"], st["pulled_total"]) == (2, 1, False, 3)
    conn.close()


def test_interlocks_refuse_lapi_decisions_once(lapi, tmp_path, caplog):
    s, conn = host(tmp_path, "b", lapi, machine=False, allowlist=["198.18.153.0/24"])
    own = next(a for a in local_addresses() if ":" not in a and not a.startswith("127."))
    for value in ("127.0.0.1", own, "198.18.153.20", "198.18.154.20"):
        lapi.add(value)
    with caplog.at_level("WARNING", logger="app.services.fleet.crowdsec"):
        r = crowdsec.sync_round(conn, s)
        r2 = crowdsec.sync_round(conn, s)
    assert r.added == ["198.18.154.20/32"]
    assert dict(r.refused) == {"127.0.0.1/32": "overlaps 127.0.0.0/8 (loopback)",
                               f"{own}/32": f"overlaps {own}/32 (an address of this host)",
                               "198.18.153.20/32": "overlaps 198.18.153.0/24 (allowlisted)"}
    assert r2.refused == [] and r2.added == []                   # refused once, logged once
    assert sorted(events(conn, "crowdsec-refused")) == sorted(dict(r.refused))
    assert sum("refused the LAPI's decision" in m for m in caplog.messages) == 3
    assert [row["address"] for row in queries.entries(conn)] == ["198.18.154.20/32"]
    conn.close()


def test_decisions_wider_than_the_bound_are_refused_once(lapi, tmp_path, caplog):
    """A LAPI decision on a quarter of the Internet is not enforced; /16 (IPv4) and /32 (IPv6) still are."""
    s, conn = host(tmp_path, "b", lapi, machine=False)
    # (ranges clear of this machine's own addresses: the labs put 198.18/15 and 2001:db8::/32 on it)
    for value in ("128.0.0.0/2", "4000::/2", "203.0.0.0/15", "203.0.0.0/16", "3fff::/32", "3ffe::/31"):
        lapi.add(value)
    with caplog.at_level("WARNING", logger="app.services.fleet.crowdsec"):
        r = crowdsec.sync_round(conn, s)
        r2 = crowdsec.sync_round(conn, s)
    assert sorted(r.added) == ["203.0.0.0/16", "3fff::/32"]
    assert dict(r.refused) == {"128.0.0.0/2": "is wider than /16 (crowdsec.widest_prefix_ipv4)",
                               "4000::/2": "is wider than /32 (crowdsec.widest_prefix_ipv6)",
                               "203.0.0.0/15": "is wider than /16 (crowdsec.widest_prefix_ipv4)",
                               "3ffe::/31": "is wider than /32 (crowdsec.widest_prefix_ipv6)"}
    assert r2.refused == [] and r2.added == []                   # refused once, logged once
    assert sum("refused the LAPI's decision" in m for m in caplog.messages) == 4
    assert sorted(events(conn, "crowdsec-refused")) == sorted(dict(r.refused))
    assert sorted(row["address"] for row in queries.entries(conn)) == ["203.0.0.0/16", "3fff::/32"]
    assert crowdsec.status(conn)["refused"] == 4
    conn.close()
    # the bound is a setting (another host, /1 allowed); a value out of range is refused at load
    s2, conn2 = host(tmp_path, "c", lapi, machine=False)
    s2.crowdsec.widest_prefix_ipv4 = 1
    assert "128.0.0.0/2" in crowdsec.sync_round(conn2, s2).added
    conn2.close()
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(ConfigError, match="crowdsec.widest_prefix_ipv6"):
        config.load(tmp_path / "empty.toml", environ={"PORTWATCH_CROWDSEC_WIDEST_PREFIX_IPV6": "129"})


def test_scan_block_pushed_visible_in_cscli_and_hand_unblock_deletes_it(lapi, tmp_path):
    s, conn = host(tmp_path, "a", lapi, bouncer=False)
    s.blocklist.base_ttl_seconds = 5400.0
    found = add_evaluation(conn, [scan(SCANNER), finding("syn_flood", port=80, source="198.18.150.77")])
    s.crowdsec.push_detectors = ["port_scan"]                    # the SYN flood block stays local
    made = decisions.decide(conn, s, found, protection=decisions.Protection())
    assert [d.action for d in made] == ["block", "block"]
    r = crowdsec.sync_round(conn, s)
    assert (r.error, r.queued, r.pushed, r.pending) == (None, 1, 1, 0)
    [d] = lapi.decisions()
    assert (d["value"], d["scope"], d["type"], d["origin"], d["scenario"]) == (
        SCANNER, "Ip", "ban", "crowdsec", "portwatch/port_scan")
    assert d["message"] == f"{SCANNER} scanned 40 ports" and d["machine_id"] == "portwatch-a"
    assert go_duration(d["duration"]) == pytest.approx(5400, abs=30)
    assert crowdsec.sync_round(conn, s).pushed == 0              # pushed once
    blocklist.remove_manual(conn, s, SCANNER)
    r = crowdsec.sync_round(conn, s)
    assert (r.queued, r.deleted_there) == (1, 1)
    assert lapi.decisions() == []
    assert crowdsec.status(conn)["sent"] == 2 and crowdsec.status(conn)["pushed_total"] == 1
    conn.close()


def test_pushes_queued_while_down_are_sent_when_the_lapi_is_back(lapi, tmp_path):
    s, conn = host(tmp_path, "a", lapi, bouncer=False)
    url = s.crowdsec.lapi_url
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        s.crowdsec.lapi_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    found = add_evaluation(conn, [scan("198.18.150.31"), scan("198.18.150.32")])
    decisions.decide(conn, s, found, protection=decisions.Protection())
    assert crowdsec.sync_round(conn, s).pending == 2
    s.crowdsec.lapi_url = url
    r = crowdsec.sync_round(conn, s)
    assert (r.error, r.pushed, r.pending) == (None, 2, 0)
    assert sorted(d["value"] for d in lapi.decisions()) == ["198.18.150.31", "198.18.150.32"]
    conn.close()


# --- kernel: host A's block enforced by host B's XDP ------------------------------------------------------

def _drops(pdir: Path, cidr: str) -> int | None:
    from app.services.kernel import bpf_structs, maps
    with maps.PinnedMap(pdir / "blacklist") as m:
        raw = m.lookup(bpf_structs.lpm_key(enforcement.parse_network(cidr)))
    return None if raw is None else bpf_structs.PwBlacklistValue.from_buffer_copy(raw).drops


@pytest.mark.kernel
def test_host_a_scan_block_is_enforced_by_host_b_xdp(lapi, lab, tmp_path, pin_root):
    scanner, benign, allowed = lab.host_v4(2), lab.host_v4(0), lab.host_v4(1)
    # host A: no lab of its own needed; its database decides a scan block and its round pushes it
    a, conn_a = host(tmp_path, "a", lapi, bouncer=False)
    found = add_evaluation(conn_a, [scan(scanner)])
    [d] = decisions.decide(conn_a, a, found, protection=decisions.Protection())
    assert d.action == "block"
    assert crowdsec.sync_round(conn_a, a).pushed == 1
    assert [x["value"] for x in lapi.decisions()] == [scanner]
    # host B: XDP on the lab's interface; its next collector round pulls and enforces
    b, conn_b = host(tmp_path, "b", lapi, pin_root, machine=False, allowlist=[allowed])
    pdir = Path(b.general.pin_root) / lab.interface
    collect(b, lab)
    row = queries.get_entry(conn_b, f"{scanner}/32")
    assert (row["origin"], row["status"]) == ("crowdsec", "active")
    with UdpSink(lab.root_v4, 7900) as sink:
        assert send_udp(lab, scanner, lab.root_v4, 7900, 37) == 37
        assert send_udp(lab, benign, lab.root_v4, 7900, 11) == 11
        assert sink.drain() == {benign: 11}
        assert _drops(pdir, scanner) == 37
        collect(b, lab)
        assert queries.get_entry(conn_b, f"{scanner}/32")["drops"] == 37
        # deleted in the LAPI: lifted on B within a round, traffic flows again
        lapi.delete(scanner)
        collect(b, lab)
        assert queries.get_entry(conn_b, f"{scanner}/32")["status"] == "expired"
        assert _drops(pdir, scanner) is None
        assert send_udp(lab, scanner, lab.root_v4, 7900, 13) == 13
        assert sink.drain() == {scanner: 13}
        # decisions naming B's own address or an allowlisted one are refused on B
        lapi.add(lab.root_v4)
        lapi.add(allowed)
        collect(b, lab)
        collect(b, lab)
        assert sorted(events(conn_b, "crowdsec-refused")) == sorted([f"{lab.root_v4}/32", f"{allowed}/32"])
        assert queries.entries(conn_b) == []
        assert send_udp(lab, allowed, lab.root_v4, 7900, 9) == 9
        assert sink.drain() == {allowed: 9}
    conn_a.close()
    conn_b.close()


def test_fleet_status_shows_the_sync(lapi, tmp_path, capsys):
    from app.cli import main
    s, conn = host(tmp_path, "b", lapi)
    lapi.add("198.18.155.5")
    found = add_evaluation(conn, [scan("198.18.155.9")])
    decisions.decide(conn, s, found, protection=decisions.Protection())
    assert crowdsec.sync_round(conn, s).error is None
    conn.close()
    env = {"PORTWATCH_CROWDSEC_LAPI_URL": s.crowdsec.lapi_url, "PORTWATCH_CROWDSEC_BOUNCER_KEY": s.crowdsec.bouncer_key}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setenv("PORTWATCH_CONFIG", str(tmp_path / "b" / "none.toml"))
        mp.setenv("PORTWATCH_METRICS_TEXTFILE_DIR", str(tmp_path / "textfile"))
        assert main(["fleet", "status", "--json", "--db", s.general.db]) == 0
        state = json.loads(capsys.readouterr().out)
        assert main(["fleet", "status", "--db", s.general.db]) == 0
        text = capsys.readouterr().out
    cs = state["crowdsec"]
    # the round pulls before it pushes: the LAPI's one decision mirrored and enforced, its own block pushed
    assert (cs["lapi_down"], cs["decisions"], cs["enforced"], cs["pushed_total"], cs["pending"]) == (False, 1, 1, 1, 0)
    assert "crowdsec: LAPI reachable" in text and "pushed 1, 0 pending" in text
    got = prom_samples(tmp_path / "textfile" / "portwatch.prom")          # `fleet status` exports the same
    assert (got[("portwatch_crowdsec_lapi_up", ())], got[("portwatch_crowdsec_decisions", ())],
            got[("portwatch_crowdsec_enforced", ())], got[("portwatch_crowdsec_pushed_total", ())],
            got[("portwatch_crowdsec_pending", ())]) == (1, 1, 1, 1, 0)
    assert got[("portwatch_crowdsec_pulled_total", ())] == cs["pulled_total"] >= 1
    assert got[("portwatch_crowdsec_last_pull_timestamp_seconds", ())] == pytest.approx(cs["last_pull_at"])
