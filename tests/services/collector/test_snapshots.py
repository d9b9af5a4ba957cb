"""Snapshot storage (app/services/snapshots.py): base + log, folds, exact differences on a real SQLite file."""
from __future__ import annotations

import numpy as np

from app.db.connection import connect
from app.services.collector import rounds, snapshots

KS = 20                                   # a sources key (struct pw_addr)


def reading(table: dict[bytes, tuple], max_entries: int = 1024) -> rounds.MapReading:
    keys = list(table)
    counters = np.array([table[k] for k in keys], dtype=np.uint64).reshape(len(keys), 4)
    r = rounds.MapReading("sources", b"".join(keys), KS, counters)
    r.max_entries = max_entries
    return r


def as_table(r: rounds.MapReading) -> dict[bytes, tuple]:
    return {k: tuple(c) for k, c in zip(r.keys, r.counters.tolist())}


def store_round(conn, r, valid=True):
    prev = snapshots.load(conn, "if0", "sources", r, valid, False)
    delta = rounds.diff(r, prev.reading)
    how = snapshots.plan(r, delta, prev)
    with conn:
        snapshots.save(conn, "if0", "sources", r.entries, how,
                       {"taken_at": 1.0, "round_id": None, "program_id": None, "map_id": 1, "epoch": "e"})
    return delta, how.kind


def test_every_round_differences_exactly_through_logs_and_folds(tmp_path):
    conn = connect(tmp_path / "p.db")
    rng = np.random.default_rng(3)
    table = {bytes([4]) + rng.bytes(KS - 1): (5, 500, 0, 0) for _ in range(800)}
    kinds = []
    _, kind = store_round(conn, reading(table), valid=False)
    kinds.append(kind)
    serial = 0
    for step in range(40):
        before = dict(table)
        keys = list(table)
        for i in rng.choice(len(keys), size=int(rng.integers(0, 60)), replace=False).tolist():
            p, b, s, f = table[keys[i]]
            table[keys[i]] = (p + 1, b + 100, s, f)
        for _ in range(int(rng.integers(0, 30))):            # LRU churn: the oldest out, a new key in
            table.pop(next(iter(table)))
            serial += 1
            table[bytes([4]) + serial.to_bytes(KS - 1, "big")] = (2, 200, 0, 0)
        if step == 30:
            for k in list(table):                             # every key counted
                table[k] = tuple(v + 1 for v in table[k])
        delta, kind = store_round(conn, reading(table))
        kinds.append(kind)
        want = {k: tuple(a - before.get(k, (0, 0, 0, 0))[i] for i, a in enumerate(v)) for k, v in table.items()}
        assert delta.as_dict() == {k: v for k, v in want.items() if any(v)}, step
        stored = snapshots.load(conn, "if0", "sources", reading(table), True, False)
        assert as_table(stored.reading) == table and stored.entries == len(table)
    assert kinds[0] == "whole" and {"log", "fold"} <= set(kinds)
    conn.close()


def test_a_snapshot_of_another_bucket_count_is_replaced_whole(tmp_path):
    conn = connect(tmp_path / "p.db")
    table = {bytes([4]) + i.to_bytes(KS - 1, "big"): (1, 1, 0, 0) for i in range(300)}
    store_round(conn, reading(table, max_entries=1024), valid=False)
    r = reading(table, max_entries=1 << 16)                    # the maps were resized
    prev = snapshots.load(conn, "if0", "sources", r, True, False)
    assert prev.base is None
    assert snapshots.plan(r, rounds.diff(r, prev.reading), prev).kind == "whole"
    conn.close()
