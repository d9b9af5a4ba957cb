"""dns_tunnel as a pure function of hand-made batches (exact numbers), and its helpers."""
from __future__ import annotations

import json
import math
import random
import string
import time
from collections import Counter

import pytest

from app.config import Evaluator
from app.services.evaluation import dns_rules
from tests.services.evaluation.outbound_batches import T0, batch

CLIENT = "198.18.20.2"
RESOLVER = "198.18.20.1"
BASE32 = string.ascii_lowercase + "234567"


def tunnel_names(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(BASE32) for _ in range(30)) + "." + "".join(rng.choice(BASE32) for _ in range(22))
            + ".t.tunnel.test" for _ in range(n)]


def ordinary_names(n: int) -> list[str]:
    words = ["www", "mail", "api", "cdn", "static", "login", "news", "img", "shop", "blog"]
    sites = [f"site{i}.example" for i in range(20)]
    return [f"{words[k % 10]}.{sites[k // 10 % 20]}" for k in range(n)]


def rows(client, names, qtype=1, rcode=None, start_round=1, per_round=20, resolver=RESOLVER):
    """Queries (and, with rcode, one response each) spread ``per_round`` a round from start_round."""
    out = []
    for k, name in enumerate(names):
        round_id = start_round + k // per_round
        ts = T0 + 60.0 * (round_id - 1) + 1.0 + (k % per_round)
        out.append((round_id, ts, client, resolver, name, qtype, None, 0))
        if rcode is not None:
            out.append((round_id, ts + 0.01, resolver, client, name, qtype, rcode, 1))
    return out


def test_registered_domain_uses_the_public_suffix_list_offline():
    assert dns_rules.registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert dns_rules.registered_domain("X1.T.Tunnel.Test.") == "tunnel.test"      # unknown TLD: last two labels
    assert dns_rules.registered_domain("user.github.io") == "user.github.io"       # a private suffix's owner
    assert dns_rules.registered_domain("com") == "com"
    assert dns_rules.subdomain("ab.cd.t.tunnel.test", "tunnel.test") == "abcdt"


def test_entropy():
    assert dns_rules.entropy("") == 0.0 and dns_rules.entropy("aaaa") == 0.0
    assert dns_rules.entropy("abcd") == 2.0
    assert dns_rules.entropy("aabb") == 1.0
    assert math.isclose(dns_rules.entropy("abc"), math.log2(3))


def test_200_long_random_txt_subdomains_are_a_tunnel_naming_client_and_domain():
    names = tunnel_names(200)
    b = batch(dns_queries=rows(CLIENT, names, qtype=16, rcode=0), ports={9: (53, "udp")})
    [f] = dns_rules.dns_tunnels(b, Evaluator())
    d = f.details
    assert f.detector == "dns_tunnel" and f.source == CLIENT and d["client"] == CLIENT
    assert d["domain"] == "tunnel.test" and d["resolvers"] == [RESOLVER]
    assert (f.port_id, f.port, f.protocol) == (9, 53, "udp")
    assert d["queries"] == 200 and d["subdomains"] == 200 and d["responses"] == 200
    assert d["query_rate"] == 20.0                                # 200 queries in 10 one-minute rounds
    assert d["mean_name_length"] == 67.0                          # 30 + 1 + 22 + 14 (".t.tunnel.test")
    expect_entropy = sum(dns_rules.entropy(n.replace(".t.tunnel.test", "").replace(".", "") + "t") for n in names) / 200
    assert d["label_entropy"] == round(expect_entropy, 3) and d["label_entropy"] > 4.0
    assert d["record_types"] == {"TXT": 200} and d["odd_type_share"] == 1.0 and d["nxdomain_share"] == 0.0
    assert d["signals"] == ["name_length", "label_entropy", "record_types"]
    assert (f.score, f.threshold) == (3.0, 2.0) and (f.first_round_id, f.last_round_id) == (1, 10)
    assert "tunnel.test" in f.summary and CLIENT in f.summary


def test_200_ordinary_lookups_of_varied_names_are_not():
    b = batch(dns_queries=rows(CLIENT, ordinary_names(200), rcode=0))
    stats = dns_rules.client_domains(b)
    assert len(stats) == 20 and {s["queries"] for s in stats.values()} == {10}
    assert dns_rules.dns_tunnels(b, Evaluator()) == []


def test_many_short_names_under_one_domain_are_volume_without_signals():
    names = [f"host-{k}.corp.example" for k in range(120)]
    b = batch(dns_queries=rows(CLIENT, names, rcode=0))
    [(key, s)] = dns_rules.client_domains(b).items()
    assert key == (CLIENT, "corp.example") and s["queries"] == 120 and len(s["names"]) == 120
    assert dns_rules.dns_tunnels(b, Evaluator()) == []
    # the same names all NXDOMAIN, as A questions: one signal (nxdomain), still below 2
    assert dns_rules.dns_tunnels(batch(dns_queries=rows(CLIENT, names, rcode=3)), Evaluator()) == []
    [f] = dns_rules.dns_tunnels(batch(dns_queries=rows(CLIENT, names, rcode=3)), Evaluator(dns_min_signals=1))
    assert f.details["signals"] == ["nxdomain"] and f.details["nxdomain_share"] == 1.0


@pytest.mark.parametrize("queries, flagged", [(49, False), (50, True)])
def test_volume_gate_is_exact(queries, flagged):
    b = batch(dns_queries=rows(CLIENT, tunnel_names(queries), qtype=16))
    found = dns_rules.dns_tunnels(b, Evaluator())
    assert len(found) == int(flagged)
    if found:
        assert found[0].details["responses"] == 0 and found[0].details["nxdomain_share"] is None


def test_one_finding_per_client_and_domain():
    other = "198.18.20.3"
    b = batch(dns_queries=rows(CLIENT, tunnel_names(60, 1), qtype=16) + rows(other, tunnel_names(60, 2), qtype=10)
              + rows(CLIENT, [n.replace("tunnel.test", "exfil.example") for n in tunnel_names(60, 3)], qtype=16))
    found = dns_rules.dns_tunnels(b, Evaluator())
    assert sorted((f.source, f.details["domain"]) for f in found) == [
        (CLIENT, "exfil.example"), (CLIENT, "tunnel.test"), (other, "tunnel.test")]
    assert [f.details["record_types"] for f in found if f.source == other] == [{"NULL": 60}]


def dnscat_names(n: int, seed: int = 11) -> list[str]:
    """dnscat2 direct mode: 'dnscat.' + a hex-encoded packet in labels, under no registered domain."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        payload = "".join(rng.choice("0123456789abcdef") for _ in range(rng.randrange(40, 90)))
        out.append("dnscat." + ".".join(payload[i:i + 30] for i in range(0, len(payload), 30)))
    return out


def test_unregistered_means_no_known_public_suffix():
    assert dns_rules.unregistered("dnscat.a1b2.c3d4e5.ff") and dnscat_names(1)[0]
    assert dns_rules.unregistered("x.pirate.sea") and dns_rules.unregistered("printer.local")
    assert not dns_rules.unregistered("www.example.co.uk") and not dns_rules.unregistered("d1.cloudfront.net")


def test_a_direct_tunnel_to_its_own_server_is_one_conversation():
    """dnscat2 direct mode: every name's "registered domain" is its own last two labels (65+ domains,
    none at the volume gate); per (client, server) it is one conversation: exactly one finding."""
    names = dnscat_names(102)
    server = "198.18.20.53"
    types = [16, 5, 15]                                     # dnscat2 asks TXT, CNAME and MX
    qs = [r for k, name in enumerate(names) for r in rows(CLIENT, [name], qtype=types[k % 3], rcode=0,
                                                          start_round=1 + k // 20, resolver=server)]
    b = batch(dns_queries=qs, ports={9: (53, "udp")})
    assert len(dns_rules.client_domains(b)) == 102           # the per-domain view sees 102 one-name "domains"
    [f] = dns_rules.dns_tunnels(b, Evaluator())
    d = f.details
    assert (f.source, d["client"], d["domain"], d["grouped_by"], d["resolvers"]) == (CLIENT, CLIENT, None, "server", [server])
    assert d["queries"] == 102 and d["subdomains"] == 102 and d["responses"] == 102 and d["nxdomain_share"] == 0.0
    assert d["record_types"] == {"TXT": 34, "CNAME": 34, "MX": 34} and d["odd_type_share"] == 0.667
    assert d["signals"] == ["name_length", "label_entropy", "record_types"]
    assert d["mean_name_length"] == round(sum(len(n) for n in names) / 102, 1)
    assert f"asked {server} 102 names under no registered domain" in f.summary and (f.first_round_id, f.last_round_id) == (1, 6)


def test_a_tunnel_under_its_own_domain_is_not_counted_twice_by_server():
    """iodine under pirate.sea (an unknown top-level label) to one resolver: judged per domain, once;
    the server view leaves out a domain that reached the volume gate on its own."""
    names = [n.replace("tunnel.test", "pirate.sea") for n in tunnel_names(80)]
    [f] = dns_rules.dns_tunnels(batch(dns_queries=rows(CLIENT, names, qtype=10, rcode=0)), Evaluator())
    assert (f.details["domain"], f.details["grouped_by"]) == ("pirate.sea", "domain")


def test_a_resolver_asked_ordinary_and_local_names_is_no_tunnel():
    """Browsing (known suffixes) and a LAN's short names under .local/.lan to one resolver: the server
    view holds only the latter, at the volume gate and without signals."""
    local = [f"host-{k}.lan" for k in range(40)] + [f"printer{k}.office.local" for k in range(40)]
    browsing = [n.replace(".example", ".com") for n in ordinary_names(200)]
    b = batch(dns_queries=rows(CLIENT, browsing + local, rcode=3, per_round=28))
    [(key, s)] = dns_rules.client_servers(b, set()).items()
    assert key == (CLIENT, RESOLVER) and s["queries"] == 80 and s["nxdomain"] == 80
    assert dns_rules.dns_tunnels(b, Evaluator()) == []


def test_the_server_view_keeps_the_volume_gate():
    b = batch(dns_queries=rows(CLIENT, dnscat_names(49), qtype=16, resolver="198.18.20.53"))
    assert dns_rules.dns_tunnels(b, Evaluator()) == []
    b = batch(dns_queries=rows(CLIENT, dnscat_names(50), qtype=16, resolver="198.18.20.53"))
    assert len(dns_rules.dns_tunnels(b, Evaluator())) == 1


@pytest.mark.kernel
def test_a_direct_tunnel_captured_live_is_one_finding(lab, state_env, monkeypatch):
    """The real path: dnscat2-style questions sent over the lab's veth to one server, captured by the
    sniffer (tshark through pyshark), stored as round 1 of a real database, judged by a real
    evaluation: exactly one dns_tunnel, grouped by server."""
    import socket

    from app import config
    from app.services.collector.sniffer import Sniffer
    from app.services.evaluation import evaluation
    from tests.services.collector.test_sniffer import (SLACK, dns_query, finish, run_in_thread, stop_after_quiet, store,
                                             wait_until_receiving)
    monkeypatch.setenv("PORTWATCH_EVALUATOR_WARMUP_ROUNDS", "100000")      # rules only: no model fit
    names = dnscat_names(80, seed=3)
    types = [16, 5, 15]
    sniffer = Sniffer(lab.interface, window_seconds=60, temp_root=state_env / "tmp")
    (state_env / "tmp").mkdir()
    thread, outcome = run_in_thread(sniffer)
    wait_until_receiving(sniffer, lab, 30)                                  # tshark starts slowly on a busy machine
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:        # no server answers: questions only
        sock.bind((lab.root_v4, 0))
        for k, name in enumerate(names):
            sock.sendto(dns_query(name, types[k % 3], 0x3000 + k), (lab.peer_v4, 53))
            time.sleep(0.002)
    stop_after_quiet(sniffer)
    result = finish(thread, outcome, sniffer.drain_seconds + SLACK)
    assert result.skipped == 0 and not result.limit_reached
    conn, _round_id = store(state_env / "ports.db", lab.interface, result.records)
    # (the peer's ICMP port-unreachable errors quote a question too: those rows come from the peer)
    stored = [r[0] for r in conn.execute("SELECT qry_name FROM packets WHERE qry_name IS NOT NULL AND src_address = ? "
                                         "ORDER BY timestamp", (lab.root_v4,))]
    conn.close()
    # parsed as sent (a loaded machine's capture may miss a few: the conversation is still one)
    assert len(stored) >= 70 and stored == [n for n in names if n in set(stored)]
    outcome = evaluation.run(config.load())
    [f] = [a for a in outcome.anomalies if a.detector == "dns_tunnel"]
    d = f.details
    assert (f.source, d["grouped_by"], d["domain"], d["resolvers"]) == (lab.root_v4, "server", None, [lab.peer_v4])
    assert d["queries"] == len(stored) and d["subdomains"] == len(stored)
    sent = Counter(types[names.index(n) % 3] for n in stored)
    assert d["record_types"] == {"TXT": sent[16], "CNAME": sent[5], "MX": sent[15]}
    assert d["signals"] == ["name_length", "label_entropy", "record_types"]


@pytest.mark.kernel
@pytest.mark.slow
def test_a_replayed_direct_tunnel_capture_is_one_finding(tmp_path, capsys):
    """A tunnel end to end: a capture written with scapy (dnscat2 direct mode: 102 questions, TXT,
    CNAME and MX, to one server, each answered), replayed through the real programs and the real
    pyshark parsing (`replay`), then `evaluate`: exactly one dns_tunnel, grouped by server."""
    import sqlite3

    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP

    from app.cli import main
    from tests.services.collector.replay_captures import T0, Writer
    host, server = "198.18.70.1", "198.18.70.53"
    names = dnscat_names(102, seed=5)
    types = [16, 5, 15]
    w = Writer(tmp_path / "dnscat.pcap")
    for k, name in enumerate(names):
        t, sport, qtype = T0 + 1.0 + k * 0.9, 40000 + k, types[k % 3]
        w.add(t, IP(src=host, dst=server, ttl=64) / UDP(sport=sport, dport=53)
              / DNS(id=k, rd=1, qd=DNSQR(qname=name, qtype=qtype)), inbound=False)
        answer = DNSRR(rrname=name, type=qtype, rdata="00" * 8 if qtype == 16 else "a.b")
        w.add(t + 0.02, IP(src=server, dst=host, ttl=60) / UDP(sport=53, dport=sport)
              / DNS(id=k, qr=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype=qtype), an=answer), inbound=True)
    assert w.close() == 204
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[general]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                   f'pin_root = "{tmp_path}/no-pins"\n[evaluator]\nwarmup_rounds = 100000\n')
    db = str(tmp_path / "ports.db")
    assert main(["replay", str(tmp_path / "dnscat.pcap"), "--db", db, "--config", str(cfg), "--host", host]) == 0
    assert main(["evaluate", "--db", db, "--config", str(cfg)]) == 0
    capsys.readouterr()
    conn = sqlite3.connect(db)
    asked = conn.execute("SELECT COUNT(*), COUNT(DISTINCT qry_name) FROM packets WHERE src_address = ? "
                         "AND qry_name IS NOT NULL", (host,)).fetchone()
    found = conn.execute("SELECT reasons FROM anomalies WHERE detector = 'dns_tunnel'").fetchall()    # details: top level
    conn.close()
    assert asked == (102, 102)
    [(details,)] = found
    d = json.loads(details)
    assert (d["client"], d["grouped_by"], d["domain"], d["resolvers"]) == (host, "server", None, [server])
    assert d["queries"] == 102 and d["responses"] == 102 and d["record_types"] == {"TXT": 34, "CNAME": 34, "MX": 34}
