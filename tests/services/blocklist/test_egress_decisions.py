"""Egress blocking decisions: outbound findings' destinations in the blocklist ledger with
direction 'out' — only while blocklist.egress_block_enabled — with the ingress blocklist's TTL,
escalation, interlocks, caps and dry-run/simulate (tmp SQLite, no maps; the kernel half is in
tests/threads/test_egress.py)."""
from __future__ import annotations

import pytest

from app.db import blacklist as queries
from app.db.connection import connect
from app.services.kernel import enforcement
from app.services.blocklist.decisions import Protection, decide, ttl_for
from tests.helpers import add_evaluation, blocklist_settings, downgrade, finding, ledger_events, scan

T0 = 1_800_000_000.0
NOBODY = Protection()


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "eg.db")
    yield c
    c.close()


def exfil(address, **kw):
    return finding("exfiltration", destination=address, bytes=10 << 20, rule="exfiltration", **kw)


def beacon(address):
    return finding("beaconing", destination=address, rule="beaconing", connections=30)


def rows(conn):
    return {r["address"]: (r["direction"], r["status"]) for r in queries.entries(conn, None)}


def test_off_by_default_outbound_findings_only_alert(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    assert s.blocklist.egress_block_enabled is False
    assert s.blocklist.egress_detectors == ["outbound_scan", "exfiltration", "beaconing"]
    found = add_evaluation(conn, [exfil("198.18.60.1"), beacon("198.18.60.2"), scan("198.18.60.3")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    # the inbound scan still blocks its source; the outbound findings add nothing, not even a refusal
    assert [(d.address, d.action, d.direction) for d in decisions] == [("198.18.60.3/32", "block", "in")]
    assert rows(conn) == {"198.18.60.3/32": ("in", "active")}


def test_switched_on_destinations_enter_the_ledger_as_out_with_ttl_and_escalation(conn, tmp_path):
    s = blocklist_settings(tmp_path, egress_block_enabled=True)
    outbound_scan = finding("outbound_scan", source="198.18.60.7", kind="ports", destination="198.18.60.7",
                            rule="outbound scan")
    wide_scan = finding("outbound_scan", kind="addresses", destination=None, rule="outbound scan",
                        destinations=["198.18.61.1", "198.18.61.2"])
    found = add_evaluation(conn, [exfil("198.18.60.1"), beacon("2001:db8:60::2"), outbound_scan, wide_scan,
                                  scan("198.18.60.9")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [(d.address, d.action, d.direction) for d in decisions] == [
        ("198.18.60.1/32", "block", "out"), ("2001:db8:60::2/128", "block", "out"),
        ("198.18.60.7/32", "block", "out"), ("198.18.60.9/32", "block", "in")]   # a scan of many addresses: alert
    assert rows(conn) == {"198.18.60.1/32": ("out", "active"), "2001:db8:60::2/128": ("out", "active"),
                          "198.18.60.7/32": ("out", "active"), "198.18.60.9/32": ("in", "active")}
    row = queries.get_entry(conn, "198.18.60.1/32")
    assert row["expires_at"] == T0 + ttl_for(s, 1) and row["offences"] == 1 and row["origin"] == "auto"
    assert "exfiltration to 198.18.60.1" in row["reason"] and '"direction": "out"' in row["evidence"]
    assert "egress" in queries.events(conn, "198.18.60.1/32")[0]["detail"]
    # expiry, then a second offence: the same escalation as the ingress blocklist
    later = T0 + ttl_for(s, 1) + 1
    assert enforcement.apply(conn, s, later) == []                 # no pins: only expiries
    assert queries.get_entry(conn, "198.18.60.1/32")["status"] == "expired"
    again = decide(conn, s, add_evaluation(conn, [exfil("198.18.60.1")], at=later), now=later, protection=NOBODY)
    assert [(d.action, d.offences, d.ttl_seconds) for d in again] == [("block", 2, ttl_for(s, 2))]
    assert ttl_for(s, 2) > ttl_for(s, 1)
    assert rows(conn)["198.18.60.1/32"] == ("out", "active")
    assert "198.18.60.1/32" not in enforcement.active_cidrs(conn, later)   # the XDP prefill holds 'in' rows only


def test_interlocks_caps_and_other_direction(conn, tmp_path):
    s = blocklist_settings(tmp_path, egress_block_enabled=True, max_new_per_evaluation=2)
    p = Protection()
    p.add("198.18.62.1", "a configured DNS resolver")
    p.add("198.18.62.2", "a default gateway")
    found = add_evaluation(conn, [exfil("198.18.62.1"), beacon("198.18.62.2"), exfil("198.18.62.3"),
                                  beacon("198.18.62.4"), exfil("198.18.62.5")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=p)
    assert [(d.address, d.action) for d in decisions] == [
        ("198.18.62.1/32", "refused"), ("198.18.62.2/32", "refused"), ("198.18.62.3/32", "block"),
        ("198.18.62.4/32", "block"), ("198.18.62.5/32", "refused")]
    assert "DNS resolver" in decisions[0].detail and "gateway" in decisions[1].detail
    assert "cap of 2 new blocks per evaluation" in decisions[4].detail
    # an address listed as a source is not flipped to a destination (one ledger row per address)
    found = add_evaluation(conn, [scan("198.18.62.8")], at=T0 + 1)
    decide(conn, s, found, now=T0 + 1, protection=p)
    out = decide(conn, s, add_evaluation(conn, [exfil("198.18.62.8")], at=T0 + 2), now=T0 + 2, protection=p)
    assert [(d.action, d.direction) for d in out] == [("refused", "out")] and "other direction" in out[0].detail
    assert rows(conn)["198.18.62.8/32"] == ("in", "active")
    # a detector not in blocklist.egress_detectors only alerts
    s.blocklist.egress_detectors = ["exfiltration"]
    assert decide(conn, s, add_evaluation(conn, [beacon("198.18.62.9")], at=T0 + 3), now=T0 + 3, protection=p) == []


def test_dry_run_and_simulate_record_would_block(conn, tmp_path):
    s = blocklist_settings(tmp_path, egress_block_enabled=True, simulate=["beaconing"])
    found = add_evaluation(conn, [exfil("198.18.63.1"), beacon("198.18.63.2")], at=T0)
    decisions = decide(conn, s, found, now=T0, protection=NOBODY)
    assert [(d.action, d.direction) for d in decisions] == [("block", "out"), ("would-block", "out")]
    assert rows(conn) == {"198.18.63.1/32": ("out", "active"), "198.18.63.2/32": ("out", "dry-run")}
    s.blocklist.dry_run = True
    decide(conn, s, add_evaluation(conn, [exfil("198.18.63.3")], at=T0 + 1), now=T0 + 1, protection=NOBODY)
    assert rows(conn)["198.18.63.3/32"] == ("out", "dry-run")
    assert ledger_events(conn, "would-block") == [("198.18.63.2/32", "would-block"), ("198.18.63.3/32", "would-block")]


def test_migration_10_marks_every_existing_entry_inbound(tmp_path):
    from app.db.connection import SCHEMA_VERSION
    old = tmp_path / "v9.db"
    c = connect(old)
    downgrade(c, 9, "ALTER TABLE blacklist DROP COLUMN direction;")
    c.execute("INSERT INTO blacklist (address, reason, created_at, status) VALUES ('198.18.64.1/32', 'x', 1, 'active')")
    c.commit()
    c.close()
    c = connect(old)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 10
    assert rows(c) == {"198.18.64.1/32": ("in", "active")}
    c.close()
