"""`python -m app status [--json]`."""
from __future__ import annotations

import json
import time

from app.cli import main
from app.services.ops import health
from tests.ops_helpers import fill_database


def test_status_text_and_json(state_env, capsys):
    fill_database(state_env / "ports.db", end=time.time() - 30, rounds=20, interface="pwnoif0")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "20 rounds" in out and "last round:      #20 on pwnoif0" in out
    assert "model:           version 1" in out and "blocklist:       1 active" in out
    assert "xdp pwnoif0:     interface does not exist" in out
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["last_round"]["id"] == 20 and data["last_round"]["age_seconds"] >= 30
    assert data["last_evaluation"]["status"] == "ok" and data["model"]["version"] == 1
    assert data["blacklist"]["active"] == 1 and data["database"]["bytes"] > 0
    assert data["xdp"][0]["interface"] == "pwnoif0" and data["xdp"][0]["attached"] is False


def test_status_for_a_named_interface(state_env, capsys):
    assert main(["status", "--json", "--interface", "lo"]) == 1          # no database yet: unhealthy
    data = json.loads(capsys.readouterr().out)
    assert data["database"]["exists"] is False and data["last_round"] is None
    lo = data["xdp"][0]
    assert lo["interface"] == "lo" and lo["exists"] is True and isinstance(lo["attached"], bool)
    assert lo["pin_dir"] == str(state_env / "no-pins" / "lo") and lo["pinned"] is False   # no pins under this root


def test_status_without_a_database(state_env, capsys):
    assert main(["status"]) == 1
    captured = capsys.readouterr()
    assert "not created yet" in captured.out and "last round:      none" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("portwatch: unhealthy: database: no database at")


def test_status_errors(state_env, capsys):
    assert main(["status", "--interface", "no/such"]) == 2
    assert "is not a valid interface name" in capsys.readouterr().err
    (state_env / "ports.db").write_text("this is not a database, just text" * 50)
    assert main(["status"]) == 4
    err = capsys.readouterr().err
    assert "is corrupt" in err and len(err.strip().splitlines()) == 1


def test_describe_interface_reads_netlink_without_pins(tmp_path):
    """Without the rights to open the pins (here: a pin file that is no BPF object), the attachment
    still comes from netlink; lo never has XDP."""
    (tmp_path / "lo").mkdir()
    (tmp_path / "lo" / "prog").write_text("")
    info = health.describe_interface("lo", str(tmp_path))
    assert info["attached"] is False and info["pinned"] is True and info["exists"] is True
