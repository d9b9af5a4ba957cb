"""In-memory stand-ins for the kernel side, so service logic runs without root (tests only).

``FakePinnedMap`` has the interface of app.services.kernel.maps.PinnedMap (name, path, info, percpu, ncpu,
value_stride, record_size, items, lookup, count, update, delete, close, context manager) over a dict,
with the layout of bpf_structs.MAP_LAYOUT[name] and the kernel's semantics where services rely on
them (tests/services/kernel/test_maps.py checks the fake against real pinned maps): per-CPU values are one
slot per CPU padded to 8 bytes; an LRU map evicts its least recently INSERTED key when full (the
kernel's LRU is approximate anyway); a plain hash map or the LPM trie refuses a new key when full
(BpfError "is full"); an array map holds ``max_entries`` zeroed entries and refuses deletes; LPM
lookups take the longest prefix, as bpf_map_lookup_elem does. ``put`` writes per-CPU values the way
the XDP program would; ``evict`` drops a key the way an LRU map does.

Usage::

    fakes = fake_maps(ncpu=2)
    fakes["port_stats"].put(bytes(PwPortKey(port=443, proto=6)), PwPortValue(packets=3), PwPortValue(packets=1))
    collector._maps = fakes          # or blocklist reconciliation with fakes["blacklist"]
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
from pathlib import Path

from app.errors import BpfError
from app.services.kernel import bpf_structs
from app.services.kernel.bpf_structs import (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE,
                                      BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, MAP_LAYOUT,
                                      PERCPU_TYPES)
from app.services.kernel.maps import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MapInfo

ARRAY_TYPES = {BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY}
PLAIN_HASH_TYPES = {BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_HASH}
DEFAULT_ENTRIES = {"port_stats": 65536, "sources": 65536, "srcports": 131072, "flows": 65536, "blacklist": 16384}
_ids = itertools.count(1000)


class FakePinnedMap:
    """One map of bpf/port_flow.c, in memory. Keys and values are raw bytes, as with PinnedMap."""

    def __init__(self, name: str, ncpu: int = 2, max_entries: int | None = None, path: str | Path | None = None):
        mtype, key_t, val_t = MAP_LAYOUT[name]
        self.name = name
        self.path = Path(path) if path is not None else Path("/fake") / name
        entries = max_entries if max_entries is not None else DEFAULT_ENTRIES.get(name, 1)
        self.info = MapInfo(mtype, next(_ids), ctypes.sizeof(key_t), ctypes.sizeof(val_t), entries, 0)
        self.percpu = mtype in PERCPU_TYPES
        self.ncpu = ncpu if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size
        self.record_size = self.value_stride * self.ncpu
        self.fd = 3
        self.entries: dict[bytes, bytes] = {}     # key -> record (record_size bytes), in insertion order
        if mtype in ARRAY_TYPES:
            for i in range(entries):
                self.entries[bytes(ctypes.c_uint32(i))] = bytes(self.record_size)

    # PinnedMap's interface -------------------------------------------------------------------
    def close(self) -> None:
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def items(self, batch: int = 4096) -> tuple[bytes, bytearray, int]:
        return b"".join(self.entries), bytearray(b"".join(self.entries.values())), len(self.entries)

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        if self.info.type == BPF_MAP_TYPE_LPM_TRIE:
            key = self._longest_prefix(key)
            if key is None:
                return None
        return self.entries.get(bytes(key))

    def count(self) -> int:
        return len(self.entries)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check_key(key)
        key, value = bytes(key), bytes(value)
        if len(value) != self.record_size:
            raise ValueError(f"{self.name}: a value is {self.record_size} bytes ({self.ncpu} CPU slot(s)), "
                             f"not {len(value)}")
        exists = key in self.entries
        if self.info.type in ARRAY_TYPES and not exists:
            raise BpfError(f"cannot update map {self.name}: {os.strerror(errno.E2BIG)}")
        if flags == BPF_NOEXIST and exists:
            raise BpfError(f"cannot update map {self.name}: {os.strerror(errno.EEXIST)}")
        if flags == BPF_EXIST and not exists:
            raise BpfError(f"cannot update map {self.name}: {os.strerror(errno.ENOENT)}")
        if not exists and len(self.entries) >= self.info.max_entries:
            if self.info.type in PLAIN_HASH_TYPES or self.info.type == BPF_MAP_TYPE_LPM_TRIE:
                raise BpfError(f"map {self.name} is full ({self.info.max_entries} entries)")
            del self.entries[next(iter(self.entries))]          # LRU: the oldest key goes
        self.entries[key] = value

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        if self.info.type in ARRAY_TYPES:
            raise BpfError(f"cannot delete from map {self.name}: {os.strerror(errno.EINVAL)}")
        return self.entries.pop(bytes(key), None) is not None

    # what the XDP program would do ---------------------------------------------------------------
    def put(self, key: bytes, *values) -> None:
        """Set ``key`` to one value per CPU (ctypes structs, ints for u64 values, or bytes); CPUs not
        given hold zeros. A map that is not per CPU takes one value."""
        if len(values) > self.ncpu:
            raise ValueError(f"{self.name} has {self.ncpu} CPU slot(s), {len(values)} values given")
        slots = []
        for v in values:
            raw = bytes(ctypes.c_uint64(v)) if isinstance(v, int) else bytes(v)
            if len(raw) != self.info.value_size:
                raise ValueError(f"{self.name}: a value is {self.info.value_size} bytes, not {len(raw)}")
            slots.append(raw.ljust(self.value_stride, b"\x00"))
        record = b"".join(slots).ljust(self.record_size, b"\x00")
        if bytes(key) not in self.entries and self.info.type not in ARRAY_TYPES \
                and len(self.entries) >= self.info.max_entries:
            if self.info.type in PLAIN_HASH_TYPES:
                raise BpfError(f"map {self.name} is full ({self.info.max_entries} entries)")
            del self.entries[next(iter(self.entries))]
        self.entries[bytes(key)] = record

    def evict(self, key: bytes) -> None:
        """Drop ``key`` the way an LRU map evicts it (no trace left)."""
        del self.entries[bytes(key)]

    def values_of(self, key: bytes) -> list[bytes]:
        """The per-CPU values of ``key`` (each ``value_size`` bytes)."""
        record = self.entries[bytes(key)]
        return [record[i * self.value_stride:i * self.value_stride + self.info.value_size] for i in range(self.ncpu)]

    # ---------------------------------------------------------------------------------------------
    def _check_key(self, key: bytes) -> None:
        if len(key) != self.info.key_size:
            raise ValueError(f"{self.name}: a key is {self.info.key_size} bytes, not {len(key)}")

    def _longest_prefix(self, key: bytes) -> bytes | None:
        want = bpf_structs.PwLpmKey.from_buffer_copy(key)
        width = 8 * bpf_structs.ADDR_SIZE       # the trie's data: a whole struct pw_addr, family first
        want_bits = int.from_bytes(bytes(want.a), "big")
        best, best_len = None, -1
        for stored in self.entries:
            k = bpf_structs.PwLpmKey.from_buffer_copy(stored)
            if best_len < k.prefixlen <= want.prefixlen:
                shift = width - k.prefixlen
                if int.from_bytes(bytes(k.a), "big") >> shift == want_bits >> shift:
                    best, best_len = stored, k.prefixlen
        return best


def fake_maps(ncpu: int = 2, **max_entries: int) -> dict[str, FakePinnedMap]:
    """The maps app.services.kernel.maps.open_maps opens, as fakes (``flows=8`` sets a size)."""
    names = ("port_stats", "sources", "srcports", "flows", "global", "blacklist", "config")
    return {name: FakePinnedMap(name, ncpu, max_entries.get(name)) for name in names}
