"""The off-by-default egress block of the TC program: destinations this host may not send to.

bpf/egress.c drops (TC_ACT_SHOT) packets whose destination matches an entry of the pinned LPM trie
``eg_block``, counting them (eg_global ``dropped``, stored per round in rounds.egress_dropped_packets,
and per entry). The trie is empty unless ``blocklist.egress_block_enabled`` is set: this module
refuses to add an entry otherwise, so the empty trie is the switch. Writing the map is all it does;
WHICH destinations to block (with the ledger, TTL and interlocks of the ingress blocklist) is the
blocking decisions' business, not built here.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from app.errors import UsageError
from app.services.kernel import maps
from app.services.kernel.bpf_structs import PwBlacklistValue, lpm_key, lpm_key_text

MAP_NAME = "eg_block"


def add(settings, pin_dir: str | Path, network) -> None:
    """Block sending to ``network`` (an ipaddress network) on the interface of ``pin_dir``."""
    if not settings.blocklist.egress_block_enabled:
        raise UsageError("egress blocking is off: set blocklist.egress_block_enabled = true to block destinations")
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        m.update(lpm_key(ipaddress.ip_network(network)), bytes(PwBlacklistValue()))


def remove(pin_dir: str | Path, network) -> bool:
    """Unblock ``network``; True when it was blocked."""
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        return m.delete(lpm_key(ipaddress.ip_network(network)))


def entries(pin_dir: str | Path) -> dict[str, int]:
    """CIDR -> packets dropped for it since it was added."""
    out = {}
    with maps.PinnedMap(Path(pin_dir) / MAP_NAME) as m:
        keys, values, n = m.items()
        ks, vs = m.info.key_size, m.record_size
        for i in range(n):
            value = PwBlacklistValue.from_buffer_copy(bytes(values[i * vs:(i + 1) * vs]))
            out[lpm_key_text(keys[i * ks:(i + 1) * ks])] = value.drops
    return out


def clear(pin_dir: str | Path) -> int:
    """Remove every entry (switching egress blocking off); returns how many there were."""
    n = 0
    for cidr in entries(pin_dir):
        n += remove(pin_dir, cidr)
    return n
