"""libxdp neighbours: xdp-filter (xdp-tools) on the interface keeps working and is named as a libxdp program;
portwatch's own attach says which path it took and why not libxdp's dispatcher.

Real programs on a veth in a network namespace: xdp-filter with a port rule, libxdp's own dispatcher
object, and portwatch's BCC program. What libxdp itself decided (a dispatcher, or the single program
attached plainly when the kernel refuses program extensions) is the cross-check of
app/services/kernel/libxdp.py's probe.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from app.services.kernel import libxdp, pin_owner, xdp
from tests.helpers import UdpSink, pin_root  # noqa: F401
from tests.services.kernel.test_fail_closed import cli, settings_of

DENIED_PORT, OPEN_PORT, COUNT = 40001, 40002, 20
REFUSAL = ("portwatch: error: XDP program {id} ({name}) on {interface} was not loaded by portwatch: portwatch never "
           "replaces it (collect --replace takes the interface over on purpose, stopping what it does)")


def _xdp_filter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["xdp-filter", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def xdp_filter(lab):
    """xdp-filter loaded on the lab's interface (generic mode, as on any veth) with a rule dropping UDP to
    DENIED_PORT; unloaded, its rule and libxdp's bpffs directories removed afterwards."""
    assert shutil.which("xdp-filter"), "xdp-filter is missing: install Debian's xdp-tools (scripts/setup.sh does)"
    had_xdp_dir = Path("/sys/fs/bpf/xdp").exists()
    try:
        loaded = _xdp_filter("load", "--mode", "skb", lab.interface)
        assert loaded.returncode == 0, loaded.stderr
        rule = _xdp_filter("port", str(DENIED_PORT), "--mode", "dst", "--proto", "udp")
        assert rule.returncode == 0, rule.stderr
        yield lab
    finally:
        _xdp_filter("port", str(DENIED_PORT), "--mode", "dst", "--proto", "udp", "--remove")
        _xdp_filter("unload", lab.interface)
        if not had_xdp_dir:               # libxdp's lock directory, made by this test's load
            shutil.rmtree("/sys/fs/bpf/xdp", ignore_errors=True)


def _received(lab, port: int) -> int:
    with UdpSink(lab.root_v4, port) as sink:
        assert int(lab.send("--src", lab.peer_v4, "--dst", lab.root_v4, "--ports", str(port),
                            "--count", str(COUNT))) == COUNT
        return sum(sink.drain().values())


@pytest.mark.kernel
def test_xdp_filter_is_named_as_a_libxdp_program_and_keeps_dropping(xdp_filter, tmp_path, pin_root):
    lab = xdp_filter
    attached = xdp.attached_program(lab.interface)[0]
    name = pin_owner.program_name(attached)
    usable, why = libxdp.dispatcher_support()
    # libxdp's own choice agrees with the probe: a dispatcher where extensions load, the bare program else
    assert name == ("xdp_dispatcher" if usable else "xdpfilt_alw_all"), (name, why)
    if usable:
        clause = (f"; it is libxdp's multi-program dispatcher (`xdp-loader status {lab.interface}` lists what it "
                  "runs), and portwatch's BCC-loaded program does not join libxdp's dispatcher")
    else:
        clause = ("; it is a libxdp program (run priority 10) attached without a dispatcher, and libxdp's "
                  f"dispatcher cannot chain portwatch beside it here: {why}")
    sentence = REFUSAL.format(id=attached, name=name, interface=lab.interface) + clause

    s = settings_of(tmp_path, "a", pin_root)
    out = cli(s, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
    assert out.returncode == 5, out.stdout + out.stderr
    assert out.stderr.strip() == sentence
    assert xdp.attached_program(lab.interface)[0] == attached            # xdp-filter still attached
    assert not (Path(pin_root) / lab.interface).exists() and not Path(s.general.db).exists()
    # ... and still working: its rule drops every datagram to DENIED_PORT, the others pass
    assert _received(lab, DENIED_PORT) == 0
    assert _received(lab, OPEN_PORT) == COUNT
    hits = [line.split() for line in _xdp_filter("status").stdout.splitlines() if line.strip().startswith(str(DENIED_PORT))]
    assert hits == [[str(DENIED_PORT), "dst,udp", str(COUNT)]]
    assert sentence.removeprefix("portwatch: error: ") in cli(s, "status", "--interface", lab.interface).stdout
    assert f"XDP program {attached} ({name}) on {lab.interface}" in cli(s, "doctor").stdout


@pytest.mark.kernel
def test_a_libxdp_dispatcher_is_named_as_one(lab, tmp_path, pin_root):
    obj = libxdp.dispatcher_object()
    assert obj is not None, "libxdp's xdp-dispatcher.o is missing: install Debian's libxdp1 (scripts/setup.sh does)"
    pin = Path(pin_root).with_name(Path(pin_root).name + "-dispatcher")      # libxdp's dispatcher, as another tool
    try:
        subprocess.run(["bpftool", "prog", "load", str(obj), str(pin), "type", "xdp"], check=True, capture_output=True)
        subprocess.run(["bpftool", "net", "attach", "xdpgeneric", "pinned", str(pin), "dev", lab.interface],
                       check=True, capture_output=True)
        attached = xdp.attached_program(lab.interface)[0]
        assert libxdp.libxdp_role(attached, pin_owner.program_name(attached)) == ("dispatcher", None)
        s = settings_of(tmp_path, "a", pin_root)
        out = cli(s, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
        assert out.returncode == 5, out.stdout + out.stderr
        assert out.stderr.strip().startswith(
            REFUSAL.format(id=attached, name="xdp_dispatcher", interface=lab.interface)
            + f"; it is libxdp's multi-program dispatcher (`xdp-loader status {lab.interface}` lists what it runs), ")
        assert xdp.attached_program(lab.interface)[0] == attached
    finally:
        pin.unlink(missing_ok=True)


@pytest.mark.kernel
def test_status_says_portwatch_attached_plainly_and_why_not_through_libxdp(lab, tmp_path, pin_root):
    s = settings_of(tmp_path, "a", pin_root)
    out = cli(s, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
    assert out.returncode == 0, out.stderr
    info = xdp.describe(lab.interface, pin_root)
    assert info["ours"] and libxdp.libxdp_role(info["program_id"], "xdp_port_flow") == (None, None)
    usable, why = libxdp.dispatcher_support()
    attach = ("plain XDP attach (portwatch does not join libxdp's dispatcher)" if usable
              else f"plain XDP attach (libxdp's dispatcher is not usable: {why})")
    assert info["attach"] == attach
    assert f"; {attach}" in cli(s, "status", "--interface", lab.interface).stdout
