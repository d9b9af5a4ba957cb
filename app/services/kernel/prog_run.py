"""Run the loaded programs on packets from user space: BPF_PROG_TEST_RUN through libbpf (ctypes), no
interface, no namespace. The kernel runs the real program on each frame (XDP port_flow for packets to
the host, TC egress for packets from it) and its maps count exactly as on an interface.

:class:`ProgramRunner` does it (its cost: :meth:`ProgramRunner._run_batch`; frames longer than a test run
takes: :meth:`ProgramRunner.run`). Used by the replay (app/services/collector/replay.py); app/lab.py and
the benches borrow its ``BpfTestRunOpts`` mirror. Imports only kernel modules.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import BpfError
from app.services.kernel import egress, maps
from app.services.kernel.bpf_structs import PwConfig

XDP_DROP, TC_ACT_SHOT = 1, 2
ETH_HLEN = 14             # a test run refuses shorter frames (a live interface never delivers one)
# the largest frame a test run takes: a page less the XDP head room (256) and the skb_shared_info tail
# (320): 3520 bytes on x86-64 with 4 KiB pages; the TC run takes a little more (smaller head room)
MAX_FRAME = 3500
BATCH = 65536             # packets per options array (72 bytes each: ~4.7 MB)


class BpfTestRunOpts(ctypes.Structure):    # struct bpf_test_run_opts (libbpf 1.x, bpf.h)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


# the same struct as a numpy record, one per packet of a batch (offsets and size from the ctypes mirror)
OPTS_DTYPE = np.dtype({"names": [name for name, _ in BpfTestRunOpts._fields_],
                       "formats": [np.dtype(np.uintp) if kind in (ctypes.c_size_t, ctypes.c_void_p)
                                   else np.dtype(np.int32) if kind is ctypes.c_int else np.dtype(np.uint32)
                                   for _, kind in BpfTestRunOpts._fields_],
                       "offsets": [getattr(BpfTestRunOpts, name).offset for name, _ in BpfTestRunOpts._fields_],
                       "itemsize": ctypes.sizeof(BpfTestRunOpts)})


@dataclass
class RunStats:
    """What one run fed: packets per direction, those the programs dropped; frames fed cut to ``MAX_FRAME``
    and the frame bytes that cut left out (not counted by the programs); frames shorter than an Ethernet
    header (not fed: a test run refuses them). Seconds inside the programs (the kernel's own per-run
    duration), in the calls (syscalls, the kernel's test-run set-up and ctypes around each), and in the
    whole loop (the calls plus building the options and reading the results with numpy)."""
    inbound: int = 0
    outbound: int = 0
    dropped: int = 0
    cut: int = 0
    cut_bytes: int = 0
    too_short: int = 0
    program_seconds: float = 0.0
    call_seconds: float = 0.0
    loop_seconds: float = 0.0


def _prog_fd(path: Path) -> int:
    rc = maps.libbpf().bpf_obj_get(str(path).encode())
    if rc < 0:
        raise BpfError(f"cannot open the pinned program {path}: {os.strerror(maps._err(rc))}")
    return rc


class ProgramRunner:
    """The two programs pinned in ``pin_dir`` (``prog`` / ``eg_prog`` of a private pin dir) and its config
    map (the clock); :meth:`run` is one test run per packet, in order."""

    def __init__(self, pin_dir: str | Path):
        self.pin_dir = Path(pin_dir)
        lib = maps.libbpf()
        self._update = lib.bpf_map_update_elem
        # the per-packet call: libbpf 1.x returns -errno itself, so this handle skips ctypes' errno swap
        self._run = ctypes.CDLL("libbpf.so.1").bpf_prog_test_run_opts
        self._run.argtypes = [ctypes.c_int, ctypes.c_size_t]     # the options' address: an int converts faster
                                                                # to size_t than to void * (same register)
        self._run.restype = ctypes.c_int
        self.fds = (_prog_fd(self.pin_dir / "prog"), _prog_fd(self.pin_dir / egress.PROG_PIN))
        self.config = maps.PinnedMap(self.pin_dir / "config")
        try:        # the config array is mmap-able (bpf/port_flow.c): the clock is a memory write per tick
            self._config_mem = mmap.mmap(self.config.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            self._config_mem = None                # maps made without BPF_F_MMAPABLE: a syscall per tick

    def __enter__(self) -> "ProgramRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._config_mem is not None:
            try:
                self._config_mem.close()
            except BufferError:                    # a loop that raised still holds its view: the GC unmaps it
                pass
            self._config_mem = None
        for fd in self.fds:
            os.close(fd)
        self.fds = ()
        self.config.close()

    def syscall_ns(self, frame: bytes, repeat: int = 20000) -> float:
        """ns of one BPF_PROG_TEST_RUN call of the XDP program on ``frame`` from Python (median of 3 timed
        loops of ``repeat`` calls): the per-packet floor of a replay, for bench/replay.py."""
        buf = ctypes.create_string_buffer(frame, len(frame))
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), data_in=ctypes.addressof(buf), data_size_in=len(frame))
        ref, run, fd, samples = ctypes.addressof(opts), self._run, self.fds[0], []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeat):
                opts.data_size_out = 0
                run(fd, ref)
            samples.append((time.perf_counter() - t0) / repeat * 1e9)
        return sorted(samples)[1]

    def run(self, base: int, offsets: np.ndarray, lengths: np.ndarray, outbound: np.ndarray, ticks_ns: np.ndarray,
            stats: RunStats | None = None) -> RunStats:
        """Feed packets through the programs, in order. ``base``: address of the buffer the frames are in;
        (n,) arrays: byte offset of each frame from ``base``, its size, True when the host sent it, its capture
        time in ns rounded to the clock's tick. The buffer must stay alive and unchanged during the call.

        Frames longer than a test run takes in its linear buffer (``MAX_FRAME``; live, such a frame is a GRO
        or jumbo frame) are fed cut to their first ``MAX_FRAME`` bytes: every header the programs parse is
        there, so the packet, its addresses, ports, flags and its L4 payload bytes (read from the IP header)
        count exactly; its frame bytes count as ``MAX_FRAME`` (``RunStats.cut_bytes`` says how many were not)."""
        stats = stats or RunStats()
        started = time.perf_counter()
        fed = lengths >= ETH_HLEN
        stats.too_short += int(len(lengths) - fed.sum())
        offsets, lengths, outbound, ticks_ns = offsets[fed], lengths[fed], outbound[fed], ticks_ns[fed]
        over = lengths > MAX_FRAME
        stats.cut += int(over.sum())
        stats.cut_bytes += int((lengths[over] - MAX_FRAME).sum())
        for lo in range(0, len(offsets), BATCH):
            hi = lo + BATCH
            self._run_batch(base + offsets[lo:hi], np.minimum(lengths[lo:hi], MAX_FRAME), outbound[lo:hi],
                            ticks_ns[lo:hi], stats)
        stats.loop_seconds += time.perf_counter() - started
        return stats

    def user_space_ns(self, base: int, offsets: np.ndarray, lengths: np.ndarray, outbound: np.ndarray,
                      ticks_ns: np.ndarray) -> float:
        """ns per packet of the user-space machinery of :meth:`run` alone: the same options, calls and clock
        writes with a no-op C function (libc's ``labs``) in place of the test run and a scratch clock — the
        Python around each program run, for bench/replay.py. The programs see nothing."""
        noop = ctypes.CDLL(None).labs
        noop.argtypes, noop.restype = self._run.argtypes, ctypes.c_int
        stats = RunStats()
        started = time.perf_counter()
        self._run_batch(base + offsets, np.minimum(lengths, MAX_FRAME), outbound, ticks_ns, stats, noop,
                        ctypes.c_uint64())
        return (time.perf_counter() - started) / max(len(offsets), 1) * 1e9

    def _run_batch(self, data_in: np.ndarray, sizes: np.ndarray, outbound: np.ndarray, ticks_ns: np.ndarray,
                   stats: RunStats, call=None, clock_word: ctypes.c_uint64 | None = None) -> None:
        """One options record per packet, the calls in order (the clock moved before each tick's first
        packet), then the return codes, verdicts and durations read as arrays. ``call``/``clock_word``:
        stand-ins for the test run and the clock (user_space_ns).

        Cost: one syscall per packet (the kernel offers no multi-packet test run for XDP without sending the
        frames). Everything else is done for the batch at once with numpy: the test-run options of every
        packet are one preallocated array (``OPTS_DTYPE``), the calls are a ``map`` of the C function over the
        options' addresses (no Python bytecode, object or attribute write per packet), and the results
        (return codes, verdicts, the kernel's own durations) are read back as arrays. The programs' clock
        (``pw_config.clock_ns``) moves between calls, once per clock tick of capture time that has packets
        (see replay.CLOCK_TICK_NS), by a write into the mmap-ed config map."""
        n = len(data_in)
        opts = np.zeros(n, dtype=OPTS_DTYPE)
        opts["sz"] = OPTS_DTYPE.itemsize
        opts["data_in"] = data_in
        opts["data_size_in"] = sizes
        fds = np.where(outbound, self.fds[1], self.fds[0]).tolist()
        refs = (opts.ctypes.data + np.arange(n, dtype=np.int64) * OPTS_DTYPE.itemsize).tolist()
        new_tick = np.flatnonzero(np.diff(ticks_ns, prepend=-1))            # each tick's first packet
        tick_sizes = np.diff(new_tick, append=n).tolist()
        calls = map(call or self._run, fds, refs)  # lazy: consumed tick by tick below
        rcs: list[int] = []
        take, islice, ticks = rcs.extend, itertools.islice, zip(ticks_ns[new_tick].tolist(), tick_sizes)
        if clock_word is None and self._config_mem is not None:
            # element 0 of an mmap-ed array map starts at offset 0 (released below: close() unmaps)
            clock_word = ctypes.c_uint64.from_buffer(self._config_mem, PwConfig.clock_ns.offset)
        started = time.perf_counter()
        if clock_word is not None:             # the clock is a memory write, inline: often one packet per tick
            for tick, count in ticks:
                clock_word.value = tick
                take(islice(calls, count))
        else:
            set_clock = self._clock_setter()
            for tick, count in ticks:
                set_clock(tick)
                take(islice(calls, count))
        stats.call_seconds += time.perf_counter() - started
        del clock_word
        failed = np.flatnonzero(np.asarray(rcs) < 0)
        if len(failed):
            code = maps._err(rcs[failed[0]])
            raise BpfError(f"BPF_PROG_TEST_RUN failed: {os.strerror(code)}"
                           + (" (this kernel cannot test-run the programs)" if code in (errno.EOPNOTSUPP, 524) else ""))
        verdict = opts["retval"]
        stats.outbound += int(outbound.sum())
        stats.inbound += n - int(outbound.sum())
        stats.dropped += int((verdict == np.where(outbound, TC_ACT_SHOT, XDP_DROP)).sum())
        stats.program_seconds += int(opts["duration"].sum(dtype=np.int64)) / 1e9

    def set_clock(self, ns: int) -> None:
        """Move the programs' clock to capture time ``ns`` (a replay's round end: what the closed loop
        writes then, a SYN limit's expiry, is dated on the programs' clock)."""
        self._clock_setter()(ns)

    def _clock_setter(self):
        """A function moving the programs' clock to a capture time (ns): a write into the mmap-ed config map,
        or a map update where the map is not mmap-able."""
        if self._config_mem is not None:
            # element 0 of an mmap-ed array map starts at offset 0
            clock = np.frombuffer(self._config_mem, dtype=np.uint64, count=1, offset=PwConfig.clock_ns.offset)

            def set_clock(tick: int) -> None:
                clock[0] = tick
            return set_clock
        cfg = maps.read_struct(self.config, maps.INDEX_0, PwConfig) or PwConfig()
        key, cfg_ref, update, fd = ctypes.c_char_p(maps.INDEX_0), ctypes.byref(cfg), self._update, self.config.fd

        def set_clock(tick: int) -> None:
            cfg.clock_ns = tick
            if update(fd, key, cfg_ref, 0) < 0:
                raise BpfError(f"cannot set the replay clock in {self.pin_dir / 'config'}")
        return set_clock
