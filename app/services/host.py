"""Facts about this host, read now: its addresses, default routes (gateways, interface), resolvers
and SSH peers — the one home of these facts (the XDP program attached to a link is
app/services/kernel/attachment.py). Reads the root network namespace of the calling process (psutil,
``ip -j`` for routes, resolv.conf); nothing is cached and nothing is written."""
from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from pathlib import Path

from app.errors import UsageError

log = logging.getLogger(__name__)

RESOLV_PATHS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
SSH_PORT = 22


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
