"""Port occupancy: which local TCP/UDP ports are held, by which process and user (psutil style:
``Scanner().scan()`` -> [Listener], ``merge_scans``, ``listening_ports``).

Read from the kernel's socket tables through psutil, never by binding ports (slow, racy, and wrong for
ports only root may bind), in the caller's network namespace. Imported by the scanner thread, the
collector's round and replay; imports only psutil.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Iterable, NamedTuple

import psutil

log = logging.getLogger(__name__)

LISTEN = "LISTEN"
BOUND = "BOUND"
WILDCARDS = frozenset({"0.0.0.0", "::"})
FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class Listener(NamedTuple):
    """One occupied local port, as returned by :meth:`Scanner.scan`.

    port: local port number; protocol: 'tcp' or 'udp'; address: bound local address text
    ('0.0.0.0', '::', '127.0.0.1', ...); family: 'ipv4' or 'ipv6'; state: 'LISTEN' (tcp) or
    'BOUND' (udp); pid: owning process id or None when no visible process holds it (kernel
    sockets, another pid namespace); process: process name (``/proc/<pid>/comm``) or None;
    user: owner's user name (or uid as text when it has no name) or None; established:
    ESTABLISHED TCP connections on that port and address (0 for UDP).

    ``established`` counts the connections whose local port and family are the listener's and whose
    local address it covers (the same address, or the wildcard ``0.0.0.0`` / ``::``; IPv4 clients of a
    dual-stack ``::`` socket appear as IPv6 ``::ffff:a.b.c.d`` and count there): a per-port-and-address
    count, so several SO_REUSEPORT listeners on one port each report the same number.
    """

    port: int
    protocol: str
    address: str
    family: str
    state: str
    pid: int | None
    process: str | None
    user: str | None
    established: int
    inferred: int = 0          # 1: no scanner saw it; a replay inferred it from the host's answers


class Scanner:
    """Scans the socket tables; keeps a pid -> (name, user) cache across scans of one run.

    The cache is keyed by (pid, process start time), so a reused pid is looked up again.
    """

    def __init__(self) -> None:
        self._process_info: dict[int, tuple[float, str | None, str | None]] = {}
        # remote addresses of ESTABLISHED TCP sockets seen by any scan of this scanner: a completed
        # handshake the kernel verified, so two-way evidence (app/db/peers.py)
        self.peers: set[str] = set()

    def scan(self) -> list[Listener]:
        """Every listening TCP and bound UDP socket, IPv4 and IPv6, sorted by (protocol, port,
        family, address, pid). Needs root to see other users' processes (pid None otherwise).

        Occupied: TCP sockets in state LISTEN (``state='LISTEN'``); UDP sockets with a local address and
        no remote address (``state='BOUND'``). A *connected* UDP socket (a resolver's or QUIC client's)
        is a client, like an ESTABLISHED TCP client socket, and is not listed.

        One socket shared by forked workers (nginx, gunicorn) appears once per process in the kernel's
        tables; rows with the same (protocol, family, address, port, process name, user) are folded
        into one row with the lowest pid (usually the parent). Distinct programs keep distinct rows.

        Cost: one ``psutil.net_connections`` call (it walks every process's fd table: ``/proc/net/*``
        plus the ``/proc/<pid>/fd`` inode -> pid mapping; as root ~10-50 ms on a busy host) plus one
        name/username lookup per distinct pid, cached for the Scanner's life. A pid whose process
        vanished or is not readable gets process/user None, pid kept."""
        connections = psutil.net_connections(kind="inet")
        sockets: list = []
        established: list = []
        for conn in connections:
            if conn.family not in FAMILIES or not conn.laddr:
                continue
            if conn.type == socket.SOCK_STREAM:
                if conn.status == psutil.CONN_LISTEN:
                    sockets.append(conn)
                elif conn.status == psutil.CONN_ESTABLISHED:
                    established.append(conn)
                    if conn.raddr and not ipaddress.ip_address(conn.raddr.ip).is_loopback:
                        self.peers.add(conn.raddr.ip)
            elif conn.type == socket.SOCK_DGRAM and not conn.raddr:
                sockets.append(conn)

        folded: dict[tuple, Listener] = {}
        for conn in sockets:
            protocol = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
            family = FAMILIES[conn.family]
            address = conn.laddr.ip
            process, user = self._describe(conn.pid)
            count = _count_established(established, conn.laddr.port, conn.family, address) if protocol == "tcp" else 0
            listener = Listener(conn.laddr.port, protocol, address, family, LISTEN if protocol == "tcp" else BOUND,
                                conn.pid, process, user, count)
            key = (protocol, family, address, conn.laddr.port, process, user)
            kept = folded.get(key)
            if kept is None or _pid_order(listener.pid) < _pid_order(kept.pid):
                folded[key] = listener
        return sorted(folded.values(), key=_sort_key)

    def _describe(self, pid: int | None) -> tuple[str | None, str | None]:
        """(process name, user name) of ``pid``; (None, None) when it vanished or is hidden."""
        if pid is None:
            return None, None
        try:
            proc = psutil.Process(pid)
            started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None, None
        cached = self._process_info.get(pid)
        if cached is not None and cached[0] == started:
            return cached[1], cached[2]
        name = user = None
        try:
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        try:
            user = proc.username()
        except KeyError:                       # a uid with no passwd entry
            try:
                user = str(proc.uids().real)
            except (psutil.Error, KeyError):
                user = None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        self._process_info[pid] = (started, name, user)
        return name, user


def _count_established(established: list, port: int, family: int, address: str) -> int:
    """ESTABLISHED TCP connections on local ``port`` of ``family`` covered by ``address``."""
    wildcard = address in WILDCARDS
    return sum(1 for c in established
               if c.laddr.port == port and c.family == family and (wildcard or c.laddr.ip == address))


def _pid_order(pid: int | None) -> int:
    return pid if pid is not None else 1 << 62


def _sort_key(listener: Listener) -> tuple:
    return (listener.protocol, listener.port, listener.family, listener.address, _pid_order(listener.pid))


def merge_scans(*scans: Iterable[Listener]) -> list[Listener]:
    """Union of several scans of one round: a socket seen in any of them is listed once, with
    the highest established count seen. Same ordering as :meth:`Scanner.scan`."""
    merged: dict[tuple, Listener] = {}
    for scan in scans:
        for listener in scan:
            key = (listener.protocol, listener.family, listener.address, listener.port, listener.pid)
            kept = merged.get(key)
            if kept is None:
                merged[key] = listener
            elif listener.established > kept.established:
                merged[key] = kept._replace(established=listener.established)
    return sorted(merged.values(), key=_sort_key)


def listening_ports(listeners: Iterable[Listener]) -> set[tuple[int, str]]:
    """{(port, protocol)} occupied on this host: the ``listening`` argument of fold_port."""
    return {(listener.port, listener.protocol) for listener in listeners}
