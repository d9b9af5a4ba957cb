"""PinnedMap and the map layouts against the maps the kernel really created (sizes and types from map info;
the field-by-field checks of the mirrors are tests/services/test_bpf_structs.py)."""
import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from app.services import bpf_structs, maps, xdp
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
