"""`python -m app blacklist list|add|remove|flush`: success and error paths, and (kernel) immediate
enforcement on the pinned map of a lab interface."""
from __future__ import annotations

import json
import sqlite3

import pytest

from app.cli import main
from tests.helpers import UdpSink, blocklist_settings, pin_root, send_udp  # noqa: F401
from tests.helpers import collect


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process against a tmp database, a tmp pin root and an allowlist; returns
    run(*args) -> (exit code, stdout, stderr)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'pin_root = "{tmp_path / "no-pins"}"\nstate_dir = "{tmp_path / "state"}"\n'
                   '[blocklist]\nallowlist = ["198.18.250.0/24"]\n')
    monkeypatch.setenv("PORTWATCH_CONFIG", str(cfg))
    db = tmp_path / "bl.db"
    from app.db.connection import connect
    connect(db).close()                     # as a collector made it: `blacklist add` creates no database

    def run(*args):
        return main(["blacklist", *args, "--db", str(db)])
    run.db = db
    return run


def snapshot(db):
    if not db.exists():
        return None
    conn = sqlite3.connect(db)
    try:
        return (conn.execute("SELECT * FROM blacklist ORDER BY address").fetchall(),
                conn.execute("SELECT * FROM blacklist_events ORDER BY id").fetchall())
    finally:
        conn.close()


def test_add_list_remove_flush(cli, capsys):
    assert cli("list") == 0
    assert capsys.readouterr().out.strip() == "the blocklist is empty"
    assert cli("add", "198.18.0.9", "--ttl", "600", "--reason", "noisy scanner") == 0
    out = capsys.readouterr().out
    assert out.startswith("blocked 198.18.0.9/32 until ") and "(noisy scanner)" in out
    assert "only the ledger changed: the next collector run applies it" in out
    assert cli("add", "2001:db8:5::/48") == 0
    assert cli("add", "198.18.3.0/24") == 0
    capsys.readouterr()
    assert cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADDRESS", "DIR", "STATUS", "EXPIRES", "DROPS", "REPLIES", "OFFENCES", "ORIGIN",
                                "FINDING", "REASON"]
    assert lines[-1] == ("0 packets dropped by the blocklist in the stored rounds (every entry, also removed and "
                         "expired ones: the report's figure)")
    assert {line.split()[0] for line in lines[1:-1]} == {"198.18.0.9/32", "2001:db8:5::/48", "198.18.3.0/24"}
    assert {line.split()[1] for line in lines[1:-1]} == {"in"}        # hand-added entries block a source
    assert cli("remove", "198.18.0.9") == 0
    assert capsys.readouterr().out.startswith("removed 198.18.0.9/32 from the blocklist")
    assert cli("list", "--json") == 0
    items = json.loads(capsys.readouterr().out)
    assert {i["address"] for i in items} == {"2001:db8:5::/48", "198.18.3.0/24"}
    assert all(i["status"] == "active" and i["drops"] == 0 and i["offences"] == 1 and i["direction"] == "in"
               and i["replies_passed"] == 0 for i in items)
    assert cli("flush") == 0
    assert capsys.readouterr().out.startswith("flushed 2 entries from the blocklist")
    assert cli("list", "--all", "--json") == 0
    assert {i["status"] for i in json.loads(capsys.readouterr().out)} == {"removed"}
    events = snapshot(cli.db)[1]
    assert [e[3] for e in events] == ["block", "block", "block", "remove", "remove", "remove"]


@pytest.mark.parametrize("args,says", [
    (("add", "not-an-address"), "'not-an-address' is not an IPv4 or IPv6 address"),
    (("add", "198.18.0.1/33"), "prefix length 33 of 198.18.0.1/33 is out of range for IPv4 (0-32)"),
    (("add", "2001:db8::1/200"), "out of range for IPv6 (0-128)"),
    (("add", "198.18.0.7/24"), "198.18.0.7/24 has host bits set: give 198.18.0.0/24 for the network or 198.18.0.7 "
                                "for the one address"),
    (("add", "198.18.250.4"), "198.18.250.4/32 is not blocked because it overlaps 198.18.250.0/24 (allowlisted): "
                             "pass --force to block it anyway"),
    (("add", "198.18.250.0/23"), "overlaps 198.18.250.0/24 (allowlisted)"),
    (("add", "127.0.0.1"), "overlaps 127.0.0.0/8 (loopback)"),
    (("add", "::1"), "(loopback)"),
    (("add", "198.18.0.9", "--ttl", "0"), "--ttl must be above 0, got '0'"),
    (("add", "198.18.0.9", "--ttl", "-3"), "--ttl must not be negative, got '-3'"),
    (("remove", "198.18.0.99"), "198.18.0.99/32 is not on the blocklist"),
    (("remove", "198.18.0.0/33"), "out of range"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(cli, capsys, args, says):
    assert cli("add", "198.18.0.50") == 0                 # something in the ledger to keep unchanged
    before = snapshot(cli.db)
    capsys.readouterr()
    assert cli(*args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("portwatch: error: ") and says in err and "\n" not in err
    assert captured.out == ""
    assert snapshot(cli.db) == before


def test_own_address_refused_unless_forced(cli, capsys):
    from app.services.host import local_addresses
    own = next(a for a in local_addresses() if not a.startswith("127.") and ":" not in a)
    assert cli("add", own) == 2
    assert "an address of this host" in capsys.readouterr().err
    assert cli("add", own, "--force", "--ttl", "5") == 0
    assert snapshot(cli.db)[1][-1][3] == "block" and "forced" in snapshot(cli.db)[1][-1][4]


@pytest.mark.kernel
def test_cli_changes_reach_the_map_at_once(lab, tmp_path, pin_root, monkeypatch, capsys):
    s = blocklist_settings(tmp_path, pin_root)
    collect(s, lab)                                        # XDP loaded and pinned under pin_root
    monkeypatch.setenv("PORTWATCH_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PORTWATCH_PIN_ROOT", str(pin_root))
    db = ["--db", s.general.db]
    src = lab.host_v4(0)
    with UdpSink(lab.root_v4, 7700) as sink:
        assert main(["blacklist", "add", src, "--reason", "cli test", *db]) == 0
        assert capsys.readouterr().out.endswith(f"; maps updated on {lab.interface}\n")
        send_udp(lab, src, lab.root_v4, 7700, 33)
        assert sink.drain() == {}
        assert main(["blacklist", "list", "--json", *db]) == 0
        [item] = json.loads(capsys.readouterr().out)
        assert (item["address"], item["drops"], item["reason"]) == (f"{src}/32", 33, "cli test")
        assert main(["blacklist", "remove", src, *db]) == 0
        assert f"maps updated on {lab.interface}" in capsys.readouterr().out
        send_udp(lab, src, lab.root_v4, 7700, 4)
        assert sink.drain() == {src: 4}
        assert main(["blacklist", "add", lab.host_v6(0), *db]) == 0
        assert main(["blacklist", "flush", *db]) == 0
        assert "flushed 1 entry" in capsys.readouterr().out
    conn = sqlite3.connect(s.general.db)
    assert conn.execute("SELECT drops FROM blacklist WHERE address = ?", (f"{src}/32",)).fetchone()[0] == 33
    conn.close()
