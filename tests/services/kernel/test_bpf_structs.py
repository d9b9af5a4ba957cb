"""The mirrors of bpf/common.h against the C side: the C compiler's offsetof/sizeof of the header, the
BTF of the program the kernel really loaded, and the codecs built on them."""
import ctypes
import ipaddress
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from app.services.kernel import bpf_structs
from tests.helpers import collect, make_settings

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"


def c_fields(ctype) -> list[tuple[str, int, int]]:
    """(name, byte offset, byte size) of each field of a mirror, as ctypes lays it out."""
    return [(name, getattr(ctype, name).offset, getattr(ctype, name).size) for name, _ in ctype._fields_]


def test_ctypes_mirror_sizes_match_common_h_layout():
    # sizes as C lays out bpf/common.h (checked against the compiler and the kernel's BTF below)
    assert ctypes.sizeof(bpf_structs.PwPortKey) == 4
    assert ctypes.sizeof(bpf_structs.PwPortValue) == 80
    assert ctypes.sizeof(bpf_structs.PwAddr) == 20
    assert ctypes.sizeof(bpf_structs.PwSourceValue) == 48
    assert ctypes.sizeof(bpf_structs.PwSrcportKey) == 24
    assert ctypes.sizeof(bpf_structs.PwFlowKey) == 48
    assert ctypes.sizeof(bpf_structs.PwFlowValue) == 40
    assert ctypes.sizeof(bpf_structs.PwLpmKey) == 28
    assert ctypes.sizeof(bpf_structs.PwBlacklistValue) == 32
    assert ctypes.sizeof(bpf_structs.PwConnValue) == 16
    assert ctypes.sizeof(bpf_structs.PwSynackValue) == 16
    assert ctypes.sizeof(bpf_structs.PwVerifiedValue) == 24
    assert ctypes.sizeof(bpf_structs.PwScannerValue) == 40
    assert ctypes.sizeof(bpf_structs.PwSynlimitValue) == 40
    assert ctypes.sizeof(bpf_structs.PwDestValue) == 24
    assert ctypes.sizeof(bpf_structs.PwEgressPortValue) == 32
    assert ctypes.sizeof(bpf_structs.PwMeta) == 56
    assert ctypes.sizeof(bpf_structs.PwGlobal) == 8 * len(bpf_structs.GLOBAL_NAMES)
    for ctype in (bpf_structs.PwPortValue, bpf_structs.PwFlowKey, bpf_structs.PwLpmKey, bpf_structs.PwMeta):
        assert struct.calcsize("<" + bpf_structs.struct_format(ctype)) == ctypes.sizeof(ctype)


def test_every_mirror_matches_the_c_compiler_field_by_field(tmp_path):
    """Compile a probe of bpf/common.h (offsetof/sizeof of every field of every mirrored struct, and
    the value of every PW_G_* index) with the host C compiler and compare with ctypes."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang): the BTF test below checks the same against the kernel")
    lines = []
    for ctype in bpf_structs.MIRRORS:
        c = f"struct {ctype._c_name_}"
        lines.append(f'printf("{ctype._c_name_} %zu\\n", sizeof({c}));')
        for name, _ in ctype._fields_:
            lines.append(f'printf("{ctype._c_name_}.{name} %zu %zu\\n", offsetof({c}, {name}), '
                         f'sizeof((({c} *)0)->{name}));')
    for i, name in enumerate(bpf_structs.GLOBAL_NAMES):
        lines.append(f'printf("PW_G_{name.upper()} %d\\n", (int)PW_G_{name.upper()});')
    lines.append('printf("PW_G_MAX %d\\n", (int)PW_G_MAX);')
    probe = tmp_path / "probe.c"
    probe.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n#include \"common.h\"\n"
                     "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    built = subprocess.run([cc, "-I", str(BPF_DIR), "-o", str(tmp_path / "probe"), str(probe)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    out = dict(line.split(" ", 1) for line in subprocess.run([str(tmp_path / "probe")], capture_output=True,
                                                              text=True, check=True).stdout.splitlines())
    for ctype in bpf_structs.MIRRORS:
        assert int(out[ctype._c_name_]) == ctypes.sizeof(ctype), ctype._c_name_
        for name, offset, size in c_fields(ctype):
            assert out[f"{ctype._c_name_}.{name}"] == f"{offset} {size}", (ctype._c_name_, name)
    for i, name in enumerate(bpf_structs.GLOBAL_NAMES):
        assert int(out[f"PW_G_{name.upper()}"]) == i, name
    assert int(out["PW_G_MAX"]) == len(bpf_structs.GLOBAL_NAMES)


def test_numpy_dtypes_have_the_mirrors_offsets():
    import numpy as np
    for name, (_, key_t, val_t) in bpf_structs.MAP_LAYOUT.items():
        for ctype, dtype in ((key_t, bpf_structs.key_dtype(name)), (val_t, bpf_structs.value_dtype(name))):
            assert dtype.itemsize == ctypes.sizeof(ctype), name
            if ctype is bpf_structs.PwAddr:    # a map keyed by one pw_addr: one field holding all of it
                assert dtype.names == ("addr",) and dtype.fields["addr"][0].itemsize == ctypes.sizeof(ctype)
            elif issubclass(ctype, ctypes.Structure):
                assert [(f, dtype.fields[f][1], dtype.fields[f][0].itemsize) for f in dtype.names] == c_fields(ctype)
    assert bpf_structs.value_dtype("eg_dests", 32).itemsize == 32       # a per-CPU slot, padded
    # a flow key decoded by field name from its bytes
    key = bpf_structs.PwFlowKey(src=bpf_structs.PwAddr.from_buffer_copy(bpf_structs.addr_bytes("198.18.20.0")),
                                dst=bpf_structs.PwAddr.from_buffer_copy(bpf_structs.addr_bytes("2001:db8::1")),
                                sport=40000, dport=443, proto=6)
    rec = np.frombuffer(bytes(key), dtype=bpf_structs.key_dtype("flows"))[0]
    assert (bpf_structs.addr_text(rec["src"]), bpf_structs.addr_text(rec["dst"])) == ("198.18.20.0", "2001:db8::1")
    assert (int(rec["sport"]), int(rec["dport"]), int(rec["proto"])) == (40000, 443, 6)


def test_addr_text_roundtrip():
    for text in ("198.18.0.2", "2001:db8::1", "::1", "::ffff:198.18.0.2"):
        assert bpf_structs.addr_text(bpf_structs.addr_bytes(text)) == text
    # an IPv6 ::ffff:a.b.c.d address keeps its family: never the IPv4 host's key
    assert bpf_structs.addr_bytes("::ffff:198.18.0.2") != bpf_structs.addr_bytes("198.18.0.2")
    assert bpf_structs.addr_bytes("::ffff:198.18.0.2")[1:17] == bpf_structs.addr_bytes("198.18.0.2")[1:17]
    # numpy's S20 strips trailing NUL bytes: addr_text pads them back
    for text in ("198.18.0.0", "2001:db8::", "::"):
        assert bpf_structs.addr_text(bpf_structs.addr_bytes(text).rstrip(b"\x00")) == text


def test_lpm_keys_encode_and_decode():
    key = bpf_structs.lpm_key(ipaddress.ip_network("198.18.3.0/24"))
    # prefixlen counts the family byte: 8 + 96 + 24 for an IPv4 /24, 8 + 64 for an IPv6 /64
    assert key[:4] == (128).to_bytes(4, "little") and key[4:24] == bpf_structs.addr_bytes("198.18.3.0")
    assert bpf_structs.lpm_key(ipaddress.ip_network("2001:db8::/64"))[:4] == (72).to_bytes(4, "little")
    # the trie stores key[4:] as a node's data with the value right after it: data of a multiple of 8
    # bytes keeps the value's u64 counters (which XDP and TC add to atomically) naturally aligned, so
    # no atomic ever straddles a cache line (a split lock: thousands of ns per drop)
    assert (len(key) - 4) % 8 == 0 and key[24:] == bytes(len(key) - 24)
    # the IPv4-mapped IPv6 form of a network is an IPv6 key: it never matches IPv4 packets
    assert bpf_structs.lpm_key(ipaddress.ip_network("::ffff:198.18.3.0/120")) != key
    for text in ("198.18.3.0/24", "198.18.3.9/32", "0.0.0.0/0", "2001:db8::/64", "2001:db8::1/128", "::/0",
                 "::ffff:198.18.3.0/120"):
        assert bpf_structs.lpm_key_text(bpf_structs.lpm_key(ipaddress.ip_network(text))) == text
    assert bpf_structs.lpm_key_text(bpf_structs.lpm_key(ipaddress.ip_network("::fffe:0:0/95"))) == "::fffe:0:0/95"


def test_global_names_follow_the_enum_in_common_h():
    text = (BPF_DIR / "common.h").read_text()
    body = text[text.index("enum pw_global_index {"):text.index("PW_G_MAX")]
    names = [m.lower() for m in re.findall(r"PW_G_([A-Z0-9_]+)", body)]
    assert tuple(names) == bpf_structs.GLOBAL_NAMES


@pytest.mark.kernel
def test_every_mirror_matches_the_btf_of_the_loaded_program(lab, tmp_path):
    """The BTF the kernel holds for the running program: every mirrored struct, field by field."""
    s = make_settings(tmp_path)
    collect(s, lab)
    prog = Path(s.general.pin_root) / lab.interface / "prog"
    shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(prog)], capture_output=True,
                                      text=True, check=True).stdout)
    assert shown.get("btf_id"), shown
    dump = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "id", str(shown["btf_id"])],
                                     capture_output=True, text=True, check=True).stdout)
    structs = {t["name"]: t for t in dump["types"] if t["kind"] == "STRUCT"}
    for ctype in bpf_structs.MIRRORS:
        btf = structs[ctype._c_name_]
        assert btf["size"] == ctypes.sizeof(ctype), ctype._c_name_
        assert [(m["name"], m["bits_offset"] // 8) for m in btf["members"]] == \
            [(name, offset) for name, offset, _ in c_fields(ctype)], ctype._c_name_
