"""A network lab of test hosts in network namespaces (:class:`Lab`: the layout), and bounded test
traffic to send into it (``python -m app.lab send``). Used by the test suite, the benches and `make demo`
(in app/ only app/demo.py imports it); it imports app/services/kernel/ only to run a program on frames.

Only 198.18.0.0/15 and 2001:db8::/32 (documentation) addresses are used, and only between the lab's
own hosts.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _ns(ns: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True, **kw)


@dataclass
class Lab:
    """Root namespace + one peer namespace joined by a veth pair. Use as a context manager.

    Layout (one veth pair per peer namespace)::

        root namespace                          namespace <prefix>-a
        <prefix>r0  198.18.<n>.1/24  <── veth ──>  <prefix>p0  198.18.<n>.2/24 (+ extra hosts .3, .4, ...)
                    2001:db8:18:<n>::1/64                     2001:db8:18:<n>::2/64 (+ ::3, ...)

    XDP is attached in the ROOT namespace on the root-side end (``interface``): `ip netns exec`
    gives its command a private /sys mount, so pins made inside a namespace vanish when it exits.
    Traffic is sent from the peer namespace. Neighbour entries are static and DAD is off, so no
    ARP/NDP chatter pollutes exact counts of IPv4/IPv6 test traffic (ARP still counts as non-IP frames).
    """

    prefix: str = "pwl"
    subnet: int = 0                       # third octet of 198.18.<subnet>.0/24
    extra_hosts: int = 3                  # extra addresses on the peer: .3, .4, ...
    namespace: str = field(init=False)
    interface: str = field(init=False)    # root side: where XDP goes
    peer_interface: str = field(init=False)
    created: bool = field(default=False, init=False)

    def __post_init__(self):
        if len(self.prefix) > 10:
            raise ValueError("lab prefix must be at most 10 characters (interface names are limited to 15)")
        self.namespace = f"{self.prefix}-a"
        self.interface = f"{self.prefix}r0"
        self.peer_interface = f"{self.prefix}p0"

    # addresses ---------------------------------------------------------------
    @property
    def root_v4(self) -> str:
        return f"198.18.{self.subnet}.1"

    @property
    def peer_v4(self) -> str:
        return f"198.18.{self.subnet}.2"

    @property
    def root_v6(self) -> str:
        return f"2001:db8:18:{self.subnet}::1"

    @property
    def peer_v6(self) -> str:
        return f"2001:db8:18:{self.subnet}::2"

    def host_v4(self, i: int) -> str:
        """Address of peer host i (0 = the peer's main address)."""
        return f"198.18.{self.subnet}.{2 + i}"

    def host_v6(self, i: int) -> str:
        return f"2001:db8:18:{self.subnet}::{2 + i:x}"

    # lifetime ------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        self.destroy()  # leftovers of an earlier crashed run with the same prefix
        self.created = True
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.interface, "type", "veth", "peer", "name", self.peer_interface)
        _ip("link", "set", self.peer_interface, "netns", self.namespace)
        for sysctl in ("net.ipv6.conf.{}.accept_dad=0", "net.ipv6.conf.{}.router_solicitations=0",
                       "net.ipv6.conf.{}.accept_ra=0"):
            subprocess.run(["sysctl", "-qw", sysctl.format(self.interface)], capture_output=True)
            _ns(self.namespace, "sysctl", "-qw", sysctl.format(self.peer_interface), check=False)
            _ns(self.namespace, "sysctl", "-qw", sysctl.format("default"), check=False)
        _ip("addr", "add", f"{self.root_v4}/24", "dev", self.interface)
        _ip("-6", "addr", "add", f"{self.root_v6}/64", "dev", self.interface, "nodad")
        _ns(self.namespace, "ip", "link", "set", "lo", "up")
        for i in range(self.extra_hosts + 1):
            _ns(self.namespace, "ip", "addr", "add", f"{self.host_v4(i)}/24", "dev", self.peer_interface)
            _ns(self.namespace, "ip", "-6", "addr", "add", f"{self.host_v6(i)}/64", "dev", self.peer_interface, "nodad")
        _ip("link", "set", self.interface, "up")
        _ns(self.namespace, "ip", "link", "set", self.peer_interface, "up")
        root_mac = _mac(self.interface)
        peer_mac = _mac(self.peer_interface, self.namespace)
        for i in range(self.extra_hosts + 1):
            _ip("neigh", "replace", self.host_v4(i), "lladdr", peer_mac, "dev", self.interface, "nud", "permanent")
            _ip("-6", "neigh", "replace", self.host_v6(i), "lladdr", peer_mac, "dev", self.interface, "nud", "permanent")
        _ns(self.namespace, "ip", "neigh", "replace", self.root_v4, "lladdr", root_mac, "dev", self.peer_interface, "nud", "permanent")
        _ns(self.namespace, "ip", "-6", "neigh", "replace", self.root_v6, "lladdr", root_mac, "dev", self.peer_interface, "nud", "permanent")
        # let link-local addresses, MLD reports and the like settle before exact counting starts
        time.sleep(0.3)

    def destroy(self) -> None:
        """Remove XDP, the veth pair and the namespace; safe to call twice or on a half-made lab."""
        _ip("link", "set", "dev", self.interface, "xdpgeneric", "off", check=False)
        _ip("link", "set", "dev", self.interface, "xdp", "off", check=False)
        _ip("link", "del", self.interface, check=False)
        _ip("netns", "del", self.namespace, check=False)
        self.created = False

    # running things in the peer namespace ----------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return _ns(self.namespace, *cmd, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, *cmd], **kw)

    def send(self, *args: str, timeout: float = 60) -> str:
        """Run the traffic sender (``python -m app.lab send ...``) in the peer namespace."""
        proc = self.run(sys.executable, "-m", "app.lab", "send", *args, timeout=timeout)
        return proc.stdout


def prog_run(prog_pin, frame: bytes, repeat: int) -> tuple[int, float]:
    """Run ``frame`` ``repeat`` times through the pinned program at ``prog_pin`` with
    BPF_PROG_TEST_RUN (`bpftool prog run`): (its return code, e.g. XDP_DROP = 1, and ns per run as
    the kernel timed the loop)."""
    import json
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".bin") as fh:
        fh.write(frame)
        fh.flush()
        out = subprocess.run(["bpftool", "-j", "prog", "run", "pinned", str(prog_pin), "data_in", fh.name,
                              "repeat", str(repeat)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bpftool prog run failed: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    return int(result["retval"]), float(result["duration"])


def run_frames(prog_pin, frames) -> dict[int, int]:
    """Run each frame of ``frames`` (an iterable of bytes) once through the pinned program at
    ``prog_pin`` with BPF_PROG_TEST_RUN, in this process (one syscall per frame: ~250,000 frames in
    a few seconds, nothing on any wire). Returns {return code: frames}."""
    from app.services.kernel import maps
    from app.services.kernel.prog_run import BpfTestRunOpts
    lib = maps.libbpf()
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fd = lib.bpf_obj_get(str(prog_pin).encode())
    if fd < 0:
        raise OSError(-fd, f"cannot open the pinned program {prog_pin}")
    seen: dict[int, int] = {}
    try:
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), repeat=1)
        buf = ctypes.create_string_buffer(2048)          # one buffer, each frame copied in
        opts.data_in = ctypes.addressof(buf)
        run, ref = lib.bpf_prog_test_run_opts, ctypes.byref(opts)
        for frame in frames:
            if len(frame) > len(buf):
                raise ValueError(f"a frame of {len(frame)} bytes: run_frames takes at most {len(buf)}")
            ctypes.memmove(buf, frame, len(frame))
            opts.data_size_in = len(frame)
            rc = run(fd, ref)
            if rc < 0:
                raise OSError(-rc, f"BPF_PROG_TEST_RUN failed: {os.strerror(-rc)}")
            seen[opts.retval] = seen.get(opts.retval, 0) + 1
    finally:
        os.close(fd)
    return seen


def _mac(ifname: str, ns: str | None = None) -> str:
    cmd = ["cat", f"/sys/class/net/{ifname}/address"]
    out = _ns(ns, *cmd) if ns else subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------
# traffic sender: runs inside a namespace. Bounded in count (--count, at most 1,000,000) and
# in time (--max-seconds). Refuses any destination outside the test ranges.
# ------------------------------------------------------------------------------------------
TEST_NETS = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]
MAX_COUNT = 1_000_000


def check_test_address(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    if not any(ip in net for net in TEST_NETS):
        raise SystemExit(f"refusing to send to {addr}: only 198.18.0.0/15 and 2001:db8::/32 lab hosts are allowed")
    return addr


def send_udp(src: str, dst: str, ports: list[int], count: int, payload: int, max_seconds: float) -> int:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((src, 0))
    data = b"x" * payload
    sent = 0
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        for port in ports:
            sock.sendto(data, (dst, port))
            sent += 1
        if time.monotonic() > deadline:
            break
    sock.close()
    return sent


def send_scapy(kind: str, src: str, dst: str, ports: list[int], count: int, payload: int,
               iface: str, max_seconds: float) -> int:
    """Crafted frames with scapy: 'syn', 'synack', 'bad-ihl', 'truncated-tcp', 'truncated-ip',
    'fragment', 'vlan', 'qinq', 'ipv6-ext'. Each frame is sent once per port per count."""
    import logging as _logging
    _logging.getLogger("scapy.runtime").setLevel(_logging.ERROR)
    from scapy.all import Dot1Q, Ether, IP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Raw, TCP, UDP, conf, get_if_hwaddr  # noqa
    conf.verb = 0
    dst_mac = _peer_mac_for(iface)
    src_mac = get_if_hwaddr(iface)
    v6 = ":" in dst
    frames = []
    for port in ports:
        l3 = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
        body = Raw(b"y" * payload) if payload else Raw(b"")
        if kind == "syn":
            pkt = Ether(src=src_mac, dst=dst_mac) / l3 / TCP(sport=40000, dport=port, flags="S") / body
        elif kind == "synack":
            pkt = Ether(src=src_mac, dst=dst_mac) / l3 / TCP(sport=port, dport=40000, flags="SA") / body
        elif kind == "bad-ihl":
            raw = bytes(IP(src=src, dst=dst) / UDP(sport=40000, dport=port) / body)
            raw = bytes([0x43]) + raw[1:]          # IHL 3 (< 5): malformed
            pkt = Ether(src=src_mac, dst=dst_mac, type=0x0800) / Raw(raw)
        elif kind == "truncated-tcp":
            raw = bytes(IP(src=src, dst=dst, proto=6) / Raw(b"\x00" * 8))  # 8 of 20 TCP header bytes
            pkt = Ether(src=src_mac, dst=dst_mac, type=0x0800) / Raw(raw)
        elif kind == "truncated-ip":
            pkt = Ether(src=src_mac, dst=dst_mac, type=0x0800) / Raw(b"\x45\x00\x00")
        elif kind == "fragment":
            # a non-first fragment: counted under its protocol with port 0
            pkt = Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst, proto=17, frag=100, id=7) / Raw(b"z" * 64)
        elif kind == "vlan":
            pkt = Ether(src=src_mac, dst=dst_mac) / Dot1Q(vlan=10) / l3 / UDP(sport=40000, dport=port) / body
        elif kind == "qinq":
            pkt = Ether(src=src_mac, dst=dst_mac, type=0x88A8) / Dot1Q(vlan=20) / Dot1Q(vlan=10) / l3 / UDP(sport=40000, dport=port) / body
        elif kind == "ipv6-ext":
            pkt = Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt() / UDP(sport=40000, dport=port) / body
        else:
            raise SystemExit(f"unknown frame kind {kind!r}")
        frames.append(pkt)
    from scapy.all import sendp
    sent = 0
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        sendp(frames, iface=iface, verbose=False)
        sent += len(frames)
        if time.monotonic() > deadline:
            break
    return sent


def _peer_mac_for(iface: str) -> str:
    """The MAC of the other end of a veth: the root side's address, from the static neighbour table."""
    out = subprocess.run(["ip", "-j", "neigh", "show", "dev", iface], capture_output=True, text=True).stdout
    import json
    for entry in json.loads(out or "[]"):
        if entry.get("lladdr"):
            return entry["lladdr"]
    return "ff:ff:ff:ff:ff:ff"


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m app.lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="send bounded test traffic to a lab host")
    s.add_argument("--kind", default="udp", help="udp (socket) or a scapy frame kind: syn, synack, bad-ihl, "
                   "truncated-tcp, truncated-ip, fragment, vlan, qinq, ipv6-ext")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--ports", default="9", help="comma-separated ports, or a range A-B")
    s.add_argument("--count", type=int, default=1, help="rounds over the port list")
    s.add_argument("--payload", type=int, default=32)
    s.add_argument("--iface", default="", help="interface for scapy frames")
    s.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    check_test_address(args.dst)
    if "-" in args.ports:
        a, b = args.ports.split("-")
        ports = list(range(int(a), int(b) + 1))
    else:
        ports = [int(p) for p in args.ports.split(",") if p]
    if args.count * len(ports) > MAX_COUNT:
        raise SystemExit(f"refusing more than {MAX_COUNT} packets")
    if args.kind == "udp":
        n = send_udp(args.src, args.dst, ports, args.count, args.payload, args.max_seconds)
    else:
        iface = args.iface or os.environ.get("PW_LAB_IFACE", "")
        n = send_scapy(args.kind, args.src, args.dst, ports, args.count, args.payload, iface, args.max_seconds)
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
