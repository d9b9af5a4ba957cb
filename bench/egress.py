"""Egress benchmarks, measured side by side in one run, printed as ratio tables.

1. The TC egress program's cost per packet with BPF_PROG_TEST_RUN (`bpftool prog run ... repeat N`)
   next to the XDP program's for the same frames.
2. veth throughput with both programs attached against none, interleaved runs, median of 5:
   inbound frames (peer -> this host: XDP) for XDP generic and native, marking what
   `collector.xdp_mode = auto` picks on veth, and outbound frames (this host -> peer: TC egress).
   Beside them a bare XDP_PASS program (what any XDP program costs on that driver).
3. A collector round (no sniffer, no scanner) with the egress maps (eg_dests, eg_dstports, eg_flows)
   at 10k and 50k entries: CPU seconds and peak RSS of the whole collector process.

Fails (exit 1, one sentence each) when a figure cannot be right: a per-packet cost in microseconds,
portwatch's programs passing more packets than a bare XDP_PASS program or none (beyond noise), a
round whose recorded CPU exceeds its whole process's.

Runs as root; all traffic stays between lab hosts in 198.18.0.0/15. Cleans up after itself.
Parallel runs take their own lab: PW_BENCH_PREFIX (default pwbe) and PW_BENCH_SUBNET (default 171).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import collector as bc  # noqa: E402  (bench/collector.py: frames, prog_run_ns, blast, round cost)
from app.services.kernel import egress  # noqa: E402
from app.lab import Lab  # noqa: E402
from app.threads import collection  # noqa: E402
from bench.plausible import Plausibility  # noqa: E402


def blast_out(lab: Lab, frames: list[bytes], n: int) -> float:
    """n frames sent from THIS namespace out of lab.interface (through TC egress); packets/s."""
    out = subprocess.run([sys.executable, "-c", bc.SENDER, lab.interface, str(n), *[f.hex() for f in frames]],
                         capture_output=True, text=True, timeout=120, check=True)
    return n / float(out.stdout.strip())


def detach_all(lab: Lab) -> None:
    for off in ("xdp", "xdpgeneric", "xdpdrv"):
        subprocess.run(["ip", "link", "set", "dev", lab.interface, off, "off"], capture_output=True)
    subprocess.run(["tc", "filter", "del", "dev", lab.interface, "egress", "pref", str(egress.EGRESS_PREF)],
                   capture_output=True)


def attach_pinned(lab: Lab, pdir: Path, mode: str) -> None:
    """Both pinned programs back on, without compiling (ip link ... pinned, tc ... object-pinned)."""
    detach_all(lab)
    flag = {"generic": "xdpgeneric", "native": "xdpdrv"}[mode]
    subprocess.run(["ip", "link", "set", "dev", lab.interface, flag, "pinned", str(pdir / "prog")], check=True)
    egress.attach(lab.interface, pdir)


def fill_destinations(lab: Lab, count: int, base: str = "198.19.0.0") -> None:
    """count distinct destinations (one UDP frame each) sent out of lab.interface: eg_dests, eg_dstports
    and eg_flows each gain ``count`` keys."""
    dmac = bc.mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())  # any MAC will do
    first = int(ipaddress.IPv4Address(base))
    src = ipaddress.IPv4Address(lab.root_v4).packed
    frames_per_call = 5000
    for start in range(0, count, frames_per_call):
        frames = []
        for i in range(start, min(count, start + frames_per_call)):
            dst = (first + i).to_bytes(4, "big")
            udp = struct.pack("!HHHH", 40000, 5000 + i % 7, 12, 0) + b"abcd"
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 32, 0, 0, 64, 17, 0, src, dst)
            ip = ip[:10] + struct.pack("!H", bc.checksum(ip)) + ip[12:]
            frames.append(b"\x02\x00\x00\x00\x00\x02" + dmac + b"\x08\x00" + ip + udp)
        blast_out(lab, frames, len(frames))


def main() -> int:
    if os.geteuid() != 0:
        print("bench/egress.py needs root (XDP, TC, namespaces)", file=sys.stderr)
        return 3
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-eg-"))
    s = bc.settings_for(tmp)
    checks = Plausibility("bench/egress.py")
    lab = Lab(prefix=os.environ.get("PW_BENCH_PREFIX", "pwbe")[:6], subnet=int(os.environ.get("PW_BENCH_SUBNET", "171")))
    pdir = Path(s.general.pin_root) / lab.interface
    try:
        lab.create()
        collection.run_collection(s, lab.interface, 0, 1, with_threads=False)
        auto_pick, driver = egress.auto_modes(lab.interface)
        auto_pick = auto_pick[0]

        print("\n== per-packet cost, BPF_PROG_TEST_RUN (200k repeats, median of 3): TC egress vs XDP ==")
        print(f"{'frame':<16} {'TC ns':>8} {'XDP ns':>8} {'TC/XDP':>8}")
        dmac, smac = b"\x02" * 6, b"\x04" * 6
        frames = {
            "IPv4 UDP 64 B": bc.udp_frame("198.18.171.1", "198.18.171.2", 40000, 5001, 18, dmac, smac),
            "IPv4 TCP SYN": bc.tcp_syn_frame("198.18.171.1", "198.18.171.3", 22, dmac, smac),
            "IPv6 UDP": bc.udp6_frame("2001:db8:18:171::1", "2001:db8:18:171::2", 53, dmac, smac),
        }
        for name, frame in frames.items():
            tc = statistics.median(bc.prog_run_ns(pdir / egress.PROG_PIN, frame, 200000) for _ in range(3))
            xd = statistics.median(bc.prog_run_ns(pdir / "prog", frame, 200000) for _ in range(3))
            print(f"{name:<16} {tc:>8.1f} {xd:>8.1f} {tc / xd:>7.2f}x")
            checks.program_cost(f"the TC egress program on a {name} frame", tc)
            checks.program_cost(f"the XDP program on a {name} frame", xd)

        n = 200000
        rmac = bc.mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())
        inbound = [bc.udp_frame(lab.host_v4(0), lab.root_v4, 40000 + i, 9, 18, rmac, b"\x02\x00\x00\x00\x00\x01")
                   for i in range(16)]
        outbound = [bc.udp_frame(lab.root_v4, lab.host_v4(0), 40000 + i, 9, 18, b"\x02\x00\x00\x00\x00\x01", rmac)
                    for i in range(16)]
        sink = __import__("socket").socket(2, 2)
        sink.bind((lab.root_v4, 9))
        runs = {"none": [], "generic": [], "native": [], "bare generic": [], "bare native": [], "out none": [],
                "out tc": []}
        try:
            for _ in range(5):
                detach_all(lab)
                runs["none"].append(bc.blast(lab, inbound, n))
                runs["out none"].append(blast_out(lab, outbound, n))
                for mode in ("generic", "native"):
                    detach_all(lab)
                    bc.attach_pass_program(lab.interface, mode)
                    runs["bare " + mode].append(bc.blast(lab, inbound, n))
                    attach_pinned(lab, pdir, mode)
                    runs[mode].append(bc.blast(lab, inbound, n))
                attach_pinned(lab, pdir, auto_pick)
                runs["out tc"].append(blast_out(lab, outbound, n))
        finally:
            sink.close()
            attach_pinned(lab, pdir, auto_pick)
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"\n== veth throughput, both programs attached vs none ({n // 1000}k frames, AF_PACKET, median of 5, "
              "interleaved) ==")
        print(f"{'inbound (XDP)':<34} {'pkt/s':>12} {'vs none':>8}")
        print(f"{'no program':<34} {med['none']:>12,.0f} {1:>7.3f}x")
        for mode in ("generic", "native"):
            print(f"{'bare XDP_PASS program, ' + mode:<34} {med['bare ' + mode]:>12,.0f} "
                  f"{med['bare ' + mode] / med['none']:>7.3f}x")
            tag = f"XDP {mode} + TC" + ("  <- auto on " + driver if mode == auto_pick else "")
            print(f"{tag:<34} {med[mode]:>12,.0f} {med[mode] / med['none']:>7.3f}x")
            checks.not_faster(f"inbound {mode}: portwatch's programs", runs[mode], runs["bare " + mode],
                              "a bare XDP_PASS program")
        print(f"{'outbound (TC egress)':<34} {'pkt/s':>12} {'vs none':>8}")
        print(f"{'no program':<34} {med['out none']:>12,.0f} {1:>7.3f}x")
        print(f"{'TC egress + XDP ' + auto_pick:<34} {med['out tc']:>12,.0f} {med['out tc'] / med['out none']:>7.3f}x")
        checks.not_faster("outbound through TC egress", runs["out tc"], runs["out none"], "no program")

        print("\n== collector round (no sniffer/scanner) with the egress maps at N entries: whole process ==")
        print(f"{'entries':>8} {'CPU s':>7} {'peak RSS MB':>12} {'CPU target 0.5/x':>17}")
        cpu0, rss0, in0 = bc.collector_round_cost(s, lab.interface)
        checks.expect(0 < in0 <= cpu0 * 1.05 + 0.01, f"an empty round recorded {in0:.3f} CPU s, its process {cpu0:.3f} s")
        print(f"{0:>8} {cpu0:>7.3f} {rss0:>12.1f} {0.5 / cpu0:>16.2f}x")
        filled = 0
        for target in (10000, 50000):
            fill_destinations(lab, target - filled, base=str(ipaddress.IPv4Address("198.19.0.0") + filled))
            filled = target
            cpu, rss, in_round = bc.collector_round_cost(s, lab.interface)
            print(f"{target:>8} {cpu:>7.3f} {rss:>12.1f} {0.5 / cpu:>16.2f}x   ({cpu / cpu0:.2f}x the empty round)")
            checks.expect(0 < in_round <= cpu * 1.05 + 0.01,
                          f"a round with {target:,} egress entries recorded {in_round:.3f} CPU s, its process {cpu:.3f} s")
    finally:
        detach_all(lab)
        lab.destroy()
        shutil.rmtree(s.general.pin_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
