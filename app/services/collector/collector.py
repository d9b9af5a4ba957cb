"""The collector's work: one round of one interface in one SQLite transaction (:meth:`Collector.close_round`).

The scheduling (K rounds of N seconds, the scanner and sniffer threads during each round, the run-time
bound) is app/threads/collection.py; rounds from other maps than the current ones (a takeover's baseline,
the maps a recreate replaced) are app/services/collector/extra_rounds.py. Cheap by design: no BPF
compile (unless the program must be (re)loaded, which happens in a separate process) and no TensorFlow
or matplotlib anywhere on this path.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import sqlite3
import time
from pathlib import Path

# The collector does no linear algebra: one BLAS thread spares each run ~0.1 CPU-s of thread
# start-up inside `import numpy` (round_rows/rounds import it below: this must come first; an explicit
# setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from app.db import rounds as rounds_db  # noqa: E402
from app.db.connection import connect  # noqa: E402
from app.db.ports import PortIds  # noqa: E402
from app.errors import BpfError, NeedsRootError, PortwatchError  # noqa: E402
from app.services import locks, ports  # noqa: E402
from app.services.kernel import enforcement  # noqa: E402
from app.services.collector import egress_rounds, extra_rounds, round_rows, rounds, snapshots  # noqa: E402
from app.services.collector.round_summary import Observations, RoundSummary  # noqa: E402
from app.services.kernel import egress, maps, onlink, pin_owner, xdp  # noqa: E402
from app.services.kernel.bpf_structs import GLOBAL_NAMES, PwConfig  # noqa: E402

log = logging.getLogger(__name__)

SNAPSHOT_MAPS = ("port_stats", "sources", "srcports", "flows", "global", "blacklist",
                 "eg_ports", "eg_dests", "eg_dstports", "eg_flows", "eg_global", "verified", "scanners")
EPOCH_MAPS = ("port_stats", "sources")     # per-round extremes keyed on the config epoch


class Collector:
    """Writes rounds for one interface into one database (the work; app/threads/collection.py
    schedules it). Use as a context manager: ``open()`` takes the per-interface lock, opens the
    database, makes sure the program is loaded and opens the pinned maps."""

    def __init__(self, settings, interface: str, takeover: bool = False, replace: bool = False, after_round=()):
        """``after_round``: callables ``hook(conn, settings)`` run after each round, before the blocklist's
        reconcile (so what a hook adds to the ledger is enforced in the same round); each bounds its
        own time and never raises. The collection loop passes the CrowdSec sync (app/threads/).
        ``takeover``: claim the interface from another database on purpose; ``replace``: replace an XDP
        program portwatch did not load, on purpose."""
        self.settings = settings
        self.after_round = tuple(after_round)
        self.takeover = takeover                  # claim the interface from another database on purpose
        self.replace = replace                    # replace an XDP program portwatch did not load, on purpose
        self.db_id: str | None = None
        self._born: set[int] = set()              # kernel ids of maps that started at zero for this database
        self.record: dict | None = None           # the pin record as claimed: its epoch judges stored snapshots
        self.takeover_round: RoundSummary | None = None   # the baseline a takeover stored before claiming
        self.interface = interface
        self.db_path = Path(settings.general.db)
        self.pin_dir = xdp.pin_dir(settings, interface)
        self.conn = None
        self.load_state: xdp.LoadState | None = None
        self._maps: dict[str, maps.PinnedMap] = {}
        self._lock_fh = None
        self._first = True
        self.clock_offset: float | None = None    # program clock -> Unix seconds (None: the live kernel's)
        self.round_marks: dict = {}               # extra rounds columns of every round (a replay's marks)

    def __enter__(self) -> "Collector":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Lock the interface, open the database, claim the pin directory (refused when another database
        enforces it), load the program if needed with the ledger's entries in its map before it is
        attached, close a last round from maps a recreate replaced, and reconcile — all before the round."""
        if os.geteuid() != 0:
            raise NeedsRootError("collecting needs root (XDP, pinned maps, process owners): run it with sudo")
        xdp.check_interface(self.interface)
        self._lock_fh = self._lock()
        try:
            pin_owner.refuse_foreign(self.interface, self.settings.general.pin_root, self.replace)
            pin_owner.refuse_other_database(self.pin_dir, self.interface, self.db_path, self.takeover)
            self.conn = connect(self.db_path)
            self.db_id = rounds_db.database_id(self.conn)
            xdp.ensure_bpffs(Path(self.settings.general.pin_root))
            epoch = None
            if self.takeover and pin_owner.claimed_by_other(self.pin_dir, self.db_id):
                epoch = self._takeover_baseline()    # this database's first write, before the pins change
            self.record = pin_owner.claim(self.pin_dir, self.interface, self.db_id, self.db_path, self.takeover,
                                          epoch=epoch)
            self.close_retired()                     # left by a run killed right after a recreate
            self.load_state = xdp.ensure_loaded(self.settings, self.interface,
                                                prefill=lambda: enforcement.active_cidrs(self.conn))
            if self.load_state.compiled:
                with self.conn:
                    rounds_db.insert_xdp_load(self.conn, self.interface, time.time(), self.load_state.mode,
                                              self.load_state.program_id, self.load_state.source_hash,
                                              self.load_state.reason, self.load_state.compile_seconds)
            self.close_retired()
            self.record = pin_owner.read(self.pin_dir) or self.record
            if self.load_state.maps_created:         # the prefilled entries count their drops from zero
                enforcement.forget_map(self.conn, self.interface)
            enforcement.note_prefilled(self.conn, self.interface, self.load_state.prefilled)
            self._born = pin_owner.born_ids(self.pin_dir)
            self._maps = maps.open_maps(self.pin_dir)
            self._reconcile()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _lock(self):
        return locks.hold_interface(self.interface,
                                    f"another collector is running on {self.interface}: this run does not overlap it")

    def _takeover_baseline(self) -> str | None:
        """Store a baseline round of the maps as they are, under a new epoch (extra_rounds.takeover_baseline)."""
        return extra_rounds.takeover_baseline(self)

    def check_attached(self) -> None:
        """BpfError (exit 5) when the program this collector counts with is no longer attached to the
        interface (detached or replaced under it): its maps stop counting, so a round now would store
        nothing as if nothing came. The last snapshot stays; the next `collect` re-attaches and counts on."""
        want = self.load_state.program_id if self.load_state else None
        now = xdp.attached_program(self.interface)
        if want is None or (now and now[0] == want):
            return
        what = ("nothing is attached now" if not now else
                f"program {now[0]} ({pin_owner.program_name(now[0]) or 'unnamed'}) is attached instead")
        raise BpfError(f"portwatch's XDP program {want} was detached from {self.interface} while this collector ran "
                       f"({what}): it stopped without storing the round; run collect again to re-attach it")

    def close_retired(self) -> RoundSummary | None:
        """Close a last round from the maps a recreate replaced (extra_rounds.close_retired)."""
        return extra_rounds.close_retired(self)

    def _reconcile(self) -> None:
        try:
            enforcement.reconcile(self.conn, self.settings, self.pin_dir)
        except (PortwatchError, sqlite3.Error) as exc:
            # enforcement is retried by the next round or run
            log.warning("blocklist reconcile failed (the next run retries): %s", exc)

    def close_round(self, start: float, seen: Observations, note: str | None = None,
                    reconcile: bool = True, at: float | None = None) -> RoundSummary:
        """Read the maps, difference them, write the round in one transaction, bump the epoch.

        The pinned maps are read with libbpf (no BCC) and differenced against the last snapshot; the
        round, its per-port, per-source and flow rows, occupancy, sniffer sample and the new snapshot
        are written in one transaction. Then the round epoch in the config map is bumped (per-round
        payload extremes) and the blocklist ledger is reconciled with the pinned blacklist map.
        ``at``: the round's end (Unix seconds; None: now — a replay passes capture time).
        The first round after open() records whether this run compiled or reloaded the program."""
        compiled = self._first and bool(self.load_state and self.load_state.compiled)
        reloaded = self._first and bool(self.load_state and self.load_state.reloaded)
        self._first = False
        # tens of thousands of short-lived tuples and no cycles: the cyclic GC would rescan them
        # over and over (measured: the larger part of a 50k-entry round)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._close_round(start, seen, compiled, reloaded, note, reconcile, at)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _baseline_plan(self) -> tuple[dict[str, int], dict[str, tuple], bool]:
        """(map ids now, (map id, epoch) of the stored snapshots, baseline?) — a stored snapshot counts as the
        previous reading of a map only when it was read from that very map (same kernel map id; NULL: stored
        before ids were) in the pin record's current epoch (another epoch: another database owned the
        interface since, and counted what came meanwhile); a map without one counts from zero when a load
        created it for this database (``maps_born``); otherwise this round is a baseline: its counts cover
        an unknown span before this database watched the interface."""
        ids = {name: self._maps[name].info.id for name in SNAPSHOT_MAPS if name in self._maps}
        stored = rounds_db.snapshot_heads(self.conn, self.interface)
        baseline = any(not self._snapshot_valid(stored.get(name), ids[name]) and ids[name] not in self._born
                       for name in ids)
        return ids, stored, baseline

    def _snapshot_valid(self, head: tuple | None, map_id: int | None) -> bool:
        return head is not None and head[0] in (None, map_id) and pin_owner.epoch_accepts(self.record, head[1])

    def _close_round(self, start, seen: Observations, compiled, reloaded, note, reconcile=True,
                     at: float | None = None) -> RoundSummary:
        cfg = maps.read_struct(self._maps["config"], maps.INDEX_0, PwConfig)
        epoch = cfg.epoch
        readings = {name: (rounds.read_map(self._maps[name], epoch if name in EPOCH_MAPS else None)
                           if name in self._maps else rounds.empty(name)) for name in SNAPSHOT_MAPS}
        end = time.time() if at is None else at
        map_ids, stored, baseline = self._baseline_plan()
        if baseline:
            log.warning("round on %s is a baseline: the maps' counts predate this database (%s), so they are stored "
                        "as the snapshot, not as traffic", self.interface, self.db_path)
            if not (note or "").startswith("baseline"):
                note = "baseline: counts from before this database watched the interface (not traffic)"
            seen = Observations(scanner_status=seen.scanner_status, sniffer_status=seen.sniffer_status)
        deltas, prev_entries, since, plans = self._differences(readings, map_ids, stored, baseline)
        g, eg = _globals(deltas["global"]), _globals(deltas["eg_global"])
        verified = deltas["verified"]
        two_way = egress_rounds.verified_peers(verified, onlink.read(self.interface) if len(verified) else None)
        values = self._round_values(readings, _round_evictions(g, eg, readings, prev_entries), g, eg, seen)
        values.update({"start_time": start, "end_time": end, "counts_since": since, "compiled": int(compiled),
                       "reloaded": int(reloaded), "two_way_peers": len(two_way), "note": note,
                       "baseline": int(baseline)})
        values.update(self.round_marks)
        n_sources = len(deltas["sources"])
        with self.conn:
            round_id, n_ports, n_listeners, sniffed, idle = self._write_round(values, readings, deltas, map_ids,
                                                                              plans, seen, two_way)
        for key in idle if "scanners" in self._maps else ():
            self._maps["scanners"].delete(key)
        # the next round's payload extremes and TTL ranges start now
        cfg.epoch = (epoch + 1) & 0xFFFFFFFF
        self._maps["config"].update(maps.INDEX_0, bytes(cfg))
        if reconcile:
            self._after_round(round_id)
        return RoundSummary(round_id, self.interface, end - (since or start), g.get("total", 0), g.get("bytes", 0),
                            g.get("unparsed", 0), g.get("dropped", 0), n_ports, n_sources, n_listeners,
                            sniffed, compiled, values["xdp_mode"], bool(baseline))

    def _differences(self, readings: dict, map_ids: dict, stored: dict, baseline: bool) -> tuple:
        """(deltas by map, entries of each previous snapshot, earliest snapshot time or None, the snapshot
        write plan by map). One map at a time, so the previous snapshot of only one map is in memory at
        once; in a baseline every delta is zero (the reading is its own previous)."""
        deltas, prev_entries, since, plans = {}, {}, None, {}
        for name in SNAPSHOT_MAPS:
            if name not in self._maps:
                deltas[name], prev_entries[name] = rounds.diff(readings[name], rounds.empty(name)), 0
                continue
            valid = self._snapshot_valid(stored.get(name), map_ids[name])
            prev = snapshots.load(self.conn, self.interface, name, readings[name], valid, baseline)
            if prev.taken_at is not None:
                since = prev.taken_at if since is None else min(since, prev.taken_at)
            deltas[name], prev_entries[name] = rounds.diff(readings[name], prev.reading), prev.entries
            plans[name] = snapshots.plan(readings[name], deltas[name], None if baseline else prev)
            del prev
        return deltas, prev_entries, since, plans

    def _round_values(self, readings: dict, ev: dict[str, int], g: dict, eg: dict, seen: Observations) -> dict:
        """The ``rounds`` row's columns that come from the maps, the load and the threads (the caller adds
        the times, the note and the flags)."""
        egress_read = "eg_global" in self._maps
        state = self.load_state
        return {
            "interface": self.interface,
            "xdp_mode": egress.mode_text(self.settings, self.interface, state.mode if state else None),
            "program_id": state.program_id if state else None, "source_hash": state.source_hash if state else None,
            "total_packets": g.get("total", 0), "total_bytes": g.get("bytes", 0),
            "parsed_packets": g.get("parsed", 0), "unparsed_packets": g.get("unparsed", 0),
            "dropped_packets": g.get("dropped", 0),
            "port_entries": readings["port_stats"].entries, "source_entries": readings["sources"].entries,
            "srcport_entries": readings["srcports"].entries, "flow_entries": readings["flows"].entries,
            "blacklist_entries": readings["blacklist"].entries,
            "srcport_evictions": ev["srcports"], "flow_evictions": ev["flows"], "source_evictions": ev["sources"],
            "new_sources": g.get("source_inserts", 0),
            "per_source_incomplete": int(bool(ev["sources"] or ev["srcports"])),
            "short_fragments": g.get("short_fragments", 0), "syn_limited_packets": g.get("syn_limited", 0),
            "egress_packets": eg.get("total", 0) if egress_read else None,
            "egress_bytes": eg.get("bytes", 0) if egress_read else None,
            "egress_unparsed": eg.get("unparsed", 0) if egress_read else None,
            "egress_dropped_packets": eg.get("dropped", 0) if egress_read else None,
            "destination_entries": readings["eg_dests"].entries, "destination_evictions": ev["eg_dests"],
            "egress_flow_evictions": ev["eg_flows"],
            "egress_program_id": _egress_program_id(self.pin_dir),
            "scanner_status": seen.scanner_status, "sniffer_status": seen.sniffer_status,
        }

    def _write_round(self, values: dict, readings: dict, deltas: dict, map_ids: dict, plans: dict,
                     seen: Observations, two_way) -> tuple:
        """Write the round and its rows inside the caller's transaction, storing each map's new snapshot
        (and letting its reading go) as soon as its rows are written. (round id, ports, listeners or
        None, sniffed packets or None, keys of the scanners map gone idle)."""
        conn, cfg, end = self.conn, self.settings.collector, values["end_time"]
        listening = {(l.port, l.protocol) for l in seen.listeners or []}
        low, high = ports.ephemeral_range()

        def fold(port, proto):
            return ports.fold_port(port, proto, listening, low, high, cfg.fold_ephemeral)

        round_id = rounds_db.insert_round(conn, values)
        keep = lambda *names: self._store_snapshots(round_id, end, readings, deltas, map_ids, plans, names)  # noqa: E731
        port_ids = PortIds(conn)
        n_ports = round_rows.write_ports(conn, round_id, deltas["port_stats"], readings["port_stats"].extras,
                                         port_ids, listening, low, high, cfg.fold_ephemeral)
        keep("port_stats")
        many = round_rows.write_sources(conn, round_id, deltas["sources"], readings["sources"].extras,
                                        deltas["srcports"], cfg.many_ports_threshold, deltas["scanners"])
        idle = round_rows.idle_scanners(deltas["scanners"])
        keep("sources", "srcports", "scanners")
        round_rows.write_flows(conn, round_id, deltas["flows"], readings["flows"].extras, many, cfg.top_flows,
                               self.clock_offset)
        keep("flows")
        rounds_db.insert_global_stats(conn, round_id, _globals(deltas["global"]))
        round_rows.write_blacklist_drops(conn, round_id, deltas["blacklist"])
        keep("global", "blacklist")
        egress_rounds.write_egress(conn, round_id, deltas, readings, port_ids, fold, cfg.top_flows,
                                   cfg.many_ports_threshold, self.clock_offset)
        keep("eg_ports", "eg_dests", "eg_dstports", "eg_flows", "eg_global")
        egress_rounds.record_peers(conn, round_id, end, two_way, seen.peers or ())
        keep("verified")
        n_listeners = self._write_observations(round_id, end, seen, port_ids, fold)
        sniffed = len(seen.packets) if seen.packets is not None else None
        ru = resource.getrusage(resource.RUSAGE_SELF)
        rounds_db.update_round(conn, round_id, {
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "peak_rss_kb": ru.ru_maxrss,
            "sniffer_packets": sniffed})
        return round_id, n_ports, n_listeners, sniffed, idle

    def _store_snapshots(self, round_id: int, end: float, readings: dict, deltas: dict, map_ids: dict, plans: dict,
                         names) -> None:
        """Store these maps' new snapshots (only the buckets that changed) and drop their readings and
        deltas (memory: one map at a time)."""
        program_id = self.load_state.program_id if self.load_state else None
        owner_epoch = (self.record or {}).get("epoch")
        for name in names:
            if name in self._maps:
                snapshots.save(self.conn, self.interface, name, readings[name].entries, plans.pop(name),
                               {"taken_at": end, "round_id": round_id, "program_id": program_id,
                                "map_id": map_ids[name], "epoch": owner_epoch})
            del readings[name], deltas[name]

    def _write_observations(self, round_id: int, end: float, seen: Observations, port_ids, fold) -> int | None:
        """The scanner's occupancy and the sniffer's packet sample of the round; the number of listeners
        (None when the scanner did not run)."""
        n_listeners = None
        if seen.listeners is not None:
            from app.db.occupancy import insert_occupancy
            insert_occupancy(self.conn, round_id, end, seen.listeners, port_ids)
            n_listeners = len(seen.listeners)
        if seen.packets is not None:
            from app.db.packets import insert_packets
            insert_packets(self.conn, round_id, seen.packets, port_ids, fold)
        return n_listeners

    def _after_round(self, round_id: int) -> None:
        """Run the after-round hooks, then reconcile the blocklist ledger with the pinned map
        (expiries, re-adds after a reload)."""
        for hook in self.after_round:
            hook(self.conn, self.settings)
        self._reconcile()


def _globals(delta: rounds.Delta) -> dict[str, int]:
    """The global counters' differences of one round by name (empty when the map was not read)."""
    return dict(zip(GLOBAL_NAMES, delta.values[0].tolist() if len(delta) else ()))


def _egress_program_id(pdir: Path) -> int | None:
    try:
        return maps.prog_info(pdir / egress.PROG_PIN).id if (pdir / egress.PROG_PIN).exists() else None
    except PortwatchError:
        return None


def _round_evictions(g: dict, eg: dict, readings: dict, prev_entries: dict) -> dict[str, int]:
    """LRU evictions of the round per map, from the insert counters and the maps' growth."""
    return {name: _evictions(inserts, readings[name].entries, prev_entries[name]) for name, inserts in (
        ("sources", g.get("source_inserts", 0)), ("srcports", g.get("srcport_inserts", 0)),
        ("flows", g.get("flow_inserts", 0)), ("eg_dests", eg.get("source_inserts", 0)),
        ("eg_flows", eg.get("flow_inserts", 0)))}


def _evictions(inserts: int, entries_now: int, entries_before: int) -> int:
    """LRU evictions in the round: new keys inserted minus the growth of the map (never negative)."""
    return max(0, inserts - (entries_now - entries_before))
