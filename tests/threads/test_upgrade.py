"""Upgrading over pins of the previous map layout (struct pw_addr without a family byte, a shorter
pw_global): the collector closes a round from what the old maps can still tell, then recreates them
(root + kernel). The old program is the one of commit OLD_REV, loaded by that commit's own loader."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.services.kernel import xdp
from tests.helpers import collect, make_settings

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]
OLD_REV = "da5d03fac044b8ef171aea1073ea12f5f466d3c4"   # before issue 9/12's layouts


def test_old_layout_pins_close_a_round_then_are_recreated(lab, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_REV, "bpf", "app"], capture_output=True)
    if archive.returncode != 0:
        pytest.fail(f"cannot read commit {OLD_REV} of this repository: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    s = make_settings(tmp_path)
    pdir = Path(s.general.pin_root) / lab.interface
    loaded = subprocess.run([sys.executable, "-m", "app.services.xdp", "load", "--interface", lab.interface,
                             "--pin-dir", str(pdir), "--mode", "generic", "--hash", "0" * 64,
                             *("--flag=" + f for f in xdp.build_flags(s))],   # OLD_REV's own loader module
                            cwd=old, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(old)},
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "5400", "--count", "40")) == 40

    collect(s, lab)                                   # old layout: close a round from the old maps, recreate
    conn = sqlite3.connect(s.general.db)
    conn.row_factory = sqlite3.Row
    closing, first = conn.execute("SELECT * FROM rounds ORDER BY id").fetchall()
    assert closing["note"] == ("last counts of the replaced maps "
                               "(not read, older layout: blacklist, flows, sources, srcports)")
    port = ("SELECT COALESCE(SUM(ps.packets), 0) FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
            "WHERE ps.round_id = ? AND p.value = 5400 AND p.protocol = 'udp'")
    assert conn.execute(port, (closing["id"],)).fetchone()[0] == 40       # port_stats kept its layout
    assert closing["total_packets"] >= 40 and closing["parsed_packets"] >= 40   # pw_global only grew
    assert conn.execute("SELECT reason FROM xdp_loads").fetchall()[0][0] == "maps-recreated"
    assert first["egress_program_id"] is not None

    assert int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "5400", "--count", "10")) == 10
    collect(s, lab)
    last = conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    assert conn.execute(port, (last["id"],)).fetchone()[0] == 10
    assert conn.execute("SELECT packets FROM source_stats WHERE round_id = ? AND address = ?",
                        (last["id"], lab.host_v4(0))).fetchone()[0] == 10
    assert sorted(p.name for p in pdir.iterdir()) == sorted([*xdp.MAP_LAYOUT, "prog", "eg_prog", "owner"])
