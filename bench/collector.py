"""Collector benchmarks, measured side by side in one run, printed as ratio tables.

1. XDP program cost per packet with BPF_PROG_TEST_RUN (`bpftool prog run ... repeat N`) for a
   few frame kinds, with counters and the blacklist lookup (target <= 200 ns).
2. Packets/s through a lab veth with the program attached vs no program and vs a bare XDP_PASS
   program (what any XDP program costs on that driver), interleaved runs (target >= 0.9x).
3. A collector round (no sniffer, no scanner) at 1k, 10k and 50k map entries: CPU seconds and
   peak RSS of the whole collector process (targets <= 0.5 CPU-s and <= 60 MB at 50k).

Fails (exit 1, one sentence each) when a figure cannot be right: a per-packet cost in microseconds,
portwatch's program passing more packets than a bare XDP_PASS program or none (beyond noise), a round
whose recorded CPU exceeds its whole process's. --smoke: fewer repeats, one veth trial, 1k entries.

Runs as root; all traffic stays between lab hosts in 198.18.0.0/15. Cleans up after itself.
Parallel runs on one machine take their own lab: PW_BENCH_PREFIX (default pwbc) and PW_BENCH_SUBNET
(the third octet of 198.18.<n>.0/24, default 9).
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.threads import collection as collector_mod  # noqa: E402
from app.lab import Lab, prog_run  # noqa: E402
from app.services.kernel import maps  # noqa: E402
from bench.plausible import Plausibility, smoke  # noqa: E402

SMOKE = smoke()
BPF_PROG_TYPE_XDP = 6
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2}         # XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE


def settings_for(tmp: Path):
    """A bench's own database, state, lock dir and pin root (on bpffs, named for this process): no
    interface it watches is ever another database's, whatever ran before it."""
    (tmp / "none.toml").write_text("")
    s = config.load(tmp / "none.toml", environ={})
    s.general.db = str(tmp / "bench.db")
    s.general.state_dir = str(tmp / "state")
    s.general.run_dir = str(tmp / "run")
    s.general.pin_root = f"/sys/fs/bpf/pw-bench-{tmp.name}"
    s.scanner.enabled = False
    s.sniffer.enabled = False
    return s


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: int, dst_mac: bytes, src_mac: bytes) -> bytes:
    body = b"p" * payload
    udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def tcp_syn_frame(src: str, dst: str, dport: int, dst_mac: bytes, src_mac: bytes, flags: int = 0x02) -> bytes:
    """A TCP frame (a SYN unless ``flags`` says otherwise: 0x10 is a bare ACK) from src:40000 to dst:dport."""
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 2 if flags & 0x10 else 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp


def udp6_frame(src: str, dst: str, dport: int, dst_mac: bytes, src_mac: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + 32, 0) + b"q" * 32
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, ipaddress.IPv6Address(src).packed,
                      ipaddress.IPv6Address(dst).packed)
    return dst_mac + src_mac + b"\x86\xdd" + ip6 + udp


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def prog_run_ns(prog_pin: Path, frame: bytes, repeat: int) -> float:
    return prog_run(prog_pin, frame, repeat)[1]


SENDER = r"""
import socket, sys, time
iface, n, frames = sys.argv[1], int(sys.argv[2]), [bytes.fromhex(x) for x in sys.argv[3:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
send = s.send
k = len(frames)
t0 = time.perf_counter()
for i in range(n):
    send(frames[i % k])
print(time.perf_counter() - t0)
"""


def pass_program() -> int:
    """A 2-instruction XDP program (r0 = XDP_PASS; exit): what any XDP program costs, nothing more.
    Returns its fd (the caller closes it)."""
    lib = maps.libbpf()
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_void_p]
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    buf = ctypes.create_string_buffer(insns, len(insns))
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_XDP, b"pw_bench_pass", b"GPL", buf, 2, None)
    if fd < 0:
        raise OSError(-fd, f"cannot load the XDP_PASS program: {os.strerror(-fd)}")
    return fd


def attach_pass_program(ifname: str, mode: str) -> None:
    """Attach the bare XDP_PASS program to ``ifname`` in ``mode`` (generic/native); detach it with
    `ip link set dev IF xdp off` (or xdpgeneric off)."""
    lib = maps.libbpf()
    lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]
    fd = pass_program()
    try:
        rc = lib.bpf_xdp_attach(socket.if_nametoindex(ifname), fd, XDP_FLAGS[mode], None)
        if rc < 0:
            raise OSError(-rc, f"cannot attach the XDP_PASS program to {ifname} ({mode}): {os.strerror(-rc)}")
    finally:
        os.close(fd)


def detach_xdp(ifname: str) -> None:
    for off in ("xdp", "xdpgeneric"):
        subprocess.run(["ip", "link", "set", "dev", ifname, off, "off"], capture_output=True)


def blast(lab: Lab, frames: list[bytes], n: int) -> float:
    """Send n frames from the peer namespace (AF_PACKET); returns packets/s the receiver absorbed."""
    out = lab.run(sys.executable, "-c", SENDER, lab.peer_interface, str(n), *[f.hex() for f in frames], timeout=120)
    return n / float(out.stdout.strip())


def rx_packets(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/rx_packets").read_text())


def measure_prog_cost(lab: Lab, s) -> list[tuple]:
    pin = Path(s.general.pin_root) / lab.interface / "prog"
    dmac, smac = b"\x02" * 6, b"\x04" * 6
    frames = {
        "IPv4 UDP 64 B": udp_frame("198.18.9.2", "198.18.9.1", 40000, 5001, 18, dmac, smac),
        "IPv4 TCP SYN": tcp_syn_frame("198.18.9.3", "198.18.9.1", 22, dmac, smac),
        "IPv6 UDP": udp6_frame("2001:db8:18:9::2", "2001:db8:18:9::1", 53, dmac, smac),
    }
    rows = []
    for name, frame in frames.items():
        runs = [prog_run_ns(pin, frame, 20000 if SMOKE else 200000) for _ in range(1 if SMOKE else 3)]
        ns = statistics.median(runs)
        rows.append((name, ns, 200.0 / ns if ns else float("inf")))
    return rows


def measure_veth(lab: Lab, s, n: int = 300000, trials: int = 5) -> tuple[list[float], list[float], list[float]]:
    """Packets/s of each trial (portwatch's program, the bare XDP_PASS program, no program) in
    s.collector.xdp_mode, interleaved trials of n frames each."""
    dmac = mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())
    smac = b"\x02\x00\x00\x00\x00\x01"
    frames = [udp_frame(lab.host_v4(0), lab.root_v4, 40000 + i, 9, 18, dmac, smac) for i in range(16)]
    # a sink the stack can deliver to cheaply: bound, never read (excess lands in RcvbufErrors)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((lab.root_v4, 9))
    with_prog, bare, without = [], [], []
    try:
        for _ in range(trials):
            detach_xdp(lab.interface)
            without.append(blast(lab, frames, n))
            attach_pass_program(lab.interface, s.collector.xdp_mode)
            bare.append(blast(lab, frames, n))
            detach_xdp(lab.interface)
            collector_mod.run_collection(s, lab.interface, 0, 1, with_threads=False)   # re-attaches
            with_prog.append(blast(lab, frames, n))
    finally:
        sink.close()
    return with_prog, bare, without


FILL_NET = "198.18.128.0/17"


def fill_sources(lab: Lab, count: int) -> None:
    """count distinct sources (198.18.128.0 upwards, inside 198.18.0.0/15), one UDP frame each."""
    dmac = mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())
    base = int(ipaddress.IPv4Address("198.18.128.0"))
    script = r"""
import socket, sys, struct, ipaddress
iface, base, count, dst, dmac = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], bytes.fromhex(sys.argv[5])
def cs(d):
    s = sum(struct.unpack('!%dH' % (len(d) // 2), d))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((iface, 0))
dstb = ipaddress.IPv4Address(dst).packed
for i in range(count):
    src = (base + i).to_bytes(4, 'big')
    udp = struct.pack('!HHHH', 40000 + i % 1000, 5000 + i % 7, 12, 0) + b'abcd'
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 32, 0, 0, 64, 17, 0, src, dstb)
    ip = ip[:10] + struct.pack('!H', cs(ip)) + ip[12:]
    s.send(dmac + b'\x02\x00\x00\x00\x00\x02' + b'\x08\x00' + ip + udp)
"""
    lab.run(sys.executable, "-c", script, lab.peer_interface, str(base), str(count), lab.root_v4, dmac.hex(), timeout=300)


def collector_round_cost(s, interface: str) -> tuple[float, float, float]:
    """(process CPU s, peak RSS MB, in-round CPU s recorded in the DB) of one `collect` process."""
    code = ("import resource, sys; from app.cli import main; rc = main(['collect', '--interface', %r, '--round-seconds', "
            "'0.01', '--no-sniffer', '--no-scanner', '--db', %r, '-q']); r = resource.getrusage(resource.RUSAGE_SELF); "
            "print(r.ru_utime + r.ru_stime, r.ru_maxrss)" % (interface, s.general.db))
    env = dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_STATE_DIR=s.general.state_dir,
               PORTWATCH_PIN_ROOT=s.general.pin_root, PORTWATCH_RUN_DIR=s.general.run_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-500:])
    cpu, rss = out.stdout.split()[-2:]
    import sqlite3
    conn = sqlite3.connect(s.general.db)
    in_round = conn.execute("SELECT cpu_seconds FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0]
    conn.close()
    return float(cpu), int(rss) / 1024, in_round


def main() -> int:
    if os.geteuid() != 0:
        print("bench/collector.py needs root (XDP, namespaces)", file=sys.stderr)
        return 3
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-"))
    s = settings_for(tmp)
    checks = Plausibility("bench/collector.py")
    lab = Lab(prefix=os.environ.get("PW_BENCH_PREFIX", "pwbc")[:6], subnet=int(os.environ.get("PW_BENCH_SUBNET", "9")))
    try:
        lab.create()
        # fill_sources forges sources in 198.18.128.0/17: whatever this host answers them (ICMP) must
        # go back into the lab, never out of the default route (the route goes with the link)
        subprocess.run(["ip", "route", "replace", FILL_NET, "dev", lab.interface], check=True)
        collector_mod.run_collection(s, lab.interface, 0, 1, with_threads=False)

        print(f"\n== XDP program cost per packet (BPF_PROG_TEST_RUN, {'20k repeats, 1 run' if SMOKE else '200k repeats, median of 3'}) ==")
        print(f"{'frame':<16} {'ns/packet':>10} {'target 200 ns / measured':>26}")
        for name, ns, ratio in measure_prog_cost(lab, s):
            print(f"{name:<16} {ns:>10.1f} {ratio:>25.2f}x")
            checks.program_cost(f"portwatch's XDP program on a {name} frame", ns)

        if os.environ.get("PW_BENCH_ONLY") == "cost":
            return checks.exit_code()
        n, trials = (50000, 1) if SMOKE else (300000, 5)
        print(f"\n== veth throughput: portwatch's XDP, a bare XDP_PASS program, no program ({n // 1000}k frames, "
              f"AF_PACKET sender, median of {trials}, interleaved) ==")
        print(f"{'mode':<9} {'portwatch pkt/s':>16} {'XDP_PASS pkt/s':>15} {'none pkt/s':>12} {'pw/none':>8} "
              f"{'pw/XDP_PASS':>12}   target pw/none >= 0.9")
        for mode in ("native", "generic"):
            s.collector.xdp_mode = mode
            detach_xdp(lab.interface)
            w_runs, bare_runs, wo_runs = measure_veth(lab, s, n, trials)
            w, bare, wo = (statistics.median(r) for r in (w_runs, bare_runs, wo_runs))
            print(f"{mode:<9} {w:>16,.0f} {bare:>15,.0f} {wo:>12,.0f} {w / wo:>8.3f} {w / bare:>12.3f}")
            checks.not_faster(f"{mode}: portwatch's program", w_runs, bare_runs, "a bare XDP_PASS program")
            checks.not_faster(f"{mode}: a bare XDP_PASS program", bare_runs, wo_runs, "no program at all")
        if os.environ.get("PW_BENCH_ONLY") == "veth":
            return checks.exit_code()

        print("\n== collector round (no sniffer/scanner) by map entries: whole collector process ==")
        print("   (sources/srcports/flows each hold `entries` keys; `active` of them changed in the measured round)")
        print(f"{'entries':>8} {'active':>7} {'CPU s':>7} {'peak RSS MB':>12} {'CPU target 0.5/x':>17} {'RSS target 60/x':>16}")
        for target in (1000,) if SMOKE else (1000, 10000, 50000):
            fill_sources(lab, target)                      # new sources + srcports + flows
            collector_round_cost(s, lab.interface)         # snapshot after the fill
            for active in (target // 20, target):
                fill_sources(lab, active)
                cpu, rss, in_round = collector_round_cost(s, lab.interface)
                print(f"{target:>8} {active:>7} {cpu:>7.3f} {rss:>12.1f} {0.5 / cpu:>16.2f}x {60 / rss:>15.2f}x")
                checks.expect(0 < in_round <= cpu * 1.05 + 0.01,
                              f"a round at {target:,} entries recorded {in_round:.3f} CPU s, its whole process "
                              f"{cpu:.3f} s")
                checks.expect(10 < rss < 2048, f"the collector's peak RSS at {target:,} entries is {rss:,.1f} MB")
    finally:
        lab.destroy()
        import shutil
        shutil.rmtree(s.general.pin_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
