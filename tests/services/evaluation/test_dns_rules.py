"""dns_tunnel as a pure function of hand-made batches (exact numbers), and its helpers."""
from __future__ import annotations

import math
import random
import string

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
