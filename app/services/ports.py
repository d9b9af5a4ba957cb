"""Port and protocol naming shared by the collector, scanner and sniffer.

Ports in the system's ephemeral range (``net.ipv4.ip_local_port_range``) that nothing listens
on are folded into one bucket per protocol (``EPHEMERAL`` = -1), so a workstation's client
traffic does not create thousands of one-off port series. Per-source and flow detail keep the
real ports.
"""
from __future__ import annotations

from pathlib import Path

EPHEMERAL = -1
PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp", 51: "ah"}
PORTED = ("tcp", "udp")          # protocols whose key is a real port (ICMP keys are types)


def protocol_name(proto: int) -> str:
    """'tcp', 'udp', 'icmp', 'icmpv6', ... or 'ip-<n>' for other IP protocol numbers."""
    return PROTOCOL_NAMES.get(proto, f"ip-{proto}")


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """(low, high) of the local ephemeral port range; Linux's default when unreadable."""
    try:
        low, high = Path(path).read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def fold_port(port: int, protocol: str, listening: set[tuple[int, str]], low: int, high: int,
              fold: bool = True) -> int:
    """The port value stored in port_stats/packets: ``EPHEMERAL`` for an unlistened ephemeral
    TCP/UDP port when folding is on, else ``port`` itself.

    listening: {(port, protocol)} occupied on this host (from the scanner).
    """
    if fold and protocol in PORTED and low <= port <= high and (port, protocol) not in listening:
        return EPHEMERAL
    return port


def port_label(value: int | None, protocol: str | None, *, long: bool = False) -> str:
    """A port as people read it: 'tcp/22', 'udp/ephemeral' (the folded bucket), 'host' for a finding
    that spans ports.

    long=True (reports, tables) also names the service and says what an ICMP key is:
    'tcp/22 (ssh)', 'icmp/type 8', 'host-wide'.
    """
    import socket
    if value is None:
        return "host-wide" if long else "host"
    protocol = protocol or "?"
    if value == EPHEMERAL:
        return f"{protocol}/ephemeral"
    if not long:
        return f"{protocol}/{value}"
    if protocol.startswith("icmp"):
        return f"{protocol}/type {value}"
    label = f"{protocol}/{value}"
    if protocol in PORTED:
        try:
            label += f" ({socket.getservbyport(int(value), protocol)})"
        except (OSError, OverflowError):
            pass
    return label
