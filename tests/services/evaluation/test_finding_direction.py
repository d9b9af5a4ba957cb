"""Findings read right for their direction: an outbound finding (what this host SENT) names its
destination as a destination, in its detector's own words, never with an evidence class or
"possibly forged" (nobody forges what this host sent) — the same sentence in `anomalies list` and
`show`, the alert, the report and the CrowdSec push message. Inbound findings keep theirs."""
from __future__ import annotations

import json
import time

from app.cli import main
from app.config import Evaluator
from app.db import fleet as fleet_db
from app.db import peers
from app.db.connection import connect
from app.services.evaluation import forged
from app.services.evaluation import dns_rules, explain, outbound_rules
from app.services.evaluation.findings import Finding, Source
from app.services.ops import alerts
from app.services.ops.reports import write_report
from tests.helpers import add_evaluation, make_settings
from tests.services.evaluation.outbound_batches import T0, batch, flow

DEST = "198.18.7.88"
UPLOAD = 100_000_000


def exfiltration() -> Finding:
    """A 100 MB upload to a new address on a host that usually sends ~45 kB a round."""
    background = [(r, "198.18.7.2", 50, 45_000, 0, 1) for r in range(1, 11)]
    b = batch(destination_stats=background + [(4, DEST, 72_816, UPLOAD, 1, 1)], baseline_rounds=50,
              host_out_bytes=[(r, 45_000) for r in range(-49, 1)])
    [found] = outbound_rules.exfiltrations(b, Evaluator())
    return found


def beacon() -> Finding:
    flows = [flow(int(30 * k // 60) + 1, DEST, 443, 50000 + k, first_seen=T0 + 0.5 + 30 * k) for k in range(20)]
    [found] = outbound_rules.beacons(batch(outbound_flows=flows), Evaluator())
    return found


def test_outbound_summaries_name_a_destination_in_the_detectors_words():
    exfil = exfiltration()
    line = exfil.summary
    assert line.startswith(f"exfiltration: this host sent {UPLOAD:,} bytes out to {DEST}")
    assert "x the usual 45,000 bytes/round of the host" in line
    assert "from" not in line and "forged" not in line and "one-way" not in line
    assert explain.summary(exfil) == line                           # one home: explain's sentence
    assert beacon().summary.startswith(f"beaconing: this host contacted {DEST} (remote port 443) 20 times every 30 s")
    scan = Finding("port_scan", None, None, None, 1, 2, 40, 25, source="198.18.7.4",
                   sources=[Source("198.18.7.4", packets=81, forged=True)], details={"ports": {"tcp": [1, 2]}})
    assert "from 198.18.7.4 (81 packets, one-way, possibly forged)" in explain.summary(scan)   # inbound keeps it


def test_dns_tunnel_says_who_asked_what_of_whom():
    from tests.services.evaluation.test_dns_rules import CLIENT, RESOLVER, rows, tunnel_names
    b = batch(dns_queries=rows(CLIENT, tunnel_names(200), qtype=16, rcode=0), ports={9: (53, "udp")})
    [found] = dns_rules.detect(b, Evaluator())
    assert found.summary.startswith(f"DNS tunnel suspected: {CLIENT} asked {RESOLVER} 200 names under tunnel.test")
    assert "forged" not in found.summary and "one-way" not in found.summary


def test_the_same_sentence_on_every_surface_and_no_forged_destination(tmp_path, capsys):
    s = make_settings(tmp_path)
    conn = connect(s.general.db)
    with conn:       # the destination is a two-way peer: inbound one-way evidence naming it would be "forged"
        peers.record_two_way(conn, 1, time.time() - 60, {DEST: ("handshake", 64, None)})
    exfil = exfiltration()
    verified = batch(peers={r["address"]: r for r in peers.verified_peers(conn, 0)}, peers_since=0)
    assert DEST in verified.peers and forged.judge_sources(conn, s, [exfil], verified) == 0
    assert not exfil.sources[0].forged and exfil.forged_sources == []
    [stored] = add_evaluation(conn, [exfil])
    line = stored.summary
    now = time.time()
    with conn:
        conn.execute("INSERT INTO blacklist (address, reason, anomaly_id, origin, created_at, expires_at, status,"
                     " direction) VALUES (?, 'exfiltration', ?, 'auto', ?, ?, 'active', 'out')",
                     (f"{DEST}/32", stored.id, now, now + 3600))
    [push] = fleet_db.unpushed_blocks(conn, ["auto"], now)
    conn.close()
    assert push["summary"] == line                                           # the CrowdSec push message
    event = alerts.anomaly_event(stored)
    assert event.summary == f"anomaly {stored.id}: {line}" and "destinations" in event.details
    assert "evidence" not in json.dumps(event.details["destinations"])
    assert main(["--db", s.general.db, "anomalies", "list", "--since", "all"]) == 0
    assert line in capsys.readouterr().out
    assert main(["--db", s.general.db, "anomalies", "show", str(stored.id)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"anomaly {stored.id}: {line}")
    assert "  to         ADDRESS" in shown and "EVIDENCE" not in shown and "forged" not in shown
    page = write_report(s.general.db, tmp_path / "report", since="all").read_text()
    assert line.replace("'", "&#x27;") in page
    assert "possibly forged" not in page and "one-way" not in page


def test_every_detector_speaks_in_its_own_words():
    """No detector of the contract falls back to the generic 'X on host, score S' line."""
    from app.services.evaluation.explain import DETECTOR_NAMES
    for detector in DETECTOR_NAMES:
        f = Finding(detector, None, None, None, 1, 2, 3.0, 2.0, source="198.18.7.9", source_count=3)
        line = explain.summary(f)
        assert ", score 3 (threshold 2)" not in line, (detector, line)
        if f.outbound:
            assert "from 198.18.7.9" not in line and "one-way" not in line, (detector, line)
    flood = Finding("source_flood", None, None, None, 4, 6, 900.0, 500.0, source_count=2100)
    assert explain.summary(flood) == ("source flood: 2,100 new sources reached this host in rounds 4-6 (at most "
                                      "900 in one round): per-source counts there may be incomplete")
