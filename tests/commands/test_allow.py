"""`python -m app allow add` lifts a real block at once: the pinned XDP map of a lab interface loses
the entry and the source's packets reach a socket again (kernel)."""
from __future__ import annotations

import json

import pytest

from app.cli import main
from tests.helpers import UdpSink, blocklist_settings, collect, map_drops, pin_root, send_udp  # noqa: F401

pytestmark = pytest.mark.kernel


def test_allow_add_lifts_the_block_from_the_map(lab, tmp_path, pin_root, monkeypatch, capsys):  # noqa: F811
    s = blocklist_settings(tmp_path, pin_root)
    collect(s, lab)                                         # XDP loaded and pinned under pin_root
    monkeypatch.setenv("PORTWATCH_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PORTWATCH_PIN_ROOT", str(pin_root))
    db = ["--db", s.general.db]
    pdir = pin_root / lab.interface
    src, net = lab.host_v4(2), f"198.18.{lab.subnet}.4/30"         # lab hosts .4 and .5
    with UdpSink(lab.root_v4, 7701) as sink:
        assert main(["blacklist", "add", net, "--reason", "noisy net", *db]) == 0
        send_udp(lab, src, lab.root_v4, 7701, 20)
        assert sink.drain() == {}
        assert map_drops(pdir, net) == 20
        capsys.readouterr()
        assert main(["allow", "add", src, *db]) == 0          # one host of the blocked /30
        out = capsys.readouterr().out
        assert out == (f"allowlisted {src}/32; lifted its block on {net} "
                       f"(maps updated on {lab.interface})\n")
        assert map_drops(pdir, net) is None
        send_udp(lab, src, lab.root_v4, 7701, 20)
        assert sink.drain() == {src: 20}
    assert main(["blacklist", "list", "--all", "--json", *db]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["status"], entry["drops"]) == ("removed", 20)
    # while allowed, a manual block of that host needs --force, like any protected address
    assert main(["blacklist", "add", src, *db]) == 2
    assert "allowlisted (python -m app allow)" in capsys.readouterr().err
