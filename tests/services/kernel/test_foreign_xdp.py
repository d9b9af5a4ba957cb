"""A good neighbour on the interface: an XDP program portwatch did not load is never replaced by accident.

Real XDP on a veth in a network namespace: a two-instruction pass program (tests/helpers.attach_foreign_xdp)
stands for a load balancer or a DDoS filter someone else attached.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from app.services.kernel import xdp
from tests.helpers import attach_foreign_xdp, pin_root  # noqa: F401
from tests.services.kernel.test_fail_closed import cli, settings_of


@pytest.mark.kernel
def test_a_foreign_program_is_refused_shown_and_replaced_only_on_purpose(lab, tmp_path, pin_root):
    foreign = attach_foreign_xdp(lab.interface)
    s = settings_of(tmp_path, "a", pin_root)
    out = cli(s, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
    assert out.returncode == 5, out.stdout + out.stderr
    assert out.stderr.strip() == (
        f"portwatch: error: XDP program {foreign} (foreign_pass) on {lab.interface} was not loaded by portwatch: "
        "portwatch never replaces it (collect --replace takes the interface over on purpose, stopping what it does)")
    assert xdp.attached_program(lab.interface)[0] == foreign          # still there, still working
    assert not (Path(pin_root) / lab.interface).exists()              # nothing pinned, nothing claimed
    assert not Path(s.general.db).exists()
    status = cli(s, "status", "--interface", lab.interface)
    assert f"XDP program {foreign} (foreign_pass) on {lab.interface} was not loaded by portwatch" in status.stdout
    doctor = cli(s, "doctor")
    assert f"XDP program {foreign} (foreign_pass) on {lab.interface}" in doctor.stdout
    out = cli(s, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner",
              "--replace")
    assert out.returncode == 0, out.stderr
    info = xdp.describe(lab.interface, pin_root)
    assert info["ours"] and info["program_id"] != foreign and not info["foreign"]
