"""Run the loaded programs on packets from user space: BPF_PROG_TEST_RUN through libbpf (ctypes), no
interface, no namespace. The kernel runs the real program on each frame (XDP port_flow for packets to
the host, TC egress for packets from it) and its maps count exactly as on an interface.

    ProgramRunner(pin_dir)                      the pinned ``prog`` / ``eg_prog`` of a private pin dir
    .run(buffer, offsets, lengths, outbound, ticks_ns) -> RunStats   one call per packet

Cost: one syscall per packet (the kernel offers no multi-packet test run for XDP without sending the
frames); the programs' clock (``pw_config.clock_ns``) moves by a write into the mmap-ed config map
per clock tick of capture time that has packets (see replay.CLOCK_TICK_NS), no syscall. The loop does nothing else per packet:
pointers, sizes, directions and clock ticks are precomputed lists.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from app.errors import BpfError
from app.services.kernel import egress, maps
from app.services.kernel.bpf_structs import PwConfig

XDP_DROP, TC_ACT_SHOT = 1, 2
MAX_FRAME = 3500          # a test run refuses frames over a page less head/tail room (~3.5 KiB)


class BpfTestRunOpts(ctypes.Structure):    # struct bpf_test_run_opts (libbpf 1.x, bpf.h)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


@dataclass
class RunStats:
    """What one run fed: packets per direction, those the programs dropped, frames too large for a test
    run (not fed, counted here only); seconds inside the programs (the kernel's own per-run duration) and in
    the whole loop (syscalls and Python around them)."""
    inbound: int = 0
    outbound: int = 0
    dropped: int = 0
    too_large: int = 0
    program_seconds: float = 0.0
    loop_seconds: float = 0.0


def _prog_fd(path: Path) -> int:
    rc = maps.libbpf().bpf_obj_get(str(path).encode())
    if rc < 0:
        raise BpfError(f"cannot open the pinned program {path}: {os.strerror(maps._err(rc))}")
    return rc


class ProgramRunner:
    """The two programs pinned in ``pin_dir`` and its config map (the clock)."""

    def __init__(self, pin_dir: str | Path):
        self.pin_dir = Path(pin_dir)
        lib = maps.libbpf()
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self._run = lib.bpf_prog_test_run_opts
        self._update = lib.bpf_map_update_elem
        self.fds = (_prog_fd(self.pin_dir / "prog"), _prog_fd(self.pin_dir / egress.PROG_PIN))
        self.config = maps.PinnedMap(self.pin_dir / "config")
        try:        # the config array is mmap-able (bpf/port_flow.c): the clock is a memory write per tick
            self._config_mem = mmap.mmap(self.config.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            self._config_mem = None                # maps made without BPF_F_MMAPABLE: a syscall per tick

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
        ref, run, fd, samples = ctypes.byref(opts), self._run, self.fds[0], []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeat):
                opts.data_size_out = 0
                run(fd, ref)
            samples.append((time.perf_counter() - t0) / repeat * 1e9)
        return sorted(samples)[1]

    def run(self, buffer: bytearray, offsets, lengths, outbound, ticks_ns, stats: RunStats | None = None) -> RunStats:
        """Feed packets (lists, one item per packet: byte offset in ``buffer``, size, True when the host sent
        it, the capture time in ns rounded to the clock's tick) through the programs, in order."""
        stats = stats or RunStats()
        base = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer)) if len(buffer) else 0
        cfg = maps.read_struct(self.config, maps.INDEX_0, PwConfig) or PwConfig()
        cfg_fd, key, cfg_ref = self.config.fd, ctypes.c_char_p(maps.INDEX_0), ctypes.byref(cfg)
        # element 0 of an mmap-ed array map starts at offset 0
        clock_word = (ctypes.c_uint64.from_buffer(self._config_mem, PwConfig.clock_ns.offset)
                      if self._config_mem is not None else None)
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
        opts_ref = ctypes.byref(opts)
        run, update, fds = self._run, self._update, self.fds
        last_tick, program_ns, dropped, too_large, counts = -1, 0, 0, 0, [0, 0]
        clock = time.perf_counter
        started = clock()
        for off, size, out, tick in zip(offsets, lengths, outbound, ticks_ns):
            if size > MAX_FRAME or size < 14:
                too_large += 1
                continue
            if tick != last_tick:
                if clock_word is not None:
                    clock_word.value = tick
                else:
                    cfg.clock_ns = tick
                    if update(cfg_fd, key, cfg_ref, 0) < 0:
                        raise BpfError(f"cannot set the replay clock in {self.pin_dir / 'config'}")
                last_tick = tick
            opts.data_in = base + off
            opts.data_size_in = size
            opts.data_size_out = 0          # the kernel wrote the last frame's size here: no copy-out limit
            rc = run(fds[out], opts_ref)
            if rc < 0:
                code = maps._err(rc)
                raise BpfError(f"BPF_PROG_TEST_RUN failed: {os.strerror(code)}"
                               + (" (this kernel cannot test-run the programs)" if code in (errno.EOPNOTSUPP, 524) else ""))
            counts[out] += 1
            program_ns += opts.duration
            if opts.retval == (TC_ACT_SHOT if out else XDP_DROP):
                dropped += 1
        stats.inbound += counts[0]
        stats.outbound += counts[1]
        stats.dropped += dropped
        stats.too_large += too_large
        stats.program_seconds += program_ns / 1e9
        stats.loop_seconds += clock() - started
        del clock_word                             # no export of the mapping may outlive the loop (close())
        return stats
