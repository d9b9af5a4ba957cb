"""Replay a capture through the same kernel programs: rounds in capture time, as a live collector writes them.

    replay(settings, capture_path, hosts=(), round_seconds=60, after_round=None) -> ReplayResult

No interface, no namespace: BPF_PROG_TEST_RUN on programs pinned in a private directory, the rounds
closed by the live collector's own code (:func:`replay` says how). Called by the `replay` command
and bench/replay.py; the host's real pins are never opened.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from app.db import rounds as rounds_db
from app.db.connection import connect
from app.errors import NeedsRootError, UsageError
from app.services.collector import capture_file, sniffer_file
from app.services.collector.collector import Collector, Observations
from app.services.collector.scanner import Listener
from app.services.kernel import maps, pin_owner, prog_run, xdp, xdp_unattached

log = logging.getLogger(__name__)

REPLAY_ROOT = Path("/sys/fs/bpf/portwatch-replay")
INTERFACE = "replay"          # rounds.interface of replayed rounds (and the private pin directory's name)
# the programs' clock moves in steps of capture time: the live clock (CLOCK_MONOTONIC_COARSE) moves by a
# jiffy, 4 ms at HZ=250, so flow times keep the live resolution and the clock costs at most one map
# update per 4 ms of capture
CLOCK_TICK_NS = 4_000_000


@dataclass
class ReplayResult:
    capture: str
    hosts: list[str]
    host_inferred: bool                    # True: the capture's most-answered address, not --host
    packets: int
    rounds: list = field(default_factory=list)        # collector.RoundSummary per round
    stats: prog_run.RunStats = field(default_factory=prog_run.RunStats)
    listeners: list = field(default_factory=list)     # (port, protocol, address, first answer ns)
    sniffed: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    first_ts: float = 0.0
    last_ts: float = 0.0
    syscall_floor_ns: float | None = None   # one test-run call from Python, alone (measure_floor=True)
    python_ns: float | None = None          # per packet, the feed's user-space machinery alone (measure_floor=True)
    floor_seconds: float = 0.0              # spent measuring those two (in ``seconds``)

    def lines(self) -> list[str]:
        how = "the capture's most-answered address" if self.host_inferred else "--host"
        s = self.stats
        out = [f"replaying {self.capture}: {self.packets} packets, host {', '.join(self.hosts)} ({how}); "
               f"{s.inbound} to the host through XDP, {s.outbound} from it through TC egress"]
        out += [r.line() for r in self.rounds]
        tail = (f"{len(self.rounds)} rounds of capture time in {self.seconds:.1f} s "
                f"({self.packets / max(self.seconds, 1e-9):,.0f} packets/s), {len(self.listeners)} listeners inferred, "
                f"{self.sniffed} packets sniffed")
        if s.dropped:
            tail += f", {s.dropped} packets dropped by the replay's blocklist and SYN limit"
        if s.cut:
            tail += (f", {s.cut} frames over {prog_run.MAX_FRAME} bytes fed cut to their first {prog_run.MAX_FRAME} "
                     f"(the most a test run takes): packets and payload bytes exact, {s.cut_bytes} frame bytes "
                     f"not counted")
        if s.too_short:
            tail += f", {s.too_short} frames shorter than an Ethernet header not fed"
        return out + [tail]


class ReplayCollector(Collector):
    """A Collector whose maps are the private, unattached programs' (see module doc)."""

    def __init__(self, settings, capture_name: str, before_store: Callable[[], object] | None = None):
        """``before_store``: called once the programs are compiled, before the store is opened (a replay
        waits there for its capture's analysis, so a capture it refuses leaves no new database)."""
        super().__init__(settings, INTERFACE)
        self.clock_offset = 0.0                        # the programs' clock is capture time in Unix ns
        self.round_marks = {"replayed": 1, "capture": capture_name, "xdp_mode": "test-run"}
        self.compile_seconds = 0.0
        self.before_store = before_store

    def open(self) -> None:
        if Path(self.settings.general.pin_root).parent != REPLAY_ROOT:
            raise UsageError("a replay needs its private pin root (replay.private_settings), never the host's")
        if os.geteuid() != 0:
            raise NeedsRootError("replaying needs root (BPF programs and maps): run it with sudo")
        xdp.ensure_bpffs(Path(self.settings.general.pin_root))
        try:
            built = xdp_unattached.build_unattached(self.settings, self.pin_dir)
            self.compile_seconds = built["compile_seconds"]
            if self.before_store is not None:
                self.before_store()
            self.conn = connect(self.db_path, create=True)      # a replay makes its store, like a collection
            self.db_id = rounds_db.database_id(self.conn)
            self.record = pin_owner.claim(self.pin_dir, self.interface, self.db_id, self.db_path)
            self._maps = maps.open_maps(self.pin_dir)
            self._born = {m.info.id for m in self._maps.values()}   # every map counts from zero for this store
            self.load_state = xdp.LoadState(self.interface, self.pin_dir, "test-run", built["program_id"],
                                            xdp.source_hash(self.settings), compiled=True, reason="replay",
                                            compile_seconds=self.compile_seconds, maps_created=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        root = Path(self.settings.general.pin_root)
        if root.parent == REPLAY_ROOT:                 # the private pins only, never a pin root of the host's
            shutil.rmtree(root, ignore_errors=True)
            try:
                REPLAY_ROOT.rmdir()                    # the last replay leaves no empty directory in bpffs
            except OSError:
                pass                                   # another replay still runs (or the directory is gone)


def private_settings(settings):
    """A copy of ``settings`` whose pin root is this process's own (never the host's pins). Private roots
    left by replays that were killed (their process is gone) are removed first: their pins keep programs
    and maps alive in the kernel."""
    if REPLAY_ROOT.is_dir():
        for stale in REPLAY_ROOT.iterdir():
            if stale.name.isdigit() and not Path(f"/proc/{stale.name}").exists():
                shutil.rmtree(stale, ignore_errors=True)
    private = copy.deepcopy(settings)
    private.general.pin_root = str(REPLAY_ROOT / f"{os.getpid()}")
    return private


def directions(h: capture_file.Headers, hosts: list[str]) -> np.ndarray:
    """(n,) bool: True for packets the host sent (its address as source; non-IP frames by its MAC)."""
    keys = np.array([capture_file.address_key(a) for a in hosts], dtype="V17")
    outbound = np.isin(h.src, keys) & (h.ip > 0)
    macs = np.unique(h.eth_src[outbound])
    return outbound | ((h.ip == 0) & np.isin(h.eth_src, macs))


@dataclass
class _Plan:
    """What a replay feeds, worked out from the capture while the programs compile: each packet's direction,
    the capture order, round edges (ns) and each round's end index in that order, clock ticks, the inferred
    listeners and, per round, the sniffer's records (None without the sniffer)."""
    hosts: list[str]
    outbound: np.ndarray
    order: np.ndarray
    bounds: list[int]
    cut: list[int]
    ticks: np.ndarray
    listeners: list
    sampled: list | None


def _read_and_plan(settings, capture_path, hosts: list[str], round_seconds: float, sniff: bool):
    """(Capture, _Plan) of the file, or UsageError with one sentence."""
    cap = capture_file.read(capture_path)
    if not len(cap):
        raise UsageError(f"{capture_path} holds no packets")
    return cap, _plan(settings, cap, hosts, round_seconds, sniff)


def _plan(settings, cap: capture_file.Capture, hosts: list[str], round_seconds: float, sniff: bool) -> _Plan:
    h = capture_file.headers(cap)
    hosts = hosts or [a for a in [capture_file.most_answered(h, cap.ts_ns)] if a]
    if not hosts:
        raise UsageError(f"{cap.name} holds no IP packet: name the host with --host")
    outbound = directions(h, hosts)
    order = np.argsort(cap.ts_ns, kind="stable")
    ts_sorted = cap.ts_ns[order]
    t0 = int(ts_sorted[0])
    n_rounds = int((int(ts_sorted[-1]) - t0) // int(round_seconds * 1e9)) + 1
    bounds = [t0 + int(k * round_seconds * 1e9) for k in range(n_rounds + 1)]
    cut = np.searchsorted(ts_sorted, bounds[1:], side="left").tolist()
    cut[-1] = len(order)
    ticks = cap.ts_ns // CLOCK_TICK_NS * CLOCK_TICK_NS
    sampled = _sniff(settings, cap, order, cut, hosts, bounds) if sniff and settings.sniffer.enabled else None
    return _Plan(hosts, outbound, order, bounds, cut, ticks, capture_file.inferred_listeners(h, cap.ts_ns, outbound),
                 sampled)


def replay(settings, capture_path: str | Path, hosts=(), round_seconds: float = 60.0,
           after_round: Callable | None = None, sniff: bool = True, measure_floor: bool = False) -> ReplayResult:
    """Replay one capture into ``settings.general.db`` (see module doc). ``measure_floor``: also time one
    test-run call alone on the capture's first frame, and the feed's user-space machinery alone on its
    first 100,000 packets (bench/replay.py), after the replay. The capture is
    analysed (directions, listeners, the sniffer's tshark pass) in a thread while BCC compiles the programs
    in its own process: the capture is read there too (only its first bytes are checked before)."""
    if round_seconds <= 0:
        raise UsageError("--round-seconds must be positive")
    started = time.monotonic()
    capture_file.check(capture_path)             # not a capture at all: one sentence before anything starts
    settings = private_settings(settings)
    with ThreadPoolExecutor(1, thread_name_prefix="replay-plan") as pool:
        planned = pool.submit(_read_and_plan, settings, capture_path, list(hosts), round_seconds, sniff)
        with ReplayCollector(settings, Path(capture_path).name, before_store=planned.result) as collector:
            cap, plan = planned.result()
            result = ReplayResult(cap.name, plan.hosts, not hosts, len(cap), listeners=plan.listeners,
                                  compile_seconds=collector.compile_seconds)
            _feed(collector, settings, cap, plan, result, after_round)
            if measure_floor:
                first = int(plan.order[0])
                off = int(cap.offsets[first])
                frame = bytes(cap.buffer[off:off + min(int(cap.lengths[first]), prog_run.MAX_FRAME)])
                floor_started, sample = time.monotonic(), plan.order[:100_000]
                with prog_run.ProgramRunner(collector.pin_dir) as runner:
                    result.syscall_floor_ns = runner.syscall_ns(frame)
                    result.python_ns = runner.user_space_ns(
                        np.frombuffer(cap.buffer, dtype=np.uint8).ctypes.data, cap.offsets[sample], cap.lengths[sample],
                        plan.outbound[sample], plan.ticks[sample])
                result.floor_seconds = time.monotonic() - floor_started
    result.first_ts, result.last_ts = plan.bounds[0] / 1e9, int(cap.ts_ns[plan.order[-1]]) / 1e9
    result.seconds = time.monotonic() - started
    return result


def _feed(collector: ReplayCollector, settings, cap: capture_file.Capture, plan: _Plan, result: ReplayResult,
          after_round: Callable | None) -> None:
    """Every round's packets through the programs, then the round closed by the collector's own code and
    the closed loop's step (``after_round``) run at its end, in capture time."""
    frames = np.frombuffer(cap.buffer, dtype=np.uint8)     # held for the loop: the programs read from it
    bounds, cut = plan.bounds, plan.cut
    with prog_run.ProgramRunner(collector.pin_dir) as runner:
        lo = 0
        for k, hi in enumerate(cut):
            idx = plan.order[lo:hi]
            runner.run(frames.ctypes.data, cap.offsets[idx], cap.lengths[idx], plan.outbound[idx], plan.ticks[idx],
                       result.stats)
            end = bounds[k + 1] / 1e9
            seen = Observations(listeners=_listeners(plan.listeners, bounds[k + 1]), scanner_status="inferred")
            if plan.sampled is not None:
                seen.packets, seen.sniffer_status = plan.sampled[k], "ok"
                result.sniffed += len(plan.sampled[k])
            result.rounds.append(collector.close_round(bounds[k] / 1e9, seen, reconcile=False, at=end))
            if after_round is not None:
                runner.set_clock(bounds[k + 1])          # what the loop writes now is dated at the round's end
                after_round(collector.conn, settings, bounds[0] / 1e9, end, k == len(cut) - 1)
            lo = hi


def _listeners(listeners, end_ns: int) -> list[Listener]:
    """The inferred listeners the host had answered on before ``end_ns`` (no pid, process or user)."""
    return [Listener(port, proto, address, "ipv6" if ":" in address else "ipv4", "LISTEN" if proto == "tcp" else "BOUND",
                     None, None, None, 0, inferred=1)
            for port, proto, address, first in listeners if first < end_ns]


def _sniff(settings, cap, order, cut, hosts, bounds) -> list[list]:
    """Per round, the sniffer records of its first ``sniffer.max_packets`` packets (a live sniffer's cap per
    window): one tshark run over one file of all rounds' samples, split back by capture time."""
    cap_per_round = settings.sniffer.max_packets
    sample, lo = [], 0
    for hi in cut:
        sample.extend(order[lo:min(hi, lo + cap_per_round)].tolist())
        lo = hi
    with tempfile.TemporaryDirectory(prefix="portwatch-replay-") as tmp:
        path = Path(tmp) / "sample.pcap"
        sniffer_file.write_pcap(path, cap, sample)
        records, skipped = sniffer_file.records_from_file(path, set(hosts), settings.sniffer.tshark_path)
    if skipped:
        log.info("replay sniffer: %d packets tshark printed could not be described", skipped)
    per_round: list[list] = [[] for _ in cut]
    edges = np.array(bounds[1:-1], dtype=np.float64) / 1e9
    for record, k in zip(records, np.searchsorted(edges, [r.timestamp for r in records], side="right").tolist()):
        per_round[k].append(record)
    return per_round
