"""The one summary line of a finding and the explanation `anomalies show` prints (pure: no kernel)."""
from __future__ import annotations

from app.services.evaluation import explain
from app.services.evaluation.findings import Finding, Source


def test_port_ranges_are_compact():
    assert explain.port_ranges([]) == ""
    assert explain.port_ranges([80]) == "80"
    assert explain.port_ranges(range(1, 1025)) == "1-1024"
    assert explain.port_ranges([443, 22, 21, 20, 80, 8080, 8081, 22]) == "20-22,80,443,8080-8081"
    assert explain.ports_text({"tcp": list(range(1, 1025)), "udp": [53]}) == "tcp 1-1024 (1024), udp 53 (1)"
    assert explain.ports_text({"tcp": [1, 3, 5, 7, 9, 11]}, limit=3) == "tcp 1,3,5,… (6)"
    assert explain.expand_ranges([[1, 3], [9, 9]]) == [1, 2, 3, 9]


def scan_finding(**details):
    d = {"port_ranges": {"tcp": [[1, 1024]], "udp": [[53, 53]]}, "ports": {"tcp": list(range(1, 101))},
         "max_ports_in_one_round": 700, **details}
    return Finding("port_scan", None, None, None, 4, 6, 1025.0, 25.0, source="198.18.0.9",
                   sources=[Source("198.18.0.9", packets=2050, syn=2049)], details=d, id=12)


def test_summary_of_each_detector():
    assert explain.summary(scan_finding()) == (
        "port scan from 198.18.0.9 (2,050 packets, one-way): tcp 1-1024 (1024), udp 53 (1), "
        "up to 700 ports in one round, rounds 4-6")
    flood = Finding("syn_flood", 3, 80, "tcp", 7, 8, 5000.0, 1000.0, source="198.18.0.7",
                    sources=[Source("198.18.0.7", packets=9000, share=0.9)], source_count=40,
                    details={"syn": 9000, "flooded_rounds": 2, "peak": {"syn": 5000, "completion_share": 0.02}})
    assert explain.summary(flood, [{"process": "nginx", "pid": 10}]) == (
        "SYN flood on tcp/80 (nginx): 9,000 SYNs in 2 rounds, peak 5,000 SYNs with 2% answered, "
        "from 198.18.0.7 (90%, one-way) and 39 more, rounds 7-8")
    new = Finding("new_listener", 4, 8099, "tcp", 5, 5, None, None,
                  details={"round_id": 5, "holders": [{"pid": 77, "process": "nc", "user": "bob", "address": "::"},
                                                      {"pid": 77, "process": "nc", "user": "bob", "address": "0.0.0.0"}]})
    assert explain.summary(new) == "new listener on tcp/8099: nc (pid 77, user bob), round 5"
    changed = Finding("process_changed", 2, 22, "tcp", 5, 5, None, None, details={
        "round_id": 5, "holders": [{"pid": 9, "process": "evil-sshd", "user": "root"}],
        "previous": {"round_id": 4, "holders": [{"pid": 8, "process": "sshd", "user": "root"}]}})
    assert explain.summary(changed) == "tcp/22 changed owner: sshd -> evil-sshd (pid 9, user root), round 5"
    flooded = Finding("unlistened_port", 5, 9999, "udp", 3, 5, 49100.0, 1.0, source="198.18.0.9",
                      sources=[Source("198.18.0.9", packets=49100, share=1.0)],
                      details={"packets": 49100, "unlistened_rounds": 3})
    assert explain.summary(flooded, []) == ("traffic to udp/9999, where nothing listens: 49,100 packets in 3 rounds "
                                            "from 198.18.0.9 (100%, one-way), rounds 3-5")
    model = Finding("model", 6, 5302, "udp", 9, 9, 0.9, 0.1, details={"features": [
        {"feature": "packets", "observed": 600.0, "reconstructed": 40.2, "error": 0.5, "share": 0.6},
        {"feature": "bytes", "observed": 48000.0, "reconstructed": 3300.0, "error": 0.2, "share": 0.25}]})
    assert explain.summary(model, [{"process": "dnsmasq"}]) == (
        "unusual traffic on udp/5302 (dnsmasq): packets 600 vs usual 40.2, bytes 48,000 vs usual 3,300 "
        "(error 9.0x the threshold), round 9")
    other = Finding("future_rule", None, None, None, 1, 2, 3.0, 2.0, source="198.18.0.1")
    assert explain.summary(other) == "future rule on host, score 3 (threshold 2), from 198.18.0.1, rounds 1-2"


def test_lines_show_features_in_units_and_what_was_done():
    e = {"id": 3, "summary": "s", "detector": "model", "evaluation_id": 2, "rounds": [9, 9],
         "started": "t0", "ended": "t1", "port": 5302, "port_label": "udp/5302", "holders": [],
         "score": 0.9, "threshold": 0.1, "sources": [{"address": "198.18.0.9", "packets": 600, "share": 0.95,
                                                      "evidence": "one-way"}], "source_count": None,
         "features": [{"feature": "packets", "observed": 600.0, "reconstructed": 40.2, "share": 0.6,
                       "unit": explain.FEATURE_UNITS["packets"]}],
         "blocks": [{"address": "198.18.0.9/32", "status": "active", "until": "t2", "drops": 7}],
         "block_events": [], "alerts": [{"channel": "webhook", "at": "t3"}]}
    text = "\n".join(explain.lines(e))
    assert "  when       round 9, t0 to t1" in text
    assert "  port       udp/5302: nothing listening (occupancy)" in text
    assert "             packets                 600       40.2  packets/round         60%" in text
    assert "             198.18.0.9                            600    95.0%  one-way" in text
    assert "  done       blocked (active) 198.18.0.9/32 until t2, 7 drops\n             alerted on webhook at t3" in text
