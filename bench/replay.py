"""Replay benchmark: a capture of N packets (default 1,000,000) through the programs with BPF_PROG_TEST_RUN.

Writes a synthetic pcap (struct-built Ethernet/IPv4 TCP and UDP frames, both directions, 2,000 peers,
10 minutes of capture time) and replays it with `python -m app replay`'s service, without and with the
sniffer's tshark pass, printing side by side:

  - packets per second of the whole replay (wall time, the BCC compile included: it runs while the
    capture is read and analysed);
  - ns per packet inside the programs (the kernel's own test-run duration), in the rest of each
    test-run call (syscall, the kernel's set-up, ctypes), in numpy around the calls, and the Python
    around them (reading the capture, rounds, rows, tshark's pass with the sniffer).

Runs as root (BPF); touches no interface, namespace or the host's pins. ``--packets N`` for another size;
``--smoke``: 50,000 packets, kernel path only (bench/run_all.py --smoke).
"""
from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.services.collector import replay  # noqa: E402

HOST = bytes([198, 18, 150, 1])
ETH_IN = bytes.fromhex("020000000001" "020000000002" "0800")
ETH_OUT = bytes.fromhex("020000000002" "020000000001" "0800")


def _frame(src: bytes, dst: bytes, proto: int, sport: int, dport: int, payload: int, eth: bytes) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + payload, 0))
    total = 20 + len(l4) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0, src, dst)
    return eth + ip + l4 + b"\0" * payload


def write_capture(path: Path, n: int, seconds: float = 600.0, seed: int = 1) -> None:
    rnd = random.Random(seed)
    peers = [bytes([198, 18, 151 + i // 250, 1 + i % 250]) for i in range(2000)]
    kinds = []
    for _ in range(512):        # a pool of frames, reused: building a million with struct takes long itself
        peer, tcp = rnd.choice(peers), rnd.random() < 0.7
        sport, port = rnd.randrange(32768, 61000), rnd.choice([443, 80, 22, 53, 123, 8080])
        size = rnd.choice([0, 40, 200, 1200])
        if rnd.random() < 0.6:
            kinds.append(_frame(peer, HOST, 6 if tcp else 17, sport, port, size, ETH_IN))
        else:
            kinds.append(_frame(HOST, peer, 6 if tcp else 17, port, sport, size, ETH_OUT))
    head = struct.Struct("<IIII")
    step = int(seconds * 1e9 / n)
    t = 1_760_000_000 * 10**9
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for i in range(n):
            f = kinds[rnd.randrange(512)]
            fh.write(head.pack(t // 10**9, t % 10**9, len(f), len(f)))
            fh.write(f)
            t += step


def run(cap: Path, tmp: Path, sniff: bool):
    os.environ["PORTWATCH_CONFIG"] = str(tmp / "none.toml")
    (tmp / "none.toml").write_text("")
    s = config.load()
    s.general.db = str(tmp / f"replay-{int(sniff)}.db")
    s.general.state_dir = str(tmp / "state")
    s.general.run_dir = str(tmp / "run")
    t0 = time.monotonic()
    result = replay.replay(s, cap, ["198.18.150.1"], round_seconds=60, sniff=sniff, measure_floor=not sniff)
    return result, time.monotonic() - t0 - result.floor_seconds      # the floors' own measurement left out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="50,000 packets, kernel path only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/replay.py needs root (BPF programs and maps)", file=sys.stderr)
        return 1
    n_packets = 50_000 if args.smoke else args.packets
    with tempfile.TemporaryDirectory(prefix="pw-bench-replay-") as d:
        tmp = Path(d)
        cap = tmp / "bench.pcap"
        t0 = time.monotonic()
        write_capture(cap, n_packets)
        print(f"capture: {n_packets:,} packets, {cap.stat().st_size / 1e6:.0f} MB, written in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        print(f"\n== replay of {n_packets:,} packets (10 rounds of 60 s capture time) ==")
        print(f"{'run':<22} {'wall s':>7} {'compile s':>9} {'rest s':>7} {'pkt/s (rest)':>13} {'ns/pkt':>7} "
              f"{'prog ns':>8} {'call ns':>8} {'batch ns':>9} {'other ns':>9}")
        floor = python = kernel_row = None
        for sniff in (False,) if args.smoke else (False, True):
            result, wall = run(cap, tmp, sniff)
            floor, python = result.syscall_floor_ns or floor, result.python_ns or python
            s, n = result.stats, result.packets
            rest = wall - result.compile_seconds       # what the compile did not hide
            per = rest / n * 1e9
            prog, call, loop = (s.program_seconds / n * 1e9, s.call_seconds / n * 1e9, s.loop_seconds / n * 1e9)
            kernel_row = kernel_row or (prog, loop)
            print(f"{'with sniffer (tshark)' if sniff else 'kernel path only':<22} {wall:>7.1f} "
                  f"{result.compile_seconds:>9.1f} {rest:>7.1f} {n / rest:>13,.0f} {per:>7.0f} {prog:>8.0f} {call - prog:>8.0f} "
                  f"{loop - call:>9.0f} {per - loop:>9.0f}", flush=True)
            if not plausible_run(result, wall):
                return 1
        prog, loop = kernel_row
        print(f"\nper packet fed, kernel-path run: inside the program {prog:.0f} ns | the kernel's test-run set-up "
              f"and the syscall {loop - prog - python:.0f} ns | the Python around them {python:.0f} ns (options, map "
              f"of calls, clock, results: the same feed with a no-op C call in place of the test run)")
        print(f"one BPF_PROG_TEST_RUN call of the XDP program on one frame, repeated in a Python loop: {floor:.0f} ns")
        print("rest s: the wall time less the BCC compile (the capture is read and analysed, tshark included, "
              "while it runs); ns/pkt: rest per packet; prog ns: inside the programs (the kernel's own test-run "
              "duration); call ns: the rest of each test-run call (syscall, the kernel's test-run set-up, ctypes); "
              "batch ns: numpy around the calls (options built, results read); other ns: the rest (what of reading "
              "and analysing the capture outlasted the compile, rounds and rows)")
    return 0


def plausible_run(result, wall: float) -> bool:
    """Every packet fed, the program time inside the call time inside the wall time."""
    s = result.stats
    if s.inbound + s.outbound != result.packets:
        print(f"implausible: {s.inbound + s.outbound} packets fed of {result.packets}", file=sys.stderr)
        return False
    if not 0 < s.program_seconds <= s.call_seconds <= s.loop_seconds <= wall:
        print(f"implausible times: program {s.program_seconds:.2f} s, calls {s.call_seconds:.2f} s, "
              f"loop {s.loop_seconds:.2f} s, wall {wall:.2f} s", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
