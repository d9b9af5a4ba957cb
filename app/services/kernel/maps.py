"""Open pinned BPF maps and batch-read them WITHOUT BCC: libbpf (Debian's libbpf1) through ctypes.

This is the collector's read path on every run after the first: no clang, no LLVM, no BCC import — a
few syscalls per map. Keys and values are raw bytes here (:class:`PinnedMap`); what they mean lives in
app/services/kernel/bpf_structs.py (tests/services/kernel/test_maps.py checks its layouts against the
key/value sizes the kernel reports for the maps the real program created).
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.errors import BpfError, DependencyError
from app.services.kernel.bpf_structs import PERCPU_TYPES

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


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
    """One pinned map, opened by path (bpf_obj_get). Keys/values are raw bytes.

    Per-CPU maps return one value per possible CPU, each rounded up to 8 bytes (``value_stride``);
    callers sum or reduce them (app/services/collector/rounds.py)."""

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


COUNTING_MAPS = ("port_stats", "sources", "srcports", "flows", "global", "blacklist", "config",
                 "eg_ports", "eg_dests", "eg_dstports", "eg_flows", "eg_global", "verified", "scanners")


def open_maps(pin_dir: str | Path, names=COUNTING_MAPS, missing_ok: bool = False) -> dict[str, PinnedMap]:
    """The pinned maps ``names`` of one interface; with ``missing_ok`` the absent ones are left out."""
    pin_dir = Path(pin_dir)
    out = {}
    try:
        for name in names:
            if missing_ok and not (pin_dir / name).exists():
                continue
            out[name] = PinnedMap(pin_dir / name)
    except Exception:
        for m in out.values():
            m.close()
        raise
    return out


INDEX_0 = bytes(ctypes.c_uint32(0))     # the key of an array map's first (config, meta: only) entry


def read_struct(m: PinnedMap, key: bytes, ctype):
    """The value of ``key`` as the ctypes struct ``ctype`` (the first CPU's slot of a per-CPU map),
    or None when the key is absent. ``m`` is a PinnedMap or anything with its ``lookup``."""
    raw = m.lookup(key)
    if raw is None:
        return None
    size = ctypes.sizeof(ctype)
    # a shorter value (a map made by an older layout whose struct grew at its end) reads as zeros there
    return ctype.from_buffer_copy(raw[:size].ljust(size, b"\x00"))
