"""Manual edits of the blocklist (app/services/blocklist/blocklist.py): parsing what a person typed, the checks
before anything changes (tmp SQLite, no XDP). The map side is tests/services/blocklist/test_enforcement.py,
automatic decisions tests/services/blocklist/test_decisions.py.
"""
from __future__ import annotations

import pytest

from app.db import blacklist as queries
from app.db.connection import connect
from app.errors import UsageError
from app.services.blocklist import blocklist
from app.services.kernel.enforcement import parse_network
from app.services.blocklist.decisions import Protection
from tests.helpers import blocklist_settings, ledger_events

T0 = 1_800_000_000.0


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "bl.db")
    yield c
    c.close()


@pytest.mark.parametrize("text,expected", [
    ("198.18.0.9", "198.18.0.9/32"), ("198.18.0.0/24", "198.18.0.0/24"), ("2001:db8::1", "2001:db8::1/128"),
    ("2001:db8::/64", "2001:db8::/64"), ("::ffff:198.18.0.7", "198.18.0.7/32"), (" 198.18.1.0/24 ", "198.18.1.0/24"),
])
def test_parse_network_accepts(text, expected):
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize("text,says", [
    ("nonsense", "is not an IPv4 or IPv6 address"), ("198.18.0.1/33", "out of range for IPv4 (0-32)"),
    ("2001:db8::/129", "out of range for IPv6 (0-128)"), ("198.18.0.5/24", "has host bits set: give 198.18.0.0/24"),
    ("198.18.0.0/-1", "is not a number"), ("", "required"),
])
def test_parse_network_refuses_with_one_sentence(text, says):
    with pytest.raises(UsageError) as err:
        parse_network(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_manual_add_checks_before_changing_anything(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    p = Protection()
    p.add("198.18.0.1", "an address of this host")
    for text, kw in [("198.18.0.1", {}), ("198.18.0.0/24", {}), ("198.18.0.9", {"ttl": 0}),
                     ("198.18.0.9", {"ttl": -5}), ("bad", {})]:
        with pytest.raises(UsageError):
            blocklist.add_manual(conn, s, text, protection=p, now=T0, **kw)
    assert queries.entries(conn, None) == [] and ledger_events(conn) == []
    d = blocklist.add_manual(conn, s, "198.18.0.1", force=True, protection=p, now=T0)
    assert d.action == "block" and "forced" in d.detail


def test_remove_and_flush_mark_rows_removed(conn, tmp_path):
    s = blocklist_settings(tmp_path)
    blocklist.add_manual(conn, s, "198.18.0.9", now=T0, protection=Protection())
    blocklist.add_manual(conn, s, "2001:db8::/64", now=T0, protection=Protection())
    assert blocklist.remove_manual(conn, s, "198.18.0.9", now=T0 + 1) == "198.18.0.9/32"
    with pytest.raises(UsageError, match="is not on the blocklist"):
        blocklist.remove_manual(conn, s, "198.18.0.9", now=T0 + 2)
    assert blocklist.flush(conn, s, now=T0 + 3) == ["2001:db8::/64"]
    assert {r["status"] for r in queries.entries(conn, None)} == {"removed"}
    assert [a for _, a in ledger_events(conn)] == ["block", "block", "remove", "remove"]
