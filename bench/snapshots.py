"""Bytes a round writes into the database's WAL (its rows and its counter snapshot), maps full, side by side:
the whole map rewritten every round (how snapshots were stored before) against a base in buckets plus a
log of what changed (app/services/snapshots.py).

The maps are in-memory stand-ins (tests/fakes.py) filled to their default sizes (ingress and egress),
the database a real SQLite file in WAL mode with automatic checkpoints off, so the WAL's growth is what
one round's transaction wrote (its rows and its snapshot). Rounds: a quiet one (no key changed), one
with 100 keys of each counting map touched (random), one with 100 new keys (each evicting the oldest, as
an LRU map at capacity does: the layout of a whole-map BLOB shifts), mixes, and one where every key changed.

    .venv/bin/python bench/snapshots.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db import rounds as rounds_db  # noqa: E402
from app.db.connection import connect  # noqa: E402
from app.services.collector import rounds, snapshots  # noqa: E402
from app.services.collector.collector import Collector, Observations  # noqa: E402
from tests.fakes import FakePinnedMap, fake_maps  # noqa: E402
from tests.helpers import make_settings  # noqa: E402

SIZES = {"sources": 65536, "srcports": 131072, "flows": 65536, "eg_dests": 65536, "eg_dstports": 131072,
         "eg_flows": 65536}


def _keys(name: str, n: int, key_size: int) -> np.ndarray:
    """n distinct, well-formed keys (IPv4 sources 10.x.y.z, ports, flows to 198.18.0.1) as (n, key_size) bytes."""
    k = np.zeros((n, key_size), dtype=np.uint8)
    ip = np.arange(n, dtype=np.uint32) + (10 << 24)
    k[:, 0] = 4
    k[:, 13:17] = ip.astype(">u4").view(np.uint8).reshape(n, 4)      # IPv4 in the address's last 4 bytes
    if name in ("srcports", "eg_dstports"):
        k[:, 20:22] = (np.arange(n) % 60000 + 1).astype("<u2").view(np.uint8).reshape(n, 2)
        k[:, 22] = 17
    if name in ("flows", "eg_flows"):
        k[:, 20], k[:, 33:37] = 4, (198, 18, 0, 1)
        k[:, 40:42] = (np.arange(n) % 60000 + 1024).astype("<u2").view(np.uint8).reshape(n, 2)
        k[:, 42:44] = np.frombuffer(np.uint16(53).astype("<u2").tobytes(), dtype=np.uint8)
        k[:, 44] = 17
    return k


# (label, keys touched per map: a count or a share, new keys per map evicting old ones)
SCENARIOS = (("quiet", 0, 0), ("100 touched", 100, 0), ("100 new (LRU)", 0, 100), ("1% touched, 1% new", 0.01, 655),
             ("10% touched, 1% new", 0.1, 655), ("all touched", 1.0, 0))


def fill(fakes: dict) -> None:
    for name, n in SIZES.items():
        m = FakePinnedMap(name, ncpu=1, max_entries=n)
        keys = _keys(name, n, m.info.key_size)
        rec = np.zeros((n, m.record_size), dtype=np.uint8)
        rec[:, 0:8] = np.full(n, 5, dtype="<u8").view(np.uint8).reshape(n, 8)
        if m.record_size >= 16:
            rec[:, 8:16] = np.full(n, 500, dtype="<u8").view(np.uint8).reshape(n, 8)
        m.entries = dict(zip((bytes(r) for r in keys), (bytes(r) for r in rec)))
        fakes[name] = m


def touch(fakes: dict, touched: float | int, churned: int, rng: np.random.Generator, serial: list) -> None:
    """Add one packet to ``touched`` random keys of each counting map (a count, or a share), and insert
    ``churned`` new keys into each, each evicting the oldest one (an LRU map at capacity)."""
    for name in SIZES:
        m = fakes[name]
        keys = list(m.entries)
        n = touched if isinstance(touched, int) else int(len(keys) * touched)
        for i in rng.choice(len(keys), size=n, replace=False).tolist():
            record = bytearray(m.entries[keys[i]])
            record[0:8] = (int.from_bytes(record[0:8], "little") + 1).to_bytes(8, "little")
            m.entries[keys[i]] = bytes(record)
        if churned:
            fresh = _keys(name, churned, m.info.key_size)
            fresh[:, 13] = 11                       # 11.x.y.z: never seen before
            fresh[:, 14:17] = (np.arange(churned) + serial[0]).astype(">u4").view(np.uint8).reshape(churned, 4)[:, 1:]
            for key in fresh:
                m.entries.pop(next(iter(m.entries)))
                m.entries[bytes(key)] = next(iter(m.entries.values()))
        serial[0] += churned


def whole_blob(reading, delta, previous):
    """How snapshots were stored before: the whole map, keys in the order the kernel returned them, every round
    (one row for the keys and one for the counters, updated in place: SQLite writes only the pages that differ)."""
    return snapshots.Plan("fold", 1, parts={rounds_db.KEYS_PART: {0: reading.raw_keys},
                                            rounds_db.COUNTERS_PART: {0: reading.counters.astype("<u8").tobytes()}})


def wal_bytes(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def run(tmp: Path, bucketed: bool) -> list[tuple[str, int, float]]:
    s = make_settings(tmp)
    s.general.pin_root = str(tmp / "no-pins")
    fakes = fake_maps(ncpu=1)
    fill(fakes)
    c = Collector(s, "bench0")
    c.conn = connect(c.db_path)
    c.conn.execute("PRAGMA wal_autocheckpoint = 0")
    c._maps = fakes
    c._born = {m.info.id for m in fakes.values()}           # the maps count from zero for this database
    saved = snapshots.plan
    if not bucketed:
        snapshots.plan = whole_blob
    out, rng, serial = [], np.random.default_rng(7), [0]
    try:
        c.close_round(time.time(), Observations())           # the first round stores the whole snapshot
        for label, touched, churned in SCENARIOS:
            touch(fakes, touched, churned, rng, serial)
            c.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before, t0 = wal_bytes(c.db_path), time.process_time()
            c.close_round(time.time(), Observations())
            out.append((label, wal_bytes(c.db_path) - before, time.process_time() - t0))
    finally:
        snapshots.plan = saved
        c.close()
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        old = run(Path(a), bucketed=False)
        new = run(Path(b), bucketed=True)
    total = sum(SIZES.values())
    print(f"WAL bytes per round, maps full ({total:,} entries in 6 LRU maps): whole map every round (before) vs "
          "base + log (now)")
    print(f"{'round':22} {'before MB':>12} {'now MB':>11} {'before/now':>13} {'before CPU s':>13} "
          f"{'now CPU s':>10}")
    for (label, ob, oc), (_, nb, nc) in zip(old, new):
        ratio = f"{ob / nb:.2f}" if nb else "-"
        print(f"{label:22} {ob / 1e6:12.2f} {nb / 1e6:11.2f} {ratio:>13} {oc:13.2f} {nc:10.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
