"""Rounds closed outside the per-minute cycle, from maps other than the collector's current ones: a
takeover's baseline (the maps as another database left them) and the last round of the maps a recreate
replaced (``<pin_dir>/retired``). Called only by app/services/collector/collector.py's Collector, whose
maps and load state each function swaps in and back.
"""
from __future__ import annotations

import ctypes
import logging
import shutil
import time

from app.errors import BpfError
from app.services.collector.round_summary import Observations, RoundSummary
from app.services.kernel import enforcement, maps, pin_owner, xdp
from app.services.kernel.bpf_structs import MAP_LAYOUT

log = logging.getLogger(__name__)


def takeover_baseline(collector) -> str | None:
    """Store a baseline round of the maps as they are, under a new epoch, BEFORE the pin record names this
    database: a takeover whose database cannot write (a full disk) fails here and leaves the pins, the
    map and the old owner's blocks as they were. Returns the new epoch (None: no maps to read)."""
    maps_now = maps.open_maps(collector.pin_dir, missing_ok=True)
    if "config" not in maps_now:
        for m in maps_now.values():
            m.close()
        return None
    epoch = pin_owner.new_epoch()
    collector._maps, collector.record, collector._born = maps_now, {"epoch": epoch}, set()
    collector.load_state = xdp.pinned_state(collector.interface, collector.pin_dir)
    try:
        collector.takeover_round = collector.close_round(time.time(), Observations(), reconcile=False,
                                                         note="baseline: taken over from another database")
    finally:
        for m in collector._maps.values():
            m.close()
        collector._maps, collector.load_state, collector._first = {}, None, True
    return epoch


def close_retired(collector) -> RoundSummary | None:
    """Close a last round from the maps a recreate replaced (``<pin_dir>/retired``: frozen since the
    swap), add their last drops to the ledger, then remove them. None when there are none.

    Maps whose key layout is not the one this code reads (made by an older bpf/common.h) cannot be
    decoded: the round is closed from the others (a value struct that only grew at its end is read,
    its new fields as zeros) and its note names the maps left out."""
    retired = collector.pin_dir / xdp.RETIRED
    if not (retired / "port_stats").exists():
        return None
    if xdp.retired_still_attached(collector.interface, collector.pin_dir):     # a loader killed before the swap
        xdp.restore_pins(collector.pin_dir)
        return None
    log.info("closing a last round from the replaced maps of %s", collector.interface)
    collector._born = pin_owner.born_ids(collector.pin_dir)
    prog = retired / "prog"
    program_id = maps.prog_info(prog).id if prog.exists() else None
    try:
        meta = xdp.read_meta(retired)
    except (BpfError, ValueError):        # a meta map of an older layout
        meta = None
    opened = maps.open_maps(retired, missing_ok=True)
    current, collector._maps, unreadable = collector._maps, {}, []
    for name, m in opened.items():
        _, key_t, val_t = MAP_LAYOUT[name]
        if m.info.key_size == ctypes.sizeof(key_t) and m.info.value_size <= ctypes.sizeof(val_t):
            collector._maps[name] = m
        else:
            unreadable.append(name)
            m.close()
    note = "last counts of the replaced maps"
    if unreadable:
        note += f" (not read, older layout: {', '.join(sorted(unreadable))})"
    saved_state, collector.load_state = collector.load_state, xdp.LoadState(
        collector.interface, retired, collector.load_state.mode if collector.load_state else None, program_id,
        bytes(meta.source_hash).hex() if meta else None)
    summary = None
    try:
        if "config" in collector._maps:
            summary = collector.close_round(time.time(), Observations(), note=note, reconcile=False)
        if "blacklist" in collector._maps:
            enforcement.retire_map(collector.conn, collector.interface, retired / "blacklist")
        else:
            enforcement.forget_map(collector.conn, collector.interface)
    finally:
        for m in collector._maps.values():
            m.close()
        collector._maps, collector.load_state = current, saved_state
        collector._first = True
    shutil.rmtree(retired, ignore_errors=True)
    return summary
