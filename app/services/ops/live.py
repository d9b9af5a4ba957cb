"""What is happening now: two reads of the pinned maps (:func:`read`), turned into per-second rates
(:func:`rates`) and the text ``python -m app top`` prints (:func:`render`).

Writes nothing anywhere: no database, no lock, no map update (the maps are only looked up, like
``xdp-filter poll``). Keys and values are read by field name (app/services/kernel/bpf_structs.py, through
app/services/collector/rounds.py, which sums the per-CPU slots); no byte offset appears here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from app.services.collector import rounds
from app.services.kernel import bpf_structs, maps
from app.services.ports import port_label, protocol_name

MAP_NAMES = ("port_stats", "sources", "global", "blacklist")


@dataclass
class Reading:
    """One read of the maps of one interface; monotonic: time.monotonic() of the read."""
    interface: str
    monotonic: float
    ports: dict[tuple[int, str], tuple[int, int]]        # (port, protocol) -> (packets, bytes)
    sources: dict[str, tuple[int, int]]                   # address -> (packets, bytes)
    totals: dict[str, int]                                # GLOBAL_NAMES -> count
    blacklist: dict[str, tuple[int, int]]                 # CIDR -> (drops, drop_bytes)
    entries: dict[str, int] = field(default_factory=dict)  # map name -> entries / max entries text


@dataclass
class Rate:
    key: str
    packets_per_s: float
    bytes_per_s: float
    packets: int          # since the previous read


@dataclass
class View:
    interface: str
    seconds: float
    ports: list[Rate]
    sources: list[Rate]
    totals: dict[str, float]                               # per second
    blacklist: list[tuple[str, float, int]]                # (CIDR, drops per second, drops since loaded)
    entries: dict[str, int] = field(default_factory=dict)


def _records(reading: rounds.MapReading, decode_key) -> dict:
    out = {}
    for i in range(reading.entries):
        out[decode_key(reading.key(i))] = tuple(int(x) for x in reading.counters[i][:2])
    return out


def _port_key(raw: bytes) -> tuple[int, str]:
    key = bpf_structs.PwPortKey.from_buffer_copy(raw)
    return key.port, protocol_name(key.proto)


def read(pin_dir: str | Path) -> Reading:
    """One read of the interface's pinned maps (BpfError when they cannot be opened)."""
    pin_dir = Path(pin_dir)
    opened = maps.open_maps(pin_dir, MAP_NAMES)
    try:
        readings = {name: rounds.read_map(m) for name, m in opened.items()}
        entries = {name: m.info.max_entries for name, m in opened.items()}
    finally:
        for m in opened.values():
            m.close()
    glob = readings["global"]
    totals = {name: int(glob.counters[0][i]) for i, name in enumerate(bpf_structs.GLOBAL_NAMES)} \
        if glob.entries else {name: 0 for name in bpf_structs.GLOBAL_NAMES}
    return Reading(pin_dir.name, time.monotonic(),
                   ports=_records(readings["port_stats"], _port_key),
                   sources=_records(readings["sources"], bpf_structs.addr_text),
                   totals=totals,
                   blacklist=_records(readings["blacklist"], bpf_structs.lpm_key_text),
                   entries={name: readings[name].entries for name in ("port_stats", "sources", "blacklist")}
                   | {f"{name}_max": n for name, n in entries.items()})


def _growth(now: int, before: int | None) -> int:
    """Counters are cumulative in the kernel: a key new since the previous read counts whole, a counter
    that went down (program reloaded) restarts from 0."""
    return now if before is None or now < before else now - before


def _rates(current: dict, previous: dict, seconds: float, label) -> list[Rate]:
    out = []
    for key, (packets, nbytes) in current.items():
        before = previous.get(key)
        dp = _growth(packets, before[0] if before else None)
        db = _growth(nbytes, before[1] if before else None)
        if dp:
            out.append(Rate(label(key), dp / seconds, db / seconds, dp))
    out.sort(key=lambda r: (-r.packets_per_s, r.key))
    return out


def rates(previous: Reading, current: Reading) -> View:
    """Per-second rates between two reads of the same interface, busiest first."""
    seconds = max(current.monotonic - previous.monotonic, 1e-3)
    totals = {name: _growth(n, previous.totals.get(name)) / seconds for name, n in current.totals.items()}
    blacklist = []
    for cidr, (drops, _) in sorted(current.blacklist.items()):
        before = previous.blacklist.get(cidr)
        blacklist.append((cidr, _growth(drops, before[0] if before else None) / seconds, drops))
    blacklist.sort(key=lambda b: (-b[1], -b[2], b[0]))
    return View(current.interface, seconds,
                ports=_rates(current.ports, previous.ports, seconds, lambda k: port_label(k[0], k[1])),
                sources=_rates(current.sources, previous.sources, seconds, str),
                totals=totals, blacklist=blacklist, entries=current.entries)


def _num(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.1f}" if x and abs(x) < 10 else f"{x:.0f}"


def render(view: View, rows: int = 10, width: int = 100, clock: float | None = None) -> list[str]:
    """The lines of one refresh: a header, totals, then ports, sources and the blocklist side by side
    in sections (at most ``rows`` lines each), each line at most ``width`` characters."""
    t = view.totals
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if clock is None else clock))
    lines = [f"portwatch top - {view.interface} - {stamp} - rates over {view.seconds:.1f} s (pinned maps, read-only)",
             f"packets {_num(t.get('total', 0))}/s  bytes {_num(t.get('bytes', 0))}/s  "
             f"dropped {_num(t.get('dropped', 0))}/s  unparsed {_num(t.get('unparsed', 0))}/s  "
             f"non-IP {_num(t.get('non_ip', 0))}/s  tcp {_num(t.get('tcp', 0))}/s  udp {_num(t.get('udp', 0))}/s",
             ""]

    def section(title: str, items: list[Rate], total: int) -> None:
        lines.append(f"{title:<44}{'pkts/s':>10}{'bytes/s':>11}{'new pkts':>10}")
        for r in items[:rows]:
            lines.append(f"  {r.key[:42]:<42}{_num(r.packets_per_s):>10}{_num(r.bytes_per_s):>11}{r.packets:>10}")
        if not items:
            lines.append("  (no traffic since the last refresh)")
        elif len(items) > rows:
            lines.append(f"  ... {len(items) - rows} more of {total} with traffic")
        lines.append("")

    section(f"PORTS ({view.entries.get('port_stats', 0)} in map)", view.ports, len(view.ports))
    section(f"SOURCES ({view.entries.get('sources', 0)} in map)", view.sources, len(view.sources))
    lines.append(f"{'BLOCKLIST (' + str(len(view.blacklist)) + ' in map)':<44}{'drops/s':>10}{'drops (since load)':>21}")
    for cidr, per_s, drops in view.blacklist[:rows]:
        lines.append(f"  {cidr[:42]:<42}{_num(per_s):>10}{drops:>21}")
    if not view.blacklist:
        lines.append("  (empty)")
    elif len(view.blacklist) > rows:
        lines.append(f"  ... {len(view.blacklist) - rows} more")
    return [line[:width] for line in lines]
