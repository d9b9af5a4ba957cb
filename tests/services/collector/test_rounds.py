"""Pure tests of cumulative snapshots -> per-round differences."""
import struct

import numpy as np

from app.services.collector import rounds
from app.services.kernel import bpf_structs


def reading(name, d):
    ks = len(next(iter(d)))
    return rounds.MapReading(name, b"".join(d), ks, np.array(list(d.values()), dtype=np.uint64).reshape(len(d), -1))


def test_diff_new_changed_unchanged_and_restarted_keys():
    # keys with trailing and inner NUL bytes on purpose: numpy must not confuse them
    a, b, c, d_, e = b"a\x00\x00", b"a\x00\x01", b"\x00\x00\x00", b"d\x00d", b"a\x01\x00"
    prev = reading("flows", {a: (10, 100), b: (5, 50), c: (7, 70), e: (1, 1)})
    cur = reading("flows", {a: (15, 160), b: (5, 50), c: (2, 20), d_: (1, 10)})
    d = rounds.diff(cur, prev)
    assert d.as_dict() == {a: (5, 60), c: (2, 20), d_: (1, 10)}   # b unchanged: no row; c restarted
    assert d.index.tolist() == [0, 2, 3]
    assert rounds.diff(cur, rounds.empty("flows", 3)).as_dict() == {a: (15, 160), b: (5, 50), c: (2, 20), d_: (1, 10)}


def test_snapshot_roundtrip():
    r = reading("sources", {b"k" * 20: (1, 2, 3, 0), b"j" * 20: (4, 5, 2**63 + 5, 1)})
    blob = rounds.pack_snapshot(r)
    assert len(blob) == 2 * (20 + 32)
    back = rounds.unpack_snapshot("sources", 20, blob)
    assert back.keys == r.keys == [b"k" * 20, b"j" * 20] and back.counters.tolist() == r.counters.tolist()


def test_decode_percpu_port_values_sums_cpus_and_keeps_round_extremes():
    vfmt = "<" + bpf_structs.struct_format(bpf_structs.PwPortValue)
    key = struct.pack("<HBB", 443, 6, 0)
    # cpu0: 3 packets this epoch (7), payloads 10..40; cpu1: 2 packets in an older epoch (6)
    cpu0 = struct.pack(vfmt, 3, 300, 60, 1, 0, 0, 0, 5, 40, 10, 40, 7, 0)
    cpu1 = struct.pack(vfmt, 2, 200, 100, 2, 1, 0, 1, 50, 50, 50, 50, 6, 0)
    r = rounds.decode("port_stats", key, cpu0 + cpu1, 1, 4, 80, 2, epoch=7)
    assert r.counters.tolist() == [[5, 500, 160, 3, 1, 0, 1]]
    assert r.extras.tolist() == [[10, 40]]


def test_decode_percpu_flows_reduces_times_and_flags():
    vfmt = "<" + bpf_structs.struct_format(bpf_structs.PwFlowValue)
    key = b"f" * 40
    cpu0 = struct.pack(vfmt, 2, 120, 1000, 5000, 0x02, 0)
    cpu1 = struct.pack(vfmt, 1, 60, 800, 4000, 0x10, 0)
    r = rounds.decode("flows", key, cpu0 + cpu1, 1, 40, 40, 2)
    assert r.counters.tolist() == [[3, 180]]
    assert r.extras.tolist() == [[800, 5000, 0x12]]
