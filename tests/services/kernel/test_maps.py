"""PinnedMap and the map layouts against the maps the kernel really created (sizes and types from map info;
the field-by-field checks of the mirrors are tests/services/kernel/test_bpf_structs.py)."""
import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from app.services.kernel import bpf_structs, maps, xdp
from tests.helpers import collect, make_settings

pytestmark = pytest.mark.kernel


def test_mirrors_match_kernel_maps_and_btf(lab, tmp_path):
    s = make_settings(tmp_path, flow_map_size=8192)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    for name, (mtype, key_t, val_t) in bpf_structs.MAP_LAYOUT.items():
        with maps.PinnedMap(pdir / name) as m:
            assert m.info.type == mtype, name
            assert m.info.key_size == ctypes.sizeof(key_t), name
            assert m.info.value_size == ctypes.sizeof(val_t), name
    assert xdp.layout_mismatch(pdir, {"flows": 8192}) is None
    assert "8192" in xdp.layout_mismatch(pdir, {"flows": 4096})
    # the BTF the kernel holds for the value type names the same size (a second, independent check)
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pdir / "flows")], capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["bytes_value"] == ctypes.sizeof(bpf_structs.PwFlowValue)
    assert info["bytes_key"] == ctypes.sizeof(bpf_structs.PwFlowKey)


def test_the_fake_pinned_map_behaves_like_the_real_one(lab, tmp_path):
    """tests/fakes.FakePinnedMap against real pinned maps: same sizes, same answers, same refusals."""
    import ipaddress

    from app.errors import BpfError
    from tests.fakes import FakePinnedMap

    s = make_settings(tmp_path, blacklist_map_size=2)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    ncpu = maps.possible_cpus()
    net = lambda text: bpf_structs.lpm_key(ipaddress.ip_network(text))  # noqa: E731
    zero = bytes(bpf_structs.PwBlacklistValue())
    one = bytes(bpf_structs.PwBlacklistValue(drops=1))
    for name in ("blacklist", "config", "flows"):
        with maps.PinnedMap(pdir / name) as real:
            fake = FakePinnedMap(name, ncpu=ncpu, max_entries=real.info.max_entries)
            assert (fake.info.type, fake.info.key_size, fake.info.value_size, fake.info.max_entries) == \
                (real.info.type, real.info.key_size, real.info.value_size, real.info.max_entries)
            assert (fake.percpu, fake.ncpu, fake.value_stride, fake.record_size) == \
                (real.percpu, real.ncpu, real.value_stride, real.record_size)
            assert fake.count() == real.count()
    with maps.PinnedMap(pdir / "blacklist") as real:
        fake = FakePinnedMap("blacklist", max_entries=2)
        for m in (real, fake):
            m.update(net("198.18.0.0/24"), zero)
            m.update(net("198.18.0.9/32"), one)
        for m in (real, fake):
            # lookups take the longest prefix, as the XDP program's do
            assert m.lookup(net("198.18.0.9/32")) == one and m.lookup(net("198.18.0.7/32")) == zero
            assert m.lookup(net("198.18.1.7/32")) is None
            with pytest.raises(BpfError, match="File exists"):
                m.update(net("198.18.0.0/24"), zero, maps.BPF_NOEXIST)
            with pytest.raises(BpfError, match="is full"):
                m.update(net("2001:db8::/64"), zero)
            keys, _, n = m.items()
            assert n == 2 and sorted(bpf_structs.lpm_key_text(keys[i * m.info.key_size:(i + 1) * m.info.key_size]) for i in range(n)) == \
                ["198.18.0.0/24", "198.18.0.9/32"]
            assert m.delete(net("198.18.0.9/32")) and not m.delete(net("198.18.0.9/32"))
            assert m.lookup(net("198.18.0.9/32")) == zero
    with maps.PinnedMap(pdir / "config") as real:
        fake = FakePinnedMap("config")
        for m in (real, fake):
            with pytest.raises(BpfError):
                m.delete(maps.INDEX_0)
            assert maps.read_struct(m, maps.INDEX_0, bpf_structs.PwConfig) is not None
