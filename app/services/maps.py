"""Open pinned BPF maps and batch-read them WITHOUT BCC: libbpf (Debian's libbpf1) through ctypes.

This is the collector's read path on every run after the first: no clang, no LLVM, no BCC
import — a few syscalls per map. Each C struct of bpf/common.h has exactly one ctypes mirror
below, commented with its C name; tests/services/test_maps.py checks their sizes against the
key/value sizes the kernel reports for the maps the real program created.

Per-CPU maps return one value per possible CPU, each rounded up to 8 bytes; they are summed
here (counters), or min/max-reduced (payload extremes).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.errors import BpfError, DependencyError

# --- ctypes mirrors of bpf/common.h -------------------------------------------------------


class PwAddr(ctypes.Structure):            # struct pw_addr
    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class PwPortKey(ctypes.Structure):         # struct pw_port_key
    _fields_ = [("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PwPortValue(ctypes.Structure):       # struct pw_port_value
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("payload_bytes", ctypes.c_uint64),
                ("syn", ctypes.c_uint64), ("synack", ctypes.c_uint64), ("rst", ctypes.c_uint64),
                ("fin", ctypes.c_uint64), ("min_payload", ctypes.c_uint32), ("max_payload", ctypes.c_uint32),
                ("round_min", ctypes.c_uint32), ("round_max", ctypes.c_uint32), ("epoch", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class PwSourceValue(ctypes.Structure):     # struct pw_source_value
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("syn", ctypes.c_uint64)]


class PwSrcportKey(ctypes.Structure):      # struct pw_srcport_key
    _fields_ = [("src", PwAddr), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PwFlowKey(ctypes.Structure):         # struct pw_flow_key
    _fields_ = [("src", PwAddr), ("dst", PwAddr), ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class PwFlowValue(ctypes.Structure):       # struct pw_flow_value
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("first_seen_ns", ctypes.c_uint64),
                ("last_seen_ns", ctypes.c_uint64), ("tcp_flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PwGlobal(ctypes.Structure):          # struct pw_global
    _fields_ = [("c", ctypes.c_uint64 * 20)]  # PW_G_MAX = len(GLOBAL_NAMES)


class PwLpmKey(ctypes.Structure):          # struct pw_lpm_key
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class PwBlacklistValue(ctypes.Structure):  # struct pw_blacklist_value
    _fields_ = [("drops", ctypes.c_uint64), ("drop_bytes", ctypes.c_uint64), ("last_drop_ns", ctypes.c_uint64)]


class PwConfig(ctypes.Structure):          # struct pw_config
    _fields_ = [("epoch", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class PwMeta(ctypes.Structure):            # struct pw_meta
    _fields_ = [("source_hash", ctypes.c_uint8 * 32), ("loaded_at", ctypes.c_uint64),
                ("program_id", ctypes.c_uint32), ("mode", ctypes.c_uint32)]


PW_F_BLACKLIST_OFF = 1 << 0                # PW_F_* of common.h
PW_F_FLOWS_OFF = 1 << 1
PW_F_SRCPORTS_OFF = 1 << 2

# enum pw_global, in order
GLOBAL_NAMES = ("total", "bytes", "parsed", "unparsed", "non_ip", "dropped", "dropped_bytes", "ipv4", "ipv6",
                "tcp", "udp", "icmp", "icmpv6", "other_l4", "fragments", "vlan", "flow_inserts",
                "srcport_inserts", "source_inserts", "port_map_full")
assert len(GLOBAL_NAMES) == len(PwGlobal._fields_[0][1]()), "GLOBAL_NAMES must name every PW_G_* counter"

# map name -> (BPF map type number, key mirror, value mirror, per-CPU)
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 2, 5, 6
BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_LPM_TRIE = 9, 10, 11
MAP_LAYOUT = {
    "port_stats": (BPF_MAP_TYPE_PERCPU_HASH, PwPortKey, PwPortValue),
    "sources": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwAddr, PwSourceValue),
    "srcports": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwSrcportKey, ctypes.c_uint64),
    "flows": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwFlowKey, PwFlowValue),
    "global": (BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, PwGlobal),
    "blacklist": (BPF_MAP_TYPE_LPM_TRIE, PwLpmKey, PwBlacklistValue),
    "config": (BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, PwConfig),
    "meta": (BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, PwMeta),
}
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


def struct_format(ctype) -> str:
    """A struct-module format (no byte-order prefix) equal to a ctypes mirror's layout.

    Byte arrays become 'Ns' (bytes), other arrays repeat their element, nested structs inline.
    """
    codes = {ctypes.c_uint64: "Q", ctypes.c_uint32: "I", ctypes.c_uint16: "H", ctypes.c_uint8: "B"}
    if ctype in codes:
        return codes[ctype]
    if issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_uint8:
            return f"{ctype._length_}s"
        return struct_format(ctype._type_) * ctype._length_
    return "".join(struct_format(t) for _, t in ctype._fields_)


# --- libbpf through ctypes -------------------------------------------------------------------


class BpfMapInfo(ctypes.Structure):        # struct bpf_map_info (uapi/linux/bpf.h), leading fields
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64)]


class BpfProgInfo(ctypes.Structure):       # struct bpf_prog_info (uapi/linux/bpf.h), leading fields
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


@lru_cache(maxsize=1)
def libbpf() -> ctypes.CDLL:
    """Debian's libbpf1 (libbpf.so.1) with argument types declared."""
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        raise DependencyError("libbpf.so.1 is missing: install Debian's libbpf1 (make setup does)") from None
    vp, c_int, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_map_get_next_key.argtypes = [c_int, vp, vp]
    lib.bpf_map_lookup_elem.argtypes = [c_int, vp, vp]
    lib.bpf_map_update_elem.argtypes = [c_int, vp, vp, ctypes.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [c_int, vp]
    lib.bpf_map_lookup_batch.argtypes = [c_int, vp, vp, vp, vp, u32p, vp]
    lib.bpf_obj_get_info_by_fd.argtypes = [c_int, vp, u32p]
    lib.libbpf_num_possible_cpus.argtypes = []
    return lib


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    n = libbpf().libbpf_num_possible_cpus()
    if n <= 0:
        raise BpfError(f"cannot read the number of possible CPUs ({os.strerror(-n)})")
    return n


def _err(rc: int) -> int:
    """libbpf >= 1.0 returns -errno; older versions return -1 and set errno."""
    return -rc if rc < -1 else ctypes.get_errno()


@dataclass
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class PinnedMap:
    """One pinned map, opened by path (bpf_obj_get). Keys/values are raw bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        rc = libbpf().bpf_obj_get(str(self.path).encode())
        if rc < 0:
            code = _err(rc)
            if code == errno.ENOENT:
                raise BpfError(f"pinned map {self.path} does not exist: run a collection to load the program")
            if code in (errno.EPERM, errno.EACCES):
                raise BpfError(f"no permission to open {self.path}: run as root", exit_code=3)
            raise BpfError(f"cannot open pinned map {self.path}: {os.strerror(code)}")
        self.fd = rc
        self.info = self._info()
        self.name = self.path.name
        self.percpu = self.info.type in PERCPU_TYPES
        self.ncpu = possible_cpus() if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size
        self.record_size = self.value_stride * self.ncpu  # bytes one lookup returns

    def _info(self) -> MapInfo:
        info = BpfMapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        rc = libbpf().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size))
        if rc < 0:
            raise BpfError(f"cannot read map info of {self.path}: {os.strerror(_err(rc))}")
        return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # reading -------------------------------------------------------------------------------
    def items(self, batch: int = 4096) -> tuple[bytes, bytearray, int]:
        """All entries as (keys, values, n): keys is n*key_size bytes, values n*record_size bytes.

        Uses BPF_MAP_LOOKUP_BATCH (one syscall per ``batch`` entries) and falls back to
        get_next_key + lookup for map types without batch support (LPM trie).
        """
        ks, rs = self.info.key_size, self.record_size
        lib = libbpf()
        out_keys, out_vals, total = bytearray(), bytearray(), 0
        keys = ctypes.create_string_buffer(ks * batch)
        vals = ctypes.create_string_buffer(rs * batch)
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        first = True
        while True:
            count = ctypes.c_uint32(batch)
            rc = lib.bpf_map_lookup_batch(self.fd, None if first else token_in, token_out, keys, vals,
                                          ctypes.byref(count), None)
            code = _err(rc) if rc < 0 else 0
            if rc < 0 and code not in (errno.ENOENT,):
                if first and code in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: kernel ENOTSUPP
                    return self._items_slow()
                if code == errno.ENOSPC:       # a hash bucket larger than the batch: grow
                    batch *= 2
                    keys = ctypes.create_string_buffer(ks * batch)
                    vals = ctypes.create_string_buffer(rs * batch)
                    continue
                raise BpfError(f"cannot read map {self.path}: {os.strerror(code)}")
            n = count.value
            if n:
                out_keys += memoryview(keys)[: n * ks]
                out_vals += memoryview(vals)[: n * rs]
                total += n
            if rc < 0:          # ENOENT: that was the last batch
                break
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False
        return bytes(out_keys), out_vals, total

    def _items_slow(self) -> tuple[bytes, bytes, int]:
        ks, rs = self.info.key_size, self.record_size
        lib = libbpf()
        key = ctypes.create_string_buffer(ks)
        nxt = ctypes.create_string_buffer(ks)
        val = ctypes.create_string_buffer(rs)
        out_keys, out_vals = [], []
        prev = None
        while True:
            rc = lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if rc < 0:
                break
            ctypes.memmove(key, nxt, ks)
            prev = key
            if lib.bpf_map_lookup_elem(self.fd, key, val) == 0:
                out_keys.append(key.raw)
                out_vals.append(val.raw)
        return b"".join(out_keys), b"".join(out_vals), len(out_keys)

    def lookup(self, key: bytes) -> bytes | None:
        val = ctypes.create_string_buffer(self.record_size)
        rc = libbpf().bpf_map_lookup_elem(self.fd, key, val)
        return val.raw if rc == 0 else None

    def count(self) -> int:
        """Number of entries (iterates keys; cheap compared with reading values)."""
        lib = libbpf()
        ks = self.info.key_size
        a, b = ctypes.create_string_buffer(ks), ctypes.create_string_buffer(ks)
        n, prev = 0, None
        while lib.bpf_map_get_next_key(self.fd, prev, b) == 0:
            n += 1
            ctypes.memmove(a, b, ks)
            prev = a
        return n

    # writing -------------------------------------------------------------------------------
    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = libbpf().bpf_map_update_elem(self.fd, key, value, flags)
        if rc < 0:
            code = _err(rc)
            if code == errno.E2BIG or code == errno.ENOSPC:
                raise BpfError(f"map {self.name} is full ({self.info.max_entries} entries)")
            raise BpfError(f"cannot update map {self.name}: {os.strerror(code)}")

    def delete(self, key: bytes) -> bool:
        """True when the key existed."""
        rc = libbpf().bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            code = _err(rc)
            if code == errno.ENOENT:
                return False
            raise BpfError(f"cannot delete from map {self.name}: {os.strerror(code)}")
        return True


def prog_info(path: str | Path) -> BpfProgInfo:
    """Info of a pinned program (its kernel id, name, tag)."""
    lib = libbpf()
    rc = lib.bpf_obj_get(str(path).encode())
    if rc < 0:
        raise BpfError(f"pinned program {path} cannot be opened: {os.strerror(_err(rc))}")
    try:
        info = BpfProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(rc, ctypes.byref(info), ctypes.byref(size)) < 0:
            raise BpfError(f"cannot read program info of {path}")
        return info
    finally:
        os.close(rc)


# --- decoding ---------------------------------------------------------------------------------

def addr_text(raw: bytes) -> str:
    """Text of a 16-byte pw_addr: dotted IPv4 for IPv4-mapped addresses, else IPv6."""
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return "%d.%d.%d.%d" % tuple(raw[12:16])
    import ipaddress
    return str(ipaddress.IPv6Address(raw))


def addr_bytes(text: str) -> bytes:
    """Inverse of addr_text: IPv4 becomes IPv4-mapped IPv6."""
    import ipaddress
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def lpm_key_text(key: bytes) -> str:
    """CIDR text of a pw_lpm_key (IPv4-mapped prefixes become IPv4 CIDRs)."""
    prefixlen = int.from_bytes(key[0:4], "little")
    addr = key[4:20]
    if addr[:12] == b"\x00" * 10 + b"\xff\xff" and prefixlen >= 96:
        return f"{addr_text(addr)}/{prefixlen - 96}"
    import ipaddress
    return str(ipaddress.IPv6Network((addr, prefixlen), strict=False))



def open_maps(pin_dir: str | Path, names=("port_stats", "sources", "srcports", "flows", "global", "blacklist",
                                          "config")) -> dict[str, PinnedMap]:
    pin_dir = Path(pin_dir)
    out = {}
    try:
        for name in names:
            out[name] = PinnedMap(pin_dir / name)
    except Exception:
        for m in out.values():
            m.close()
        raise
    return out


def layout_mismatch(pin_dir: str | Path, sizes: dict[str, int]) -> str | None:
    """Why the pinned maps cannot be reused by a program built now (or None when they can).

    sizes: map name -> max_entries the new build asks for.
    """
    for name, (mtype, key_t, val_t) in MAP_LAYOUT.items():
        path = Path(pin_dir) / name
        if not path.exists():
            return f"map {name} is not pinned"
        with PinnedMap(path) as m:
            if m.info.type != mtype:
                return f"map {name} has type {m.info.type}, expected {mtype}"
            if m.info.key_size != ctypes.sizeof(key_t) or m.info.value_size != ctypes.sizeof(val_t):
                return f"map {name} has key/value sizes {m.info.key_size}/{m.info.value_size}, expected {ctypes.sizeof(key_t)}/{ctypes.sizeof(val_t)}"
            want = sizes.get(name)
            if want is not None and m.info.max_entries != want:
                return f"map {name} has {m.info.max_entries} entries, the configuration asks for {want}"
    return None


def read_config(pin_dir: str | Path) -> PwConfig:
    with PinnedMap(Path(pin_dir) / "config") as m:
        raw = m.lookup(struct.pack("<I", 0))
    return PwConfig.from_buffer_copy(raw[: ctypes.sizeof(PwConfig)])


def write_config(pin_dir: str | Path, cfg: PwConfig) -> None:
    with PinnedMap(Path(pin_dir) / "config") as m:
        m.update(struct.pack("<I", 0), bytes(cfg))


def read_meta(pin_dir: str | Path) -> PwMeta | None:
    path = Path(pin_dir) / "meta"
    if not path.exists():
        return None
    with PinnedMap(path) as m:
        raw = m.lookup(struct.pack("<I", 0))
    return PwMeta.from_buffer_copy(raw[: ctypes.sizeof(PwMeta)]) if raw else None


def write_meta(pin_dir: str | Path, meta: PwMeta) -> None:
    with PinnedMap(Path(pin_dir) / "meta") as m:
        m.update(struct.pack("<I", 0), bytes(meta))
