"""Cumulative kernel snapshots -> per-round differences (pure functions, no I/O).

The kernel never resets a counter. A round stores, per key, cumulative-now minus
cumulative-at-the-last-snapshot; the last snapshot is kept in SQLite (counter_snapshots), so
nothing is lost or counted twice across round boundaries, a SIGKILLed run, a skipped minute or
a reload that kept the pinned maps. A key whose counter went backwards (maps recreated, reboot,
an LRU entry evicted and re-inserted) is treated as restarted from zero: its delta is its
current value.

A snapshot is one BLOB per map: records of ``key bytes + n little-endian u64 counters``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from app.services import maps

# counters kept per map in snapshots (in this order), and where they come from
COUNTERS = {
    "port_stats": ("packets", "bytes", "payload_bytes", "syn", "synack", "rst", "fin"),
    "sources": ("packets", "bytes", "syn"),
    "srcports": ("packets",),
    "flows": ("packets", "bytes"),
    "global": ("value",),
    "blacklist": ("drops", "drop_bytes"),
}


@dataclass
class MapReading:
    """One map read at one time: key bytes -> counters tuple, plus per-key extras."""
    name: str
    counters: dict[bytes, tuple]
    extras: dict[bytes, tuple] = field(default_factory=dict)
    max_entries: int = 0

    @property
    def entries(self) -> int:
        return len(self.counters)


def decode(name: str, keys: bytes, values: bytes, n: int, key_size: int, stride: int, ncpu: int,
           epoch: int | None = None) -> MapReading:
    """Decode raw batch-read bytes of map ``name`` into a MapReading.

    port_stats extras: (min_payload_round, max_payload_round) over CPUs whose round epoch equals
    ``epoch`` (None when no packet of this round was seen); flows extras: (first_seen_ns,
    last_seen_ns, tcp_flags); blacklist extras: (last_drop_ns,).
    """
    counters: dict[bytes, tuple] = {}
    extras: dict[bytes, tuple] = {}
    if n == 0:
        return MapReading(name, counters, extras)
    vfmt = maps.struct_format(maps.MAP_LAYOUT[name][2])
    pad = stride - struct.calcsize("<" + vfmt)
    rec = "<" + (vfmt + (f"{pad}x" if pad else "")) * ncpu
    width = len(struct.unpack("<" + vfmt, b"\0" * struct.calcsize("<" + vfmt)))
    key_list = [keys[i * key_size:(i + 1) * key_size] for i in range(n)]
    rows = struct.iter_unpack(rec, values[: n * stride * ncpu])
    if name == "port_stats":
        for key, row in zip(key_list, rows):
            tot = [0] * 7
            rmin = rmax = None
            for c in range(ncpu):
                v = row[c * width:(c + 1) * width]
                if not v[0]:
                    continue
                for i in range(7):
                    tot[i] += v[i]
                # v[9], v[10]: round_min, round_max; v[11]: epoch
                if epoch is not None and v[11] == epoch:
                    rmin = v[9] if rmin is None else min(rmin, v[9])
                    rmax = v[10] if rmax is None else max(rmax, v[10])
            counters[key] = tuple(tot)
            extras[key] = (rmin, rmax)
    elif name in ("sources", "global"):
        for key, row in zip(key_list, rows):
            if ncpu == 1:
                counters[key] = tuple(row)
            else:
                counters[key] = tuple(sum(row[c * width + i] for c in range(ncpu)) for i in range(width))
    elif name == "srcports":
        for key, row in zip(key_list, rows):
            counters[key] = (row[0],)
    elif name == "flows":
        for key, row in zip(key_list, rows):
            counters[key] = (row[0], row[1])
            extras[key] = (row[2], row[3], row[4])
    elif name == "blacklist":
        for key, row in zip(key_list, rows):
            counters[key] = (row[0], row[1])
            extras[key] = (row[2],)
    else:
        raise ValueError(f"no decoder for map {name}")
    return MapReading(name, counters, extras)


def read_map(m: "maps.PinnedMap", epoch: int | None = None) -> MapReading:
    keys, values, n = m.items()
    reading = decode(m.name, keys, values, n, m.info.key_size, m.value_stride, m.ncpu, epoch)
    reading.max_entries = m.info.max_entries
    return reading


def pack_snapshot(reading: MapReading) -> bytes:
    """The BLOB stored in counter_snapshots.data for one map."""
    width = len(COUNTERS[reading.name])
    fmt = struct.Struct(f"<{width}Q")
    return b"".join(k + fmt.pack(*v) for k, v in reading.counters.items())


def unpack_snapshot(name: str, key_size: int, blob: bytes) -> dict[bytes, tuple]:
    width = len(COUNTERS[name])
    rec = key_size + 8 * width
    fmt = struct.Struct(f"<{width}Q")
    return {blob[i:i + key_size]: fmt.unpack_from(blob, i + key_size) for i in range(0, len(blob), rec)}


def diff(current: dict[bytes, tuple], previous: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """Per-key deltas current - previous, only keys whose delta is not all zero.

    A key new since the previous snapshot, or one with any counter lower than before
    (restarted), contributes its whole current value.
    """
    out = {}
    for key, cur in current.items():
        prev = previous.get(key)
        if prev is None:
            delta = cur
        else:
            delta = tuple(c - p for c, p in zip(cur, prev))
            if any(d < 0 for d in delta):
                delta = cur
        if any(delta):
            out[key] = delta
    return out


def vanished(current: dict[bytes, tuple], previous: dict[bytes, tuple]) -> int:
    """Keys present in the previous snapshot and gone now (LRU-evicted or deleted)."""
    return sum(1 for key in previous if key not in current)
