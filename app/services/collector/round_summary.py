"""What a collector round is handed and what it returns: the round's observations from the scanner and
sniffer threads, and the summary of what one round recorded. Imported by the collector, the collection
loop, teardown and replay.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoundSummary:
    """What one round recorded (for the one-line-per-round output and tests)."""
    round_id: int
    interface: str
    seconds: float
    packets: int
    bytes: int
    unparsed: int
    dropped: int
    active_ports: int
    sources: int
    listeners: int | None
    sniffed: int | None
    compiled: bool
    xdp_mode: str | None
    baseline: bool = False                 # only the snapshot was stored (see Collector._baseline_plan)

    def line(self) -> str:
        if self.baseline:
            return (f"round {self.round_id} on {self.interface}: baseline (the counts before this database watched "
                    f"{self.interface} are not history)")
        parts = [f"round {self.round_id} on {self.interface}: {self.packets} packets, {self.bytes} bytes in "
                 f"{self.seconds:.1f} s, {self.active_ports} active ports, {self.sources} sources"]
        if self.unparsed:
            parts.append(f"{self.unparsed} unparsed")
        if self.dropped:
            parts.append(f"{self.dropped} dropped")
        if self.listeners is not None:
            parts.append(f"{self.listeners} listeners")
        if self.sniffed is not None:
            parts.append(f"{self.sniffed} packets sniffed")
        return ", ".join(parts)


@dataclass
class Observations:
    """What the round's threads saw, handed to close_round (None: that part did not run)."""
    listeners: list | None = None          # scanner: list[Listener]
    scanner_status: str = "disabled"
    packets: list | None = None            # sniffer: list[PacketRecord]
    sniffer_status: str = "disabled"
    peers: list | None = None              # scanner: remote addresses of ESTABLISHED TCP sockets
