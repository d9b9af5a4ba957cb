"""Blocklist benchmarks, measured side by side in one run, printed as ratio tables.

1. Packets per second the RECEIVING side disposes of from a blocked source on the same lab veth
   end, by filter: portwatch's XDP blacklist (LPM trie, 1,000 entries), no filter (portwatch's
   program passes, the stack answers a closed UDP port), a bare stack (a 2-instruction XDP_PASS
   program), an nftables set of 1,000 addresses (inet input hook, and netdev ingress hook), and an
   iptables list of 1,000 rules (the source matches the last one). Targets: XDP >= 1.7x no filter
   and >= 2x iptables.
2. XDP drop cost with 10, 100, 1,000 and 10,000 other prefixes in the blacklist (target: flat).
3. The drop cost of EACH entry: 64 random IPv4 and IPv6 addresses blocked both ways (XDP blacklist and TC
   eg_block), one frame from (to) each, beside the pass path (UDP, TCP SYN, TCP ACK): every drop a few
   tens of ns and never slower than a pass (an entry whose counters an atomic add could not reach
   aligned cost thousands). ``--entries`` runs this table alone.

Fails (exit 1, one sentence each) when a figure cannot be right: a blocked frame dearer than a
passed one, a filter whose counter missed the frames it dropped, a drop cost that grows with the
blacklist's size or differs between the two tables, a per-packet program cost in microseconds.
--smoke: portwatch's drop and pass paths and the bare XDP_PASS program only (no netfilter), one short
trial, sizes 10 and 1,000.

How: frames are injected in the kernel by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES and
``ingress_ifindex`` = the lab interface, so each frame runs the XDP program and, on XDP_PASS, the
real receive path of the root namespace (netfilter, IP, UDP) exactly as a frame arriving on that
veth would. The kernel times the whole batch loop: ns/packet is receive-side CPU per packet on one
CPU, with no sender and no veth transfer cost in it (a Python sender could not outrun any of these
paths). Table 2 uses plain ``bpftool prog run`` (the program alone) beside the live figure.

Runs as root; the frames go from lab host 198.18.<n>.2 to 198.18.<n>.1 only (n: PW_BENCH_SUBNET,
default 240; the lab's names start with PW_BENCH_PREFIX, default pwbb). Cleans up its lab,
pins and the nft tables / iptables chain named portwatch_bench even on failure.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.services.kernel import enforcement  # noqa: E402
from app.services.kernel import bpf_structs, maps  # noqa: E402
from app.threads import collection as collector_mod  # noqa: E402
from app.lab import Lab  # noqa: E402
from app.services.kernel import egress  # noqa: E402
from app.services.kernel.prog_run import BpfTestRunOpts  # noqa: E402  (struct bpf_test_run_opts, mirrored once)
from bench.collector import (mac_bytes, pass_program, prog_run_ns, settings_for, tcp_syn_frame, udp6_frame,  # noqa: E402
                             udp_frame)
from bench.plausible import Plausibility, smoke  # noqa: E402

BENCH = "portwatch_bench"
RULES = 1000
TRIALS = 1 if smoke() else 5
SIZES = (10, 1000) if smoke() else (10, 100, 1000, 10_000)
TRIAL_SECONDS = 0.05 if smoke() else 0.25   # each measured run is sized to about this long
PROG_RUN_REPEAT = 100_000 if smoke() else 1_000_000
MIN_REPEAT, MAX_REPEAT = 20_000, 2_000_000
DPORT = 9                                # nothing listens there: the stack's "no socket" path
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


class XdpMd(ctypes.Structure):           # struct xdp_md (uapi/linux/bpf.h)
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


def libbpf() -> ctypes.CDLL:
    lib = maps.libbpf()
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return lib


def live_run_ns(prog_fd: int, frame: bytes, ifindex: int, repeat: int) -> float:
    """Average ns per frame for ``repeat`` live frames injected at ``ifindex`` through the program."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    ctx = XdpMd(0, len(frame), 0, ifindex, 0, 0)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), data_in=ctypes.addressof(buf), data_size_in=len(frame),
                          ctx_in=ctypes.addressof(ctx), ctx_size_in=ctypes.sizeof(ctx), repeat=repeat,
                          flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc < 0:
        code = -rc if rc < -1 else ctypes.get_errno()
        raise OSError(code, f"BPF_PROG_TEST_RUN (live frames) failed: {os.strerror(code)}")
    return float(opts.duration)


def sized_run(prog_fd: int, frame: bytes, ifindex: int) -> tuple[float, int]:
    """(ns/packet, frames injected in all) of one run sized to about TRIAL_SECONDS (bounded repeat),
    after a MIN_REPEAT probe."""
    probe = live_run_ns(prog_fd, frame, ifindex, MIN_REPEAT)
    repeat = int(min(MAX_REPEAT, max(MIN_REPEAT, TRIAL_SECONDS / max(probe, 1.0) * 1e9)))
    return live_run_ns(prog_fd, frame, ifindex, repeat), MIN_REPEAT + repeat


def sh(*cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[:500]}")
    return out


def other_ipv4(i: int) -> str:
    """The i-th of the other (never sending) addresses: 198.19.0.0/16, inside the test range."""
    return f"198.19.{(i >> 8) & 0xFF}.{i & 0xFF}"


# --- netfilter set-ups (all named portwatch_bench) --------------------------------------------------

def cleanup_netfilter(interface: str, drop_filter_table: bool = False) -> None:
    """Remove everything named portwatch_bench; ``drop_filter_table``: also the empty iptables-nft
    ``ip filter`` table that our first iptables call created (only when it did not exist before)."""
    sh("nft", "delete", "table", "inet", BENCH, check=False)
    sh("nft", "delete", "table", "netdev", BENCH, check=False)
    while sh("iptables", "-D", "INPUT", "-i", interface, "-j", BENCH, check=False).returncode == 0:
        pass
    sh("iptables", "-F", BENCH, check=False)
    sh("iptables", "-X", BENCH, check=False)
    if drop_filter_table:
        listing = sh("nft", "list", "table", "ip", "filter", check=False).stdout
        if listing and not any(line.strip() and not line.strip().startswith(("table", "chain", "type", "}"))
                               for line in listing.splitlines()):
            sh("nft", "delete", "table", "ip", "filter", check=False)


def prepare_netfilter(interface: str, blocked: str) -> None:
    """Sets and the rule list, not yet hooked: each is hooked only while it is measured."""
    members = [other_ipv4(i) for i in range(RULES - 1)] + [blocked]
    elements = ", ".join(members)
    for family in ("inet", "netdev"):
        sh("nft", "-f", "-", stdin=f"table {family} {BENCH} {{\n  set blocked {{\n    type ipv4_addr\n"
                                  f"    elements = {{ {elements} }}\n  }}\n}}\n")
    rules = "\n".join(f"-A {BENCH} -s {m}/32 -j DROP" for m in members)
    sh("iptables-restore", "--noflush", stdin=f"*filter\n:{BENCH} - [0:0]\n{rules}\nCOMMIT\n")


def nft_chain(kind: str, interface: str) -> tuple[str, str, str]:
    """(family, chain, base-chain spec + match prefix) of an nft measurement kind."""
    if kind == "nft-input":
        return "inet", "input", f'type filter hook input priority 0\n    iifname "{interface}"'
    return "netdev", "ingress", f'type filter hook ingress device "{interface}" priority 0\n   '


def hook(kind: str, interface: str, on: bool) -> None:
    """Hook (on) or unhook one prepared filter: nft base chains come and go, iptables gets its jump."""
    if kind == "iptables":
        sh("iptables", "-I" if on else "-D", "INPUT", "-i", interface, "-j", BENCH)
        return
    family, chain, spec = nft_chain(kind, interface)
    if on:
        sh("nft", "-f", "-", stdin=f"table {family} {BENCH} {{\n  chain {chain} {{\n    {spec} ip saddr @blocked "
                                  "counter drop\n  }\n}\n")
    else:
        sh("nft", "delete", "chain", family, BENCH, chain)


def iptables_last_rule_packets() -> int:
    out = sh("iptables", "-nvxL", BENCH).stdout.strip().splitlines()
    return int(out[-1].split()[0])


# --- the measurements -------------------------------------------------------------------------------

def measure_filters(lab: Lab, pdir: Path, blocked: str) -> list[tuple[str, float, str, int | None, int]]:
    """[(filter, median ns/packet, check, frames its counter saw in the last run or None, frames
    injected in that run)] for a blocked source's frames, interleaved trials."""
    ifindex = int(Path(f"/sys/class/net/{lab.interface}/ifindex").read_text())
    dmac = mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())
    frame = udp_frame(blocked, lab.root_v4, 40000, DPORT, 18, dmac, b"\x02\x00\x00\x00\x00\x02")
    key = bpf_structs.lpm_key(enforcement.parse_network(blocked))
    zero = bytes(bpf_structs.PwBlacklistValue())
    lib = libbpf()
    prog_fd = lib.bpf_obj_get(str(pdir / "prog").encode())
    bare_fd = pass_program()
    bl = maps.PinnedMap(pdir / "blacklist")
    backend = "nf_tables" if "nf_tables" in sh("iptables", "-V").stdout else "legacy"
    conditions = [
        ("XDP blacklist (LPM trie, 1,000 entries)", "xdp", prog_fd),
        ("no filter (portwatch XDP passes)", "none", prog_fd),
        ("no filter, bare stack (XDP_PASS only)", "none", bare_fd),
        (f"nftables set of {RULES:,}, inet input", "nft-input", prog_fd),
        (f"nftables set of {RULES:,}, netdev ingress", "nft-ingress", prog_fd),
        (f"iptables ({backend}), {RULES:,} rules", "iptables", prog_fd),
    ][:3 if smoke() else None]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in conditions}
    checks: dict[str, tuple[str, int | None, int]] = {}
    try:
        for i in range(RULES - 1):               # 999 other entries + the blocked one
            bl.update(bpf_structs.lpm_key(enforcement.parse_network(other_ipv4(i))), zero)
        for _ in range(TRIALS):
            for name, kind, fd in conditions:
                if kind == "xdp":
                    bl.update(key, zero)
                elif kind != "none":
                    hook(kind, lab.interface, True)
                injected = 0
                try:
                    ns, injected = sized_run(fd, frame, ifindex)
                    runs[name].append(ns)
                finally:
                    if kind == "xdp":
                        raw = bl.lookup(key)
                        dropped = bpf_structs.PwBlacklistValue.from_buffer_copy(
                            raw[:ctypes.sizeof(bpf_structs.PwBlacklistValue)]).drops if raw else 0
                        checks[name] = (f"last run: map drop counter {dropped:,} of {injected:,} injected",
                                        dropped, injected)
                        bl.delete(key)
                    elif kind == "iptables":
                        matched = iptables_last_rule_packets()
                        checks[name] = (f"last run: last rule matched {matched:,}", matched, injected)
                        hook(kind, lab.interface, False)
                        sh("iptables", "-Z", BENCH)
                    elif kind.startswith("nft"):
                        family, chain, _ = nft_chain(kind, lab.interface)
                        listing = sh("nft", "list", "chain", family, BENCH, chain).stdout
                        matched = int(listing.split("counter packets ")[1].split()[0])
                        checks[name] = (f"last run: rule counter {matched:,}", matched, injected)
                        hook(kind, lab.interface, False)
    finally:
        bl.close()
        os.close(prog_fd)
        os.close(bare_fd)
    return [(name, statistics.median(runs[name]), *checks.get(name, ("stack: UDP to a closed port", None, 0)))
            for name, _, _ in conditions]


def measure_sizes(lab: Lab, pdir: Path, blocked: str) -> tuple[list[tuple[int, float, float]], float]:
    """([(entries, bpftool ns/packet, live ns/packet)] of a blocked frame with growing blacklists,
    bpftool ns/packet of a frame the program passes (another source, the program alone))."""
    ifindex = int(Path(f"/sys/class/net/{lab.interface}/ifindex").read_text())
    dmac = mac_bytes(Path(f"/sys/class/net/{lab.interface}/address").read_text().strip())
    frame = udp_frame(blocked, lab.root_v4, 40000, DPORT, 18, dmac, b"\x02\x00\x00\x00\x00\x02")
    passed = udp_frame(lab.host_v4(1), lab.root_v4, 40000, DPORT, 18, dmac, b"\x02\x00\x00\x00\x00\x02")
    rng = random.Random(4)
    zero = bytes(bpf_structs.PwBlacklistValue())
    prog_fd = libbpf().bpf_obj_get(str(pdir / "prog").encode())
    rows = []
    with maps.PinnedMap(pdir / "blacklist") as bl:
        for key, _ in _keys(bl):
            bl.delete(key)
        bl.update(bpf_structs.lpm_key(enforcement.parse_network(blocked)), zero)
        have = 1
        try:
            sized_run(prog_fd, frame, ifindex)       # warm-up, not counted (caches, CPU frequency)
            pass_plain = min(prog_run_ns(pdir / "prog", passed, PROG_RUN_REPEAT) for _ in range(TRIALS))
            for size in SIZES:
                while have < size:                   # other prefixes: IPv4 /32 and /24, IPv6 /64 and /128
                    kind = rng.random()
                    if kind < 0.6:
                        text = f"198.19.{rng.randrange(256)}.{rng.randrange(256)}"
                    elif kind < 0.8:
                        text = f"198.19.{rng.randrange(256)}.0/24"
                    elif kind < 0.9:
                        text = f"2001:db8:{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}::/64"
                    else:
                        text = f"2001:db8:ff::{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}"
                    key = bpf_structs.lpm_key(enforcement.parse_network(text))
                    if text.split("/")[0] == blocked or bl.lookup(key) is not None:
                        continue
                    bl.update(key, zero)
                    have += 1
                # best of TRIALS: the least disturbed run (other processes share these 2 CPUs)
                plain = min(prog_run_ns(pdir / "prog", frame, PROG_RUN_REPEAT) for _ in range(TRIALS))
                live = min(sized_run(prog_fd, frame, ifindex)[0] for _ in range(TRIALS))
                rows.append((bl.count(), plain, live))
        finally:
            os.close(prog_fd)
    return rows, pass_plain


ENTRY_REPEAT = 100_000


def _frame(src: str, dst: str, kind: str) -> bytes:
    dmac, smac = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    if ":" in src:
        return udp6_frame(src, dst, DPORT, dmac, smac)
    if kind == "udp":
        return udp_frame(src, dst, 40000, DPORT, 18, dmac, smac)
    return tcp_syn_frame(src, dst, 22, dmac, smac, 0x02 if kind == "syn" else 0x10)


def measure_entries(lab: Lab, s, pdir: Path, n: int = 64) -> tuple[dict, dict]:
    """({path: (XDP ns, TC ns)} of the pass path, {address: (XDP drop ns, TC drop ns)}) with ``n`` random
    addresses (half IPv4 in 198.19.0.0/16, half IPv6 in 2001:db8:ff00::/40) in both LPM tries."""
    rng = random.Random(64)
    v4 = [f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(n // 2)]
    v6 = [f"2001:db8:ff{rng.randrange(256):02x}:{rng.randrange(1 << 16):x}::{rng.randrange(1 << 16):x}"
          for _ in range(n // 2)]
    s.blocklist.egress_block_enabled = True
    with maps.PinnedMap(pdir / "blacklist") as bl, maps.PinnedMap(pdir / enforcement.EGRESS_MAP) as eg_block:
        for text in v4 + v6:
            enforcement.write_entry(bl, enforcement.parse_network(text))
            enforcement.write_entry(eg_block, enforcement.parse_network(text))
    xdp, tc = pdir / "prog", pdir / egress.PROG_PIN

    def best(pin, frame):
        return min(prog_run_ns(pin, frame, ENTRY_REPEAT) for _ in range(3))
    peer, local = lab.host_v4(1), lab.root_v4
    passing = {kind: (best(xdp, _frame(peer, local, kind)), best(tc, _frame(local, peer, kind)))
               for kind in ("udp", "syn", "ack")}
    drops = {}
    for text in v4 + v6:
        here = lab.root_v6 if ":" in text else local
        drops[text] = (best(xdp, _frame(text, here, "udp")), best(tc, _frame(here, text, "udp")))
    return passing, drops


def print_entries(passing: dict, drops: dict) -> None:
    print(f"\n== the drop cost of each entry: {len(drops)} random IPv4/IPv6 addresses blocked both ways "
          f"(bpftool prog run, best of 3 x {ENTRY_REPEAT:,}) ==")
    print(f"{'path':<34} {'XDP ns':>8} {'TC ns':>8}")
    names = {"udp": "pass: IPv4 UDP 64 B", "syn": "pass: IPv4 TCP SYN", "ack": "pass: IPv4 TCP ACK"}
    for kind, (x, t) in passing.items():
        print(f"{names[kind]:<34} {x:>8.0f} {t:>8.0f}")
    xs, ts = sorted(v[0] for v in drops.values()), sorted(v[1] for v in drops.values())
    for label, i in (("drop: fastest entry", 0), ("drop: median entry", len(xs) // 2), ("drop: slowest entry", -1)):
        print(f"{label:<34} {xs[i]:>8.0f} {ts[i]:>8.0f}")
    px, pt = min(v[0] for v in passing.values()), min(v[1] for v in passing.values())
    print(f"{'slowest drop / cheapest pass':<34} {xs[-1] / px:>7.2f}x {ts[-1] / pt:>7.2f}x   target: <= 1.0x")
    print(f"{'entries over 1 us':<34} {sum(x > 1000 for x in xs):>8} {sum(t > 1000 for t in ts):>8}   target: 0")


def _keys(bl: maps.PinnedMap):
    keys, _, n = bl.items()
    ks = bl.info.key_size
    return [(keys[i * ks:(i + 1) * ks], None) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    only_entries = "--entries" in (sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/blocklist.py needs root (XDP, namespaces, netfilter)", file=sys.stderr)
        return 3
    tmp = Path(tempfile.mkdtemp(prefix="pwbench-bl-"))
    lab = Lab(prefix=os.environ.get("PW_BENCH_PREFIX", "pwbb")[:6], subnet=int(os.environ.get("PW_BENCH_SUBNET", "240")))
    pin_root = Path(f"/sys/fs/bpf/{BENCH}-{os.getpid()}")
    had_filter_table = sh("nft", "list", "table", "ip", "filter", check=False).returncode == 0
    try:
        lab.create()
        cleanup_netfilter(lab.interface)
        s = settings_for(tmp)
        s.general.pin_root = str(pin_root)
        collector_mod.run_collection(s, lab.interface, 0.1, 1, with_threads=False)   # compile, attach, pin
        pdir = pin_root / lab.interface
        blocked = lab.host_v4(0)
        t0 = time.monotonic()
        if not only_entries:
            if not smoke():
                prepare_netfilter(lab.interface, blocked)
            filters = measure_filters(lab, pdir, blocked)
            sizes, pass_plain = measure_sizes(lab, pdir, blocked)
        entries = measure_entries(lab, s, pdir)
        elapsed = time.monotonic() - t0
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            print(f"this kernel cannot inject live frames (BPF_F_TEST_XDP_LIVE_FRAMES, Linux >= 5.18): {exc}",
                  file=sys.stderr)
            return 5
        raise
    finally:
        cleanup_netfilter(lab.interface, drop_filter_table=not had_filter_table)
        lab.destroy()
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print_entries(*entries)
    if only_entries:
        print(f"measured in {elapsed:.1f} s")
        return 0
    xdp_ns = filters[0][1]
    print(f"\n== frames from one blocked source disposed of by the receiving side ({lab.interface}, one CPU) ==")
    print("   BPF_PROG_TEST_RUN live frames injected at the veth's ingress; UDP 64 B frames to a closed port;")
    print(f"   median of {TRIALS} interleaved runs of ~{TRIAL_SECONDS} s; ratio = XDP blacklist rate / row rate")
    print(f"{'filter':<44} {'ns/packet':>10} {'packets/s':>13} {'XDP is':>8}  {'target':<8} check")
    targets = {1: ">= 1.7x", 5: ">= 2x"}
    for i, (name, ns, check, _, _) in enumerate(filters):
        ratio = ns / xdp_ns
        print(f"{name:<44} {ns:>10.0f} {1e9 / ns:>13,.0f} {ratio:>7.2f}x  {targets.get(i, ''):<8} {check}")
    print(f"\n== XDP drop cost by blacklist size (the blocked source's frame; best of {TRIALS}) ==")
    print(f"{'entries':>8} {'prog run ns':>12} {'vs 10':>7} {'live ns':>9} {'vs 10':>7}   target: flat (~1.0x)")
    plain0, live0 = sizes[0][1], sizes[0][2]
    for entries, plain, live in sizes:
        print(f"{entries:>8,} {plain:>12.0f} {plain / plain0:>6.2f}x {live:>9.0f} {live / live0:>6.2f}x")
    print(f"{'passed':>8} {pass_plain:>12.0f} {pass_plain / plain0:>6.2f}x   (a frame from a source not blocked)")
    print(f"\n'prog run ns' = `bpftool prog run` (the program alone, {PROG_RUN_REPEAT:,} repeats); 'live ns' also recycles each "
          f"dropped frame as a real receive would.\nmeasured in {elapsed:.1f} s")
    return plausible(filters, sizes, pass_plain).exit_code()


def plausible(filters: list[tuple], sizes: list[tuple[int, float, float]], pass_plain: float) -> Plausibility:
    """What the tables must show if they are true (filters: measure_filters' rows, the XDP blacklist
    first, then portwatch passing, then the bare XDP_PASS program; sizes: measure_sizes' rows;
    pass_plain: the program alone on a frame it passes)."""
    checks = Plausibility("bench/blocklist.py")
    (_, drop_ns, _, dropped, injected), (_, pass_ns, *_), (_, bare_ns, *_) = filters[:3]
    checks.expect(drop_ns < pass_ns, f"a blocked source's frame costs {drop_ns:,.0f} ns in portwatch's XDP drop "
                                     f"path, not less than the {pass_ns:,.0f} ns of a frame it passes to the stack")
    checks.expect(pass_ns > 0.5 * bare_ns, f"a frame portwatch passes costs {pass_ns:,.0f} ns, under half the "
                                           f"{bare_ns:,.0f} ns of a bare XDP_PASS program in front of the same stack")
    for name, _, _, counted, sent in filters:
        if counted is not None:
            checks.expect(counted == sent, f"{name}: its counter saw {counted:,} of the {sent:,} frames injected "
                                           "in the last run (each one is dropped there exactly once)")
    checks.program_cost("the XDP program passing a frame (bpftool prog run)", pass_plain)
    for entries, plain, live in sizes:
        checks.program_cost(f"the XDP drop with {entries:,} blacklist entries (bpftool prog run)", plain)
        # the drop path is the lookup and one counter; the pass path is the same lookup and every counter
        checks.expect(plain < 1.5 * pass_plain + 20, f"the program alone drops a blocked frame in {plain:,.0f} ns "
                                                     f"({entries:,} entries) but passes another in {pass_plain:,.0f} ns: "
                                                     "the drop path is the dearer one")
    (first, _, live0), (last, _, live_n) = sizes[0], sizes[-1]
    same = [live for entries, _, live in sizes if entries == RULES]
    if same:
        low, high = sorted((same[0], drop_ns))
        checks.expect(high < 3 * low, f"the same drop ({RULES:,} entries, live frames) measured {drop_ns:,.0f} ns "
                                      f"in the filters table and {same[0]:,.0f} ns in the sizes table")
    checks.expect(live_n < 3 * live0, f"the drop costs {live_n:,.0f} ns with {last:,} entries against "
                                      f"{live0:,.0f} ns with {first:,}: an LPM trie lookup does not grow like that")
    return checks


if __name__ == "__main__":
    sys.exit(main())
