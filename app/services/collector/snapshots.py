"""Where a round's counter snapshot is stored, so storing it costs what changed, not what the maps hold.

A map's snapshot is a BASE (its keys and counters in buckets by key: rounds.pack_buckets, table
snapshot_buckets) plus a LOG of what changed since (table snapshot_log): :func:`load` reads the one a
round differences against, :func:`plan` decides how the new one is stored, :func:`save` stores it. All in
the caller's transaction: a round and its snapshot commit together or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.db import rounds as rounds_db
from app.services.collector import rounds

LOG_SHARE = 4             # the log is folded into the base once it holds more than base bytes / LOG_SHARE


@dataclass
class Previous:
    """The stored snapshot of one map as a round uses it."""
    reading: rounds.MapReading     # base + log: what the counters were when the last round was stored
    taken_at: float | None         # when (None: no usable snapshot)
    entries: int                   # keys the map held then
    base: rounds.MapReading | None = None   # the base alone (None: the whole snapshot is to be rewritten)
    log_bytes: int = 0


def load(conn, interface: str, name: str, reading: rounds.MapReading, valid: bool, baseline: bool) -> Previous:
    """The snapshot a round of map ``name`` differences against. ``valid``: the stored one was read from this
    very map in this epoch; ``baseline``: nothing counted before is history (every delta is zero)."""
    snap = rounds_db.load_snapshot(conn, interface, name) if valid or baseline else None
    if baseline:
        return Previous(reading, snap.taken_at if snap is not None and valid else None, reading.entries)
    if snap is None:
        return Previous(rounds.empty(name, reading.key_size), None, 0)
    parts = snap.parts if snap.blob is None else [rounds.split_snapshot(name, reading.key_size, snap.blob)]
    base = rounds.join_parts(name, reading.key_size, parts)
    logs = rounds_db.load_snapshot_log(conn, interface, name)
    previous = apply_log(base, logs) if logs else base
    usable = snap.buckets == rounds.bucket_count(reading.max_entries) and previous.entries == snap.entries
    return Previous(previous, snap.taken_at, snap.entries, base if usable else None,
                    sum(len(k) + len(c) + len(g) for k, c, g in logs))


def apply_log(base: rounds.MapReading, logs: list[tuple[bytes, bytes, bytes]]) -> rounds.MapReading:
    """``base`` with the log records applied in order: a key's last record wins, a key gone is dropped."""
    ks, width = base.key_size, base.counters.shape[1]
    keys, counters, seq, dead = [base.raw_keys], [base.counters], [np.zeros(base.entries, dtype=np.int64)], \
        [np.zeros(base.entries, dtype=bool)]
    for i, (k, c, g) in enumerate(logs, start=1):
        n, m = len(k) // ks, len(g) // ks
        keys += [k, g]
        counters += [np.frombuffer(c, dtype="<u8").reshape(n, width).astype(np.uint64),
                     np.zeros((m, width), dtype=np.uint64)]
        seq += [np.full(n + m, i, dtype=np.int64)]
        dead += [np.zeros(n, dtype=bool), np.ones(m, dtype=bool)]
    raw = b"".join(keys)
    total = len(raw) // ks
    all_keys = np.frombuffer(raw, dtype=f"S{ks}", count=total)
    order = np.lexsort((np.concatenate(seq), all_keys))
    last = np.ones(total, dtype=bool)
    last[:-1] = all_keys[order][1:] != all_keys[order][:-1]          # the newest record of each key
    keep = order[last & ~np.concatenate(dead)[order]]
    keep.sort()
    view = np.frombuffer(raw, dtype=np.uint8, count=total * ks).reshape(total, ks)
    return rounds.MapReading(base.name, view[keep].tobytes(), ks, np.concatenate(counters)[keep])


@dataclass
class Plan:
    """How one map's new snapshot is stored: 'whole', 'log' (``record``) or 'fold' (``parts`` of the base)."""
    kind: str
    buckets: int
    record: tuple[bytes, bytes, bytes] = (b"", b"", b"")
    parts: dict | None = None


def plan(reading: rounds.MapReading, delta: rounds.Delta, previous: Previous | None) -> Plan:
    """Decide (before the round's transaction, so the previous snapshot can go) how ``reading`` is stored.
    ``previous`` None: nothing stored is usable (a baseline): the whole snapshot.

    A round appends one log record per map (:func:`_log_record`) — bytes in proportion to its traffic,
    written together — and once the log outgrows a quarter of the base (LOG_SHARE), the round folds it
    into the base instead, rewriting only the buckets whose keys or counters differ
    (rounds.changed_buckets). A stored snapshot that cannot be used (another map, another takeover
    epoch, another bucket count) is replaced whole."""
    nb = rounds.bucket_count(reading.max_entries)
    if previous is None or previous.base is None:
        packed = rounds.pack_buckets(reading, nb)
        return Plan("whole", nb, parts=_parts(packed, packed))
    record = _log_record(reading, delta, previous.reading)
    base_bytes = previous.base.entries * (reading.key_size + 8 * reading.counters.shape[1])
    if previous.log_bytes + sum(map(len, record)) <= base_bytes // LOG_SHARE:
        return Plan("log", nb, record=record)
    keys_changed, counters_changed = rounds.changed_buckets(rounds.diff(reading, previous.base), previous.base, nb)
    return Plan("fold", nb, parts=_parts(rounds.pack_buckets(reading, nb, counters_changed), keys_changed))


def save(conn, interface: str, name: str, entries: int, how: Plan, header: dict) -> None:
    """Store map ``name``'s new snapshot (``entries`` keys) as ``how`` says, in the caller's transaction.
    ``header``: taken_at, round_id, program_id, map_id, epoch (counter_snapshots' columns)."""
    args = (conn, interface, name, header["taken_at"], header["round_id"], header["program_id"], entries,
            header["map_id"], header["epoch"], how.buckets)
    if how.kind == "log":
        rounds_db.save_snapshot(*args, {}, whole=False)
        if any(how.record):
            rounds_db.append_snapshot_log(conn, interface, name, *how.record)
        return
    rounds_db.save_snapshot(*args, how.parts, whole=how.kind == "whole")
    rounds_db.clear_snapshot_log(conn, interface, name)


def _parts(packed: dict, keys_of) -> dict[int, dict[int, bytes]]:
    """save_snapshot's parts: the keys of the buckets ``keys_of``, the counters of every packed bucket."""
    return {rounds_db.KEYS_PART: {b: packed[b][0] for b in keys_of},
            rounds_db.COUNTERS_PART: {b: c for b, (_, c) in packed.items()}}


def _log_record(reading: rounds.MapReading, delta: rounds.Delta, previous: rounds.MapReading) \
        -> tuple[bytes, bytes, bytes]:
    """(keys that counted or are new, their counters now, keys gone since ``previous``) as packed bytes."""
    ks = reading.key_size
    new = np.flatnonzero(delta.matched < 0) if delta.matched is not None else np.arange(reading.entries)
    rows = np.union1d(new, delta.index)
    raw = np.frombuffer(reading.raw_keys, dtype=np.uint8, count=reading.entries * ks).reshape(reading.entries, ks)
    gone = b""
    if previous.entries:
        kept = np.zeros(previous.entries, dtype=bool)
        if delta.matched is not None:
            kept[delta.matched[delta.matched >= 0]] = True
        prev_raw = np.frombuffer(previous.raw_keys, dtype=np.uint8,
                                 count=previous.entries * ks).reshape(previous.entries, ks)
        gone = prev_raw[~kept].tobytes()
    return raw[rows].tobytes(), reading.counters[rows].astype("<u8").tobytes(), gone
