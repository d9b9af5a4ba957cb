"""The XDP service: build options, the source hash that decides reloads, interface checks (no root),
and load-once-read-many against the real kernel (root + kernel; reload/recreate and `down` are
covered end to end in tests/threads/test_collection.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from app.errors import UsageError
from app.services.collector import teardown
from app.services.kernel import bpf_structs, egress, maps, xdp, xdp_loader
from app.services.kernel.attachment import XDP_MODE_NAMES
from tests.helpers import make_settings


def test_build_flags_are_map_sizes_and_only_d_flags(tmp_path):
    s = make_settings(tmp_path, flow_map_size=4096, extra_cflags="-DPW_BUILD_REVISION=2")
    flags = xdp.build_flags(s)
    assert "-DFLOW_MAP_SIZE=4096" in flags and flags[-1] == "-DPW_BUILD_REVISION=2"
    assert xdp.map_sizes(s)["flows"] == 4096
    s.collector.extra_cflags = "-DOK=1 -include /etc/passwd"
    with pytest.raises(UsageError, match="may only hold -D flags, not '-include'"):
        xdp.build_flags(s)


def test_source_hash_follows_the_build_flags(tmp_path):
    s = make_settings(tmp_path)
    before = xdp.source_hash(s)
    assert xdp.source_hash(s) == before and len(before) == 64
    s.collector.flow_map_size = 4096
    assert xdp.source_hash(s) != before
    assert set(xdp.HEADERS) == {xdp.BPF_DIR / "common.h", xdp.BPF_DIR / "parse.h"} and xdp.SOURCE.exists()
    assert [p.name for p in xdp.SOURCES] == ["port_flow.c", "egress.c"]


def test_interface_names_are_checked_with_one_sentence():
    for bad in ("", "a/b", "x" * 16):
        with pytest.raises(UsageError, match="is not a valid interface name"):
            xdp.check_interface(bad)
    with pytest.raises(UsageError, match=r"^interface pwnosuch0 does not exist: pick one from `ip link`$"):
        xdp.check_interface("pwnosuch0")


def test_ebpf_flag_prints_the_program_with_its_flags(capsys):
    assert xdp_loader.loader_main(["load", "--interface", "lo", "--pin-dir", "/nonexistent", "--hash", "0" * 64,
                            "--flag=-DFLOW_MAP_SIZE=8", "--ebpf"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("// cflags: -DFLOW_MAP_SIZE=8\n")
    assert xdp.SOURCE.read_text() in out


def test_describe_without_program_or_pins(tmp_path):
    info = xdp.describe("pwnosuch0", tmp_path)
    assert (info["attached"], info["pinned"], info["ours"], info["source_hash"]) == (False, False, False, None)


@pytest.mark.kernel
def test_load_once_then_read_without_compiling(lab, tmp_path):
    s = make_settings(tmp_path)
    first = xdp.ensure_loaded(s, lab.interface)
    # xdp_mode = auto on veth: generic (native veth XDP is a copy path)
    assert first.compiled and first.reason == "first-load" and first.mode == "generic"
    assert egress.mode_text(s, lab.interface, first.mode) == "generic (auto: veth)"
    pdir = Path(s.general.pin_root) / lab.interface
    assert sorted(p.name for p in pdir.iterdir()) == sorted([*bpf_structs.MAP_LAYOUT, "prog", "eg_prog", "owner"])
    meta = xdp.read_meta(pdir)
    assert bytes(meta.source_hash).hex() == xdp.source_hash(s) == first.source_hash
    assert meta.program_id == first.program_id and XDP_MODE_NAMES[meta.mode] == first.mode

    again = xdp.ensure_loaded(s, lab.interface)               # the pinned program is current: no compile
    assert not again.compiled and again.program_id == first.program_id and again.mode == first.mode
    info = xdp.describe(lab.interface, s.general.pin_root)
    assert info["ours"] and info["pinned_program_id"] == first.program_id == xdp.attached_program(lab.interface)[0]
    # the TC egress program: attached on a clsact qdisc portwatch added, and recorded in meta
    assert info["egress_ours"] and info["egress_program_id"] == meta.egress_program_id == egress.attached_egress(lab.interface)
    assert info["clsact_added"] and meta.flags & bpf_structs.META_CLSACT_ADDED
    assert egress.programs_text(info) == (f"XDP {first.program_id} (generic on veth, ours), "
                                          f"TC egress {meta.egress_program_id} (ours)")
    assert xdp.layout_mismatch(pdir, xdp.map_sizes(s)) is None
    with maps.PinnedMap(pdir / "config") as config:
        assert maps.read_struct(config, maps.INDEX_0, bpf_structs.PwConfig).epoch == 0


@pytest.mark.kernel
def test_egress_filter_removed_is_reattached_without_compiling_and_down_removes_both(lab, tmp_path):
    s = make_settings(tmp_path)
    first = xdp.ensure_loaded(s, lab.interface)
    eg_id = egress.attached_egress(lab.interface)
    subprocess.run(["tc", "filter", "del", "dev", lab.interface, "egress", "pref", str(egress.EGRESS_PREF)], check=True)
    assert egress.attached_egress(lab.interface) is None
    again = xdp.ensure_loaded(s, lab.interface)
    assert not again.compiled and again.program_id == first.program_id
    assert egress.attached_egress(lab.interface) == eg_id                  # the pinned program, re-attached
    done = teardown.down(s, lab.interface)
    assert any("TC egress" in d for d in done) and any("clsact" in d for d in done), done
    assert egress.attached_egress(lab.interface) is None and not egress.has_clsact(lab.interface)
    assert xdp.attached_program(lab.interface) is None
    assert not (Path(s.general.pin_root) / lab.interface).exists()


@pytest.mark.kernel
def test_down_keeps_a_clsact_qdisc_portwatch_did_not_add(lab, tmp_path):
    s = make_settings(tmp_path)
    subprocess.run(["tc", "qdisc", "add", "dev", lab.interface, "clsact"], check=True)
    xdp.ensure_loaded(s, lab.interface)
    assert egress.attached_egress(lab.interface) is not None
    assert not xdp.describe(lab.interface, s.general.pin_root)["clsact_added"]
    teardown.down(s, lab.interface)
    assert egress.attached_egress(lab.interface) is None and egress.has_clsact(lab.interface)


def test_auto_mode_prefers_generic_on_virtual_drivers(monkeypatch):
    monkeypatch.setattr(egress, "driver_of", lambda interface: "veth")
    assert egress.auto_modes("x0") == (["generic"], "veth")
    monkeypatch.setattr(egress, "driver_of", lambda interface: "mlx5_core")
    assert egress.auto_modes("x0") == (["native", "generic"], "mlx5_core")


@pytest.mark.kernel
def test_reply_idle_time_and_conversation_map_sizes_are_settings(lab, tmp_path):
    """collector.{conn,synack,scanner}_map_size size the pinned maps; collector.reply_idle_seconds is how
    long a conversation this host opened may idle and still be answered through a block: an ACK from a
    blocked remote passes 29 s after this host's last packet with a 30 s setting, and is dropped at 31 s
    (the program's clock is set in its config map, as a replay sets it: no waiting)."""
    import ipaddress
    from scapy.all import IP, TCP, Ether
    from app.lab import run_frames
    s = make_settings(tmp_path, conn_map_size=4096, synack_map_size=2048, scanner_map_size=512, reply_idle_seconds=30)
    assert "-DREPLY_IDLE_SECONDS=30" in xdp.build_flags(s)
    xdp.ensure_loaded(s, lab.interface)
    pdir = Path(s.general.pin_root) / lab.interface
    sizes = {}
    for name in ("conns", "synacks", "scanners"):
        with maps.PinnedMap(pdir / name) as m:
            sizes[name] = m.info.max_entries
    assert sizes == {"conns": 4096, "synacks": 2048, "scanners": 512}
    remote, local = lab.host_v4(2), lab.root_v4
    key = bpf_structs.PwFlowKey(sport=80, dport=40000, proto=6)         # as the answer arrives
    key.src = bpf_structs.PwAddr.from_buffer_copy(bpf_structs.addr_bytes(remote))
    key.dst = bpf_structs.PwAddr.from_buffer_copy(bpf_structs.addr_bytes(local))
    t0 = 1_000_000_000_000
    with maps.PinnedMap(pdir / "conns") as conns:
        conns.update(bytes(key), bytes(bpf_structs.PwConnValue(last_out_ns=t0, isn=1, flags=1)))
    with maps.PinnedMap(pdir / "blacklist") as blacklist:
        blacklist.update(bpf_structs.lpm_key(ipaddress.ip_network(f"{remote}/32")), bytes(bpf_structs.PwBlacklistValue()))
    ack = bytes(Ether() / IP(src=remote, dst=local) / TCP(sport=80, dport=40000, flags="A", seq=5, ack=2))
    verdicts = []
    with maps.PinnedMap(pdir / "config") as config:
        for idle in (29, 31):
            config.update(maps.INDEX_0, bytes(bpf_structs.PwConfig(clock_ns=t0 + idle * 10 ** 9)))
            verdicts.append(run_frames(pdir / "prog", [ack]))
    assert verdicts == [{2: 1}, {1: 1}]                  # XDP_PASS (an answer), then XDP_DROP (blocked)
