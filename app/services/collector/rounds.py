"""Cumulative kernel snapshots -> per-round differences (array code, no I/O).

The kernel never resets a counter: a round stores, per key, cumulative-now minus cumulative-at-the-last-
snapshot (:func:`diff`), the last snapshot kept in SQLite (counter_snapshots, in buckets: :func:`pack_buckets`),
so nothing is lost or counted twice across round boundaries, a SIGKILLed run, a skipped minute or a
reload that kept the pinned maps. Values are decoded with numpy structured dtypes built from the ctypes
mirrors in bpf_structs.py (:func:`decode`): a round over 50k entries costs milliseconds, not a Python
loop per CPU per field."""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import numpy as np

from app.services.kernel import bpf_structs

# counters kept per map in snapshots (in this order)
COUNTERS = {
    "port_stats": ("packets", "bytes", "payload_bytes", "syn", "synack", "rst", "fin"),
    "sources": ("packets", "bytes", "syn", "fragments"),
    "srcports": ("packets",),
    "flows": ("packets", "bytes"),
    "global": bpf_structs.GLOBAL_NAMES,
    "blacklist": ("drops", "drop_bytes", "replies"),
    "verified": ("proofs",),
    "scanners": ("ports", "packets", "syn"),
    # TC egress (bpf/egress.c)
    "eg_ports": ("packets", "bytes", "payload_bytes", "syn"),
    "eg_dests": ("packets", "bytes", "syn"),
    "eg_dstports": ("packets",),
    "eg_flows": ("packets", "bytes"),
    "eg_global": bpf_structs.GLOBAL_NAMES,
}
GLOBAL_MAPS = ("global", "eg_global")
SCALAR_MAPS = ("srcports", "eg_dstports")
FLOW_MAPS = ("flows", "eg_flows")
U32_MAX = np.uint64(0xFFFFFFFF)
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class MapReading:
    """One map read at one time.

    raw_keys: the n keys back to back (n * key_size bytes); counters: (n, width) uint64, columns
    COUNTERS[name]; extras: (n, k) uint64 per-key extras (see decode), or None.
    """
    name: str
    raw_keys: bytes
    key_size: int
    counters: np.ndarray
    extras: np.ndarray | None = None
    max_entries: int = 0

    @property
    def entries(self) -> int:
        return len(self.counters)

    @property
    def key_array(self) -> np.ndarray:
        """Keys as fixed-width byte strings ('S<key_size>'), for vectorised joins.
        (Never turn these into Python bytes with tolist(): numpy strips trailing NULs.)"""
        return np.frombuffer(self.raw_keys, dtype=f"S{self.key_size}", count=self.entries)

    def key(self, i: int) -> bytes:
        return self.raw_keys[i * self.key_size:(i + 1) * self.key_size]

    @property
    def keys(self) -> list[bytes]:
        ks = self.key_size
        return [self.raw_keys[i:i + ks] for i in range(0, len(self.counters) * ks, ks)]


def empty(name: str, key_size: int = 1) -> MapReading:
    return MapReading(name, b"", key_size, np.zeros((0, len(COUNTERS[name])), dtype=np.uint64))


def decode(name: str, keys: bytes, values: bytes, n: int, key_size: int, stride: int, ncpu: int,
           epoch: int | None = None) -> MapReading:
    """Decode raw batch-read bytes of map ``name`` (n keys, n * ncpu values of ``stride`` bytes).

    Per-CPU counters are summed. Extras per key:
      port_stats: (round_min, round_max) payload bytes over CPUs whose round epoch equals ``epoch``
                  (U32_MAX / 0 when no packet of this round was seen);
      sources:    (ttl_min, ttl_max) the same way (U32_MAX / 0: no packet this round), then (mac as a
                  48-bit integer, 0: none this round; 1 when several MACs came under the address);
      flows, eg_flows: (first_seen_ns, last_seen_ns, tcp_flags) reduced over CPUs (min, max, OR);
      blacklist:  (last_drop_ns,);
      verified:   (proof, ttl, mac as a 48-bit integer) of the latest proof.
    """
    if n == 0:
        return empty(name, key_size)
    arr = np.frombuffer(values, dtype=bpf_structs.value_dtype(name, stride), count=n * ncpu).reshape(n, ncpu)
    extras = None
    if name in GLOBAL_MAPS:
        counters = arr["c"].sum(axis=1, dtype=np.uint64)
    elif name in SCALAR_MAPS:
        counters = arr["value"].sum(axis=1, dtype=np.uint64).reshape(n, 1)
    else:
        counters = np.stack([arr[f].astype(np.uint64).sum(axis=1, dtype=np.uint64) for f in COUNTERS[name]], axis=1)
        seen = arr["packets"] > 0 if name in ("port_stats", "sources", *FLOW_MAPS) else None
        if name in ("port_stats", "sources"):
            lo, hi = ("round_min", "round_max") if name == "port_stats" else ("ttl_min", "ttl_max")
            mask = seen & (arr["epoch"] == (epoch if epoch is not None else -1))
            rmin = np.where(mask, arr[lo].astype(np.uint64), U32_MAX).min(axis=1)
            rmax = np.where(mask, arr[hi].astype(np.uint64), 0).max(axis=1)
            extras = np.stack([rmin, rmax], axis=1)
            if name == "sources":
                extras = np.concatenate([extras, _round_mac(arr, mask)], axis=1)
        elif name in FLOW_MAPS:
            first = np.where(seen, arr["first_seen_ns"], U64_MAX).min(axis=1)
            first = np.where(first == U64_MAX, 0, first)
            last = np.where(seen, arr["last_seen_ns"], 0).max(axis=1)
            flags = np.bitwise_or.reduce(np.where(seen, arr["tcp_flags"].astype(np.uint64), 0), axis=1)
            extras = np.stack([first, last, flags], axis=1)
        elif name == "blacklist":
            extras = arr["last_drop_ns"].max(axis=1).reshape(n, 1)
        elif name == "verified":
            extras = np.stack([arr["proof"][:, 0].astype(np.uint64), arr["ttl"][:, 0].astype(np.uint64),
                               mac_ints(arr["mac"])[:, 0]], axis=1)
    return MapReading(name, keys[: n * key_size], key_size, np.ascontiguousarray(counters, dtype=np.uint64), extras)


def mac_ints(field: np.ndarray) -> np.ndarray:
    """A ``__u8 mac[6]`` field (numpy 'S6', any shape) as 48-bit integers of the same shape."""
    octets = np.frombuffer(field.tobytes(), dtype=np.uint8).reshape(*field.shape, 6).astype(np.uint64)
    mac = np.zeros(field.shape, dtype=np.uint64)
    for i in range(6):
        mac = (mac << np.uint64(8)) | octets[..., i]
    return mac


def _round_mac(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, 2): a source's MAC this round (0: no packet) and 1 when more than one MAC came under it,
    over the CPUs whose slot belongs to this round (``mask``)."""
    mac = mac_ints(arr["mac"])
    hi = np.where(mask, mac, 0).max(axis=1)
    lo = np.where(mask, mac, U64_MAX).min(axis=1)
    mixed = (np.where(mask, arr["mac_mixed"], 0).max(axis=1) > 0) | (mask.any(axis=1) & (lo != hi))
    return np.stack([hi, mixed.astype(np.uint64)], axis=1)


def read_map(m, epoch: int | None = None) -> MapReading:
    """Read and decode one map (an app.services.kernel.maps.PinnedMap, or anything with its interface).

    A map made by an older layout whose value struct has since grown at its end (pw_global gained
    counters) is read with the missing trailing fields as zeros."""
    keys, values, n = m.items()
    stride = m.value_stride
    want = ctypes.sizeof(bpf_structs.MAP_LAYOUT[m.name][2])
    if n and m.info.value_size < want:
        new_stride = (want + 7) // 8 * 8 if m.percpu else want
        old = np.frombuffer(bytes(values), dtype=np.uint8).reshape(n * m.ncpu, stride)
        padded = np.zeros((n * m.ncpu, new_stride), dtype=np.uint8)
        padded[:, :min(stride, new_stride)] = old[:, :min(stride, new_stride)]
        values, stride = padded.tobytes(), new_stride
    reading = decode(m.name, keys, values, n, m.info.key_size, stride, m.ncpu, epoch)
    reading.max_entries = m.info.max_entries
    return reading


def kernel_clock_offset() -> float:
    """Seconds to add to a kernel flow/drop time (ns of CLOCK_MONOTONIC_COARSE = 6, what the programs'
    pw_now() reads live) to get Unix time. A replay sets the programs' clock to capture time in Unix ns
    itself (config.clock_ns), and uses an offset of 0."""
    return time.time() - time.clock_gettime(6)


def pack_snapshot(reading: MapReading) -> bytes:
    """The BLOB stored in counter_snapshots.data for one map."""
    return reading.raw_keys + reading.counters.astype("<u8").tobytes()


BUCKET_ENTRIES = 64          # keys per snapshot bucket, on average, when the map is full
MAX_BUCKETS = 1 << 16
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def bucket_count(max_entries: int) -> int:
    """Buckets of a map's snapshot: the power of two nearest above max_entries / BUCKET_ENTRIES (1..MAX_BUCKETS)."""
    want = max(1, int(max_entries) // BUCKET_ENTRIES)
    return min(MAX_BUCKETS, 1 << (want - 1).bit_length())


def bucket_of(reading: MapReading, buckets: int) -> np.ndarray:
    """(n,) bucket of each key: FNV-1a over the key's 32-bit words (stable across runs and hosts)."""
    n, ks = reading.entries, reading.key_size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    width = 4 if ks % 4 == 0 else 1
    words = np.frombuffer(reading.raw_keys, dtype="<u4" if width == 4 else np.uint8, count=n * ks // width)
    words = words.reshape(n, ks // width).astype(np.uint64)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    for col in range(words.shape[1]):
        h ^= words[:, col]
        h *= _FNV_PRIME
    h ^= h >> np.uint64(29)
    return (h & np.uint64(buckets - 1)).astype(np.int64)


def pack_buckets(reading: MapReading, buckets: int, which=None) -> dict[int, tuple[bytes, bytes]]:
    """bucket -> (its keys back to back, their counters as <u8) for the buckets ``which`` (None: every bucket
    that holds a key); keys sorted within a bucket, so a bucket whose keys stay keeps its layout. A bucket of
    ``which`` that holds no key maps to (b"", b"") (to be removed).

    A snapshot is stored in buckets by key (a hash of the key's bytes, :func:`bucket_of`; about
    BUCKET_ENTRIES keys each), each bucket two BLOBs: its keys (n * key_size bytes) and their counters
    (n * width u64, little endian), stored apart so the counters of many buckets share a page."""
    of = bucket_of(reading, buckets)
    wanted = np.unique(of) if which is None else np.asarray(sorted(which), dtype=np.int64)
    out = {int(b): (b"", b"") for b in wanted.tolist()}
    rows = np.flatnonzero(np.isin(of, wanted))
    if not len(rows):
        return out
    rows = rows[np.lexsort((reading.key_array[rows], of[rows]))]
    raw = np.frombuffer(reading.raw_keys, dtype=np.uint8,
                        count=reading.entries * reading.key_size).reshape(reading.entries, reading.key_size)
    bounds = np.flatnonzero(np.diff(of[rows])) + 1
    for group in np.split(rows, bounds):
        out[int(of[group[0]])] = (raw[group].tobytes(), reading.counters[group].astype("<u8").tobytes())
    return out


def changed_buckets(delta: "Delta", previous: MapReading, buckets: int) -> tuple[set[int], set[int]]:
    """(buckets whose key set changed, buckets whose counters changed) against the stored ``previous``:
    keys new since it or gone from it (an LRU eviction) change both; a non-zero delta changes the counters.
    A round rewrites only those (the keys of the first, the counters of the second): a quiet round on full
    maps writes kilobytes, not the maps' megabytes."""
    current = delta.reading
    new = np.flatnonzero(delta.matched < 0) if delta.matched is not None else np.arange(current.entries)
    of = bucket_of(current, buckets) if current.entries else np.zeros(0, dtype=np.int64)
    keys = set(of[new].tolist())
    if previous.entries:
        kept = np.zeros(previous.entries, dtype=bool)
        if delta.matched is not None:
            kept[delta.matched[delta.matched >= 0]] = True
        gone = np.flatnonzero(~kept)
        if len(gone):
            keys |= set(bucket_of(previous, buckets)[gone].tolist())
    return keys, keys | set(of[delta.index].tolist())


def join_parts(name: str, key_size: int, parts: list[tuple[bytes, bytes]]) -> MapReading:
    """One reading from a snapshot's (keys, counters) parts, one per bucket; empty when a part does not
    fit this layout (a snapshot of maps with another key size)."""
    width = len(COUNTERS[name])
    keys, counters = [], []
    for k, c in parts:
        n = len(k) // key_size
        if n * key_size != len(k) or len(c) != n * 8 * width:
            return empty(name, key_size)
        keys.append(k)
        counters.append(c)
    blob_keys, blob_counters = b"".join(keys), b"".join(counters)
    n = len(blob_keys) // key_size
    if not n:
        return empty(name, key_size)
    return MapReading(name, blob_keys, key_size, np.frombuffer(blob_counters, dtype="<u8").reshape(n, width)
                      .astype(np.uint64))


def split_snapshot(name: str, key_size: int, blob: bytes) -> tuple[bytes, bytes]:
    """A snapshot stored as one BLOB (before buckets) as one (keys, counters) part."""
    n = len(blob) // (key_size + 8 * len(COUNTERS[name]))
    return blob[:n * key_size], blob[n * key_size:]


def unpack_snapshot(name: str, key_size: int, blob: bytes) -> MapReading | None:
    width = len(COUNTERS[name])
    n = len(blob) // (key_size + 8 * width)
    if n * (key_size + 8 * width) != len(blob):
        # a snapshot of an older layout of this map (its maps were recreated since): nothing to subtract
        return None
    counters = np.frombuffer(blob, dtype=np.uint64 if np.little_endian else "<u8", count=n * width,
                             offset=n * key_size).reshape(n, width)
    return MapReading(name, blob[: n * key_size], key_size, counters)


@dataclass
class Delta:
    """Per-key differences of one map for one round: only keys with a non-zero delta.

    values: (k, width) int64; index: (k,) row of each key in ``reading`` (the current reading:
    keys and extras are looked up there, so no per-key Python object exists until needed);
    matched: (n,) row of each current key in the previous reading, -1 when new (None: no previous).
    """
    name: str
    values: np.ndarray
    index: np.ndarray
    reading: MapReading
    matched: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def keys(self) -> list[bytes]:
        key = self.reading.key
        return [key(i) for i in self.index.tolist()]

    def _key_records(self) -> np.ndarray:
        return np.frombuffer(self.reading.raw_keys, dtype=bpf_structs.key_dtype(self.name),
                             count=self.reading.entries)

    def field(self, name: str) -> np.ndarray:
        """One field of this delta's keys, by its C name (e.g. ``"src"`` of pw_flow_key): (k,) array."""
        return self._key_records()[name][self.index]

    def key_fields(self, rows) -> np.ndarray:
        """The keys of delta rows ``rows`` as structured records (fields named as in bpf/common.h)."""
        return self._key_records()[self.index[rows]]

    def as_dict(self) -> dict[bytes, tuple]:
        return {k: tuple(v) for k, v in zip(self.keys, self.values.tolist())}


def diff(current: MapReading, previous: MapReading) -> Delta:
    """current - previous per key. A key new since the previous snapshot, or one with any
    counter lower than before (restarted: maps recreated, reboot, an LRU entry evicted and
    re-inserted), contributes its whole current value."""
    if not current.entries:
        return Delta(current.name, np.zeros((0, current.counters.shape[1]), dtype=np.int64),
                     np.zeros(0, dtype=np.int64), current)
    cur = current.counters.astype(np.int64)
    idx = None
    if previous.entries:
        idx = match(current.key_array, previous.key_array)
        known = idx >= 0
        prev = np.zeros_like(cur)
        prev[known] = previous.counters[idx[known]].astype(np.int64)
        delta = cur - prev
        restarted = (delta < 0).any(axis=1)
        delta[restarted] = cur[restarted]
    else:
        delta = cur
    rows = np.flatnonzero(delta.any(axis=1))
    return Delta(current.name, delta[rows], rows, current, idx)


def match(keys: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each of ``keys``, its row in ``reference`` or -1 (both 'S<n>' arrays; sort + binary search)."""
    order = np.argsort(reference, kind="stable")
    ordered = reference[order]
    pos = np.searchsorted(ordered, keys)
    pos_c = np.minimum(pos, len(ordered) - 1)
    found = ordered[pos_c] == keys
    return np.where(found, order[pos_c], -1)
