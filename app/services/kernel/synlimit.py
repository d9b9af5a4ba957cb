"""The optional per-port SYN rate limit of the XDP program: set, clear and list its entries.

bpf/port_flow.c drops TCP SYNs (without ACK) to a port beyond ``per_second`` in one one-second
window while the port has an unexpired entry in the pinned ``synlimit`` map; the SYNs are counted
(port_stats, sources) before the drop, and the drops are counted globally (``syn_limited``, stored
per round in rounds.syn_limited_packets) and per entry. This module only writes the map (libbpf,
no BCC); WHEN to limit a port is the blocking decisions' business (``blocklist.syn_limit_enabled``
says whether they may; off by default).
"""
from __future__ import annotations

import ctypes
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from app.errors import UsageError
from app.services.kernel import maps
from app.services.kernel.bpf_structs import PwConfig, PwPortKey, PwSynlimitValue

MAP_NAME = "synlimit"
PROTOCOLS = {"tcp": socket.IPPROTO_TCP}


@dataclass
class SynLimit:
    port: int
    protocol: str
    per_second: int
    expires_at: float | None        # epoch seconds (None: never)
    dropped: int                    # SYNs dropped for this entry since it was set


def _key(port: int, protocol: str) -> bytes:
    if not 0 < port < 65536:
        raise UsageError(f"port {port} is out of range (1-65535)")
    if protocol not in PROTOCOLS:
        raise UsageError(f"a SYN limit applies to tcp only, not {protocol!r}")
    return bytes(PwPortKey(port=port, proto=PROTOCOLS[protocol]))


def _program_clock(pin_dir: str | Path) -> tuple[int, float]:
    """(now in ns, epoch seconds minus clock seconds) on the clock of the program pinned in ``pin_dir``:
    its replay clock (``pw_config.clock_ns``, capture time in Unix ns) when one is set, else CLOCK_MONOTONIC
    (the program's live clock, bpf_ktime_get_coarse_ns)."""
    config = Path(pin_dir) / "config"
    if config.exists():
        with maps.PinnedMap(config) as m:
            cfg = maps.read_struct(m, maps.INDEX_0, PwConfig)
        if cfg is not None and cfg.clock_ns:
            return cfg.clock_ns, 0.0
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def set_limit(pin_dir: str | Path, port: int, per_second: int, ttl_seconds: float | None,
              protocol: str = "tcp") -> None:
    """Limit SYNs to ``port`` to ``per_second`` for ``ttl_seconds`` (None: until cleared). Replaces an
    existing entry (its window and drop counter start again)."""
    if per_second < 0:
        raise UsageError(f"a SYN budget must be 0 or more per second, not {per_second}")
    key = _key(port, protocol)
    value = PwSynlimitValue(per_second=per_second)
    if ttl_seconds is not None:
        value.expires_ns = _program_clock(pin_dir)[0] + int(ttl_seconds * 1e9)
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        m.update(key, bytes(value))


def clear_limit(pin_dir: str | Path, port: int, protocol: str = "tcp") -> bool:
    """Remove the limit of ``port``; True when there was one."""
    key = _key(port, protocol)
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        return m.delete(key)


def list_limits(pin_dir: str | Path) -> list[SynLimit]:
    """Every entry of the map, expired ones included (the program ignores those)."""
    out = []
    offset = _program_clock(pin_dir)[1]
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        keys, values, n = m.items()
        ks, vs = m.info.key_size, m.record_size
        for i in range(n):
            k = PwPortKey.from_buffer_copy(keys[i * ks:(i + 1) * ks])
            v = PwSynlimitValue.from_buffer_copy(bytes(values[i * vs:i * vs + ctypes.sizeof(PwSynlimitValue)]))
            proto = next((name for name, num in PROTOCOLS.items() if num == k.proto), str(k.proto))
            out.append(SynLimit(k.port, proto, v.per_second,
                                round(v.expires_ns / 1e9 + offset, 3) if v.expires_ns else None, v.dropped))
    return sorted(out, key=lambda e: (e.protocol, e.port))
