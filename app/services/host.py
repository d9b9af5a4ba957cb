"""Facts about this host, read now: its addresses, default routes (gateways, interface), resolvers,
SSH peers and the XDP program attached to a link. The one home of these facts: the blocklist's
interlocks, the XDP loader, the sniffer and ``status`` all ask here.

Everything reads the root network namespace of the calling process (psutil, ``ip -j`` for routes,
libbpf's netlink query for XDP, resolv.conf); nothing is cached and nothing is written.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import subprocess
from pathlib import Path

from app.errors import UsageError

log = logging.getLogger(__name__)

RESOLV_PATHS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
SSH_PORT = 22
XDP_MODE_NAMES = {1: "native", 2: "generic", 3: "offload"}    # enum XDP_ATTACHED_* (uapi/linux/if_link.h)


def local_addresses() -> list[str]:
    """Every IPv4/IPv6 address on any interface of this (root) network namespace, as psutil gives
    them (an IPv6 link-local address may carry a ``%zone``)."""
    import socket
    import psutil
    out = []
    for addrs in psutil.net_if_addrs().values():
        out.extend(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return out


def local_address_set() -> frozenset[str]:
    """:func:`local_addresses` without zones, in canonical text (as tshark prints them)."""
    found = set()
    for text in local_addresses():
        try:
            found.add(str(ipaddress.ip_address(text.split("%", 1)[0])))
        except ValueError:
            continue
    return frozenset(found)


def default_routes(family: str) -> list[dict] | None:
    """``ip -j <family> route show default`` as parsed JSON (family '-4' or '-6'); None when it
    cannot be read."""
    try:
        proc = subprocess.run(["ip", "-j", family, "route", "show", "default"], capture_output=True, text=True,
                              timeout=10)
        return json.loads(proc.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def default_gateways() -> list[str]:
    """Gateways of the IPv4 and IPv6 default routes (multipath next hops included)."""
    out = []
    for family in ("-4", "-6"):
        routes = default_routes(family)
        if routes is None:
            log.warning("cannot read the default routes (ip %s route): gateways are not protected", family)
            continue
        for route in routes:
            for hop in [route, *(route.get("nexthops") or [])]:
                if isinstance(hop.get("gateway"), str):
                    out.append(hop["gateway"])
    return out


def default_interface() -> str:
    """The interface of the IPv4 (else IPv6) default route; UsageError when there is none."""
    for family in ("-4", "-6"):
        for route in default_routes(family) or []:
            if route.get("dev"):
                return route["dev"]
    raise UsageError("no default route, so no default interface: pass --interface IF")


def resolvers(paths=RESOLV_PATHS) -> list[str]:
    """``nameserver`` addresses of the resolv.conf files that exist."""
    out = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                out.append(parts[1])
    return out


def ssh_peers() -> list[str]:
    """Remote addresses of established TCP sessions on local port 22 or owned by an sshd process."""
    import psutil
    names: dict[int, str] = {}
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr:
            continue
        if conn.laddr and conn.laddr.port == SSH_PORT:
            out.append(conn.raddr.ip)
            continue
        if conn.pid:
            if conn.pid not in names:
                try:
                    names[conn.pid] = psutil.Process(conn.pid).name()
                except psutil.Error:
                    names[conn.pid] = ""
            if names[conn.pid].startswith("sshd"):
                out.append(conn.raddr.ip)
    return out


class BpfXdpQueryOpts(ctypes.Structure):   # struct bpf_xdp_query_opts (libbpf 1.x bpf/libbpf.h), leading fields
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", ctypes.c_uint32), ("drv_prog_id", ctypes.c_uint32),
                ("hw_prog_id", ctypes.c_uint32), ("skb_prog_id", ctypes.c_uint32), ("attach_mode", ctypes.c_uint8)]


def xdp_attachment(interface: str) -> tuple[int, str] | None:
    """(program id, mode name) of the XDP program attached to ``interface``, or None.

    libbpf's bpf_xdp_query: one RTM_GETLINK netlink request, no root needed, no subprocess, and no
    pyroute2 import on the collector's path (pyroute2 0.9 costs ~0.2 s and ~19 MB per process)."""
    from app.services.kernel import maps
    try:
        ifindex = int(Path(f"/sys/class/net/{interface}/ifindex").read_text())
    except (OSError, ValueError):
        return None
    lib = maps.libbpf()
    lib.bpf_xdp_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    opts = BpfXdpQueryOpts(sz=ctypes.sizeof(BpfXdpQueryOpts))
    if lib.bpf_xdp_query(ifindex, 0, ctypes.byref(opts)) < 0 or opts.attach_mode == 0:
        return None
    if opts.attach_mode in XDP_MODE_NAMES:        # XDP_ATTACHED_DRV / SKB / HW: one program
        return int(opts.prog_id), XDP_MODE_NAMES[opts.attach_mode]
    for prog_id, mode in ((opts.drv_prog_id, 1), (opts.skb_prog_id, 2), (opts.hw_prog_id, 3)):   # MULTI
        if prog_id:
            return int(prog_id), XDP_MODE_NAMES[mode]
    return None
