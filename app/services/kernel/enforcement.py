"""Enforcement: the blocklist ledger ⇄ the pinned LPM maps of every watched interface (the XDP
``blacklist`` for direction 'in' rows, the TC ``eg_block`` for 'out' rows), expiry and drop counts.

What the collector's per-minute path imports (it never imports the decisions): :func:`reconcile`
after every round; the evaluator and the CLI call :func:`apply` (every interface) after a change.
The ledger is the truth and each map its enforcement (:func:`reconcile`); why blacklist.drops is
exact: :func:`_sync`.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from app.db import blacklist as db
from app.errors import BpfError, UsageError
from app.services.kernel import maps
from app.services.kernel.bpf_structs import PwBlacklistValue, lpm_key, lpm_key_text

log = logging.getLogger(__name__)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_ZERO_VALUE = bytes(PwBlacklistValue())
EGRESS_MAP = "eg_block"                  # the TC program's pinned egress block (bpf/egress.c drops what it holds)
_MAPPED_V4 = ipaddress.ip_network("::ffff:0:0/96")


def normalise(network: Network) -> Network:
    """IPv4-mapped IPv6 networks (::ffff:a.b.c.d/len, len >= 96) become the IPv4 network."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED_V4):
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def parse_network(text: str) -> Network:
    """``ADDR`` or ``ADDR/LEN`` (IPv4 or IPv6) as a network; UsageError with one sentence otherwise.

    Host bits set (``198.18.0.5/24``) are refused, not silently normalised: the user may have meant
    the one address or the whole network.
    """
    text = (text or "").strip()
    if not text:
        raise UsageError("an address or prefix is required, e.g. 198.18.0.9 or 2001:db8::/64")
    addr_text, slash, len_text = text.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise UsageError(f"{addr_text!r} is not an IPv4 or IPv6 address") from None
    limit = addr.max_prefixlen
    if slash:
        if not len_text.isdigit():
            raise UsageError(f"prefix length {len_text!r} of {text} is not a number from 0 to {limit}")
        if int(len_text) > limit:
            raise UsageError(f"prefix length {len_text} of {text} is out of range for IPv{addr.version} (0-{limit})")
        prefixlen = int(len_text)
    else:
        prefixlen = limit
    try:
        network = ipaddress.ip_network((addr, prefixlen), strict=True)
    except ValueError:
        network = ipaddress.ip_network((addr, prefixlen), strict=False)
        raise UsageError(f"{text} has host bits set: give {network} for the network or {addr} for the one "
                         "address") from None
    return normalise(network)


def capacity(settings) -> int:
    """Most entries the blocklist may hold: the configured cap, and never more than the map holds."""
    return min(settings.blocklist.max_entries, settings.collector.blacklist_map_size)


# --- reconciliation ------------------------------------------------------------------------------------

@dataclass
class ReconcileResult:
    """What one reconcile did to one interface's map. Lists hold CIDR texts; drops are packets."""
    interface: str
    pinned: bool = True                  # False: no pinned blacklist map there (nothing enforced)
    expired: list = field(default_factory=list)          # ledger rows that expired now
    added: list = field(default_factory=list)            # written to this map for the first time
    readded: list = field(default_factory=list)          # were in this map before and had gone: put back
    removed: list = field(default_factory=list)          # expired/removed ledger entries taken out
    unknown_removed: list = field(default_factory=list)  # entries the ledger does not know, taken out
    failed: list = field(default_factory=list)           # could not be written (map full)
    drops: int = 0                       # drops added to the ledger by this run
    entries: int = 0                     # entries in the map afterwards
    egress: "ReconcileResult | None" = None  # the same for the TC egress block (eg_block), where pinned


def pin_dirs(settings) -> list[Path]:
    """Every ``<pin_root>/<interface>`` holding a pinned blacklist map."""
    root = Path(settings.general.pin_root)
    try:
        return sorted(p for p in root.iterdir() if (p / "blacklist").exists())
    except OSError:
        return []


def _expire(conn, now: float, result: ReconcileResult | None = None) -> list[str]:
    expired = []
    for row in db.expire_due(conn, now):
        db.insert_event(conn, now, row["address"], "expire",
                        f"{row['status']} entry expired ({row['reason']}; offence {row['offences']})")
        log.info("blocklist entry %s expired", row["address"])
        expired.append(row["address"])
    if result is not None:
        result.expired.extend(expired)
    return expired


def _read_map(blacklist: maps.PinnedMap) -> dict[str, tuple[bytes, int, int]]:
    """CIDR text -> (key bytes, drops, drop_bytes) of every entry in a blacklist map."""
    keys, values, n = blacklist.items()
    ks, rs = blacklist.info.key_size, blacklist.record_size
    size = ctypes.sizeof(PwBlacklistValue)
    out = {}
    for i in range(n):
        key = keys[i * ks:(i + 1) * ks]
        value = PwBlacklistValue.from_buffer_copy(values[i * rs:i * rs + size])
        out[lpm_key_text(key)] = (key, value.drops, value.drop_bytes)
    return out


def map_drops(path: str | Path) -> dict[str, int]:
    """CIDR text -> drop counter of every entry of the pinned blacklist LPM map at ``path`` (the XDP
    ``blacklist`` or the TC ``eg_block``)."""
    with maps.PinnedMap(path) as lpm_map:
        return {text: drops for text, (_, drops, _) in _read_map(lpm_map).items()}


def write_entry(lpm_map: maps.PinnedMap, network) -> None:
    """Put ``network`` (a network or its CIDR text) into an open blacklist LPM map with zeroed counters
    (a new element counts its drops from 0). Raises BpfError when the map is full."""
    lpm_map.update(lpm_key(ipaddress.ip_network(network)), _ZERO_VALUE)


def _growth(counter: int, baseline: tuple[int, int] | None) -> int:
    """Drops since the baseline; a counter below it restarted from 0 and counts whole."""
    if baseline is None or counter < baseline[0]:
        return counter
    return counter - baseline[0]


def reconcile(conn, settings, pin_dir: str | Path, now: float | None = None) -> ReconcileResult:
    """Make the pinned blacklist map in ``pin_dir`` equal the ledger's active entries; count drops.

    Expires due ledger rows first (globally). Without a pinned map only that happens
    (``result.pinned`` False). Raises BpfError when the map exists but cannot be opened.

    The ``blacklist`` table is the truth (one row per CIDR: reason, evidence, anomaly, created,
    expiry, status, drops, offences); the pinned LPM trie ``<pin_root>/<interface>/blacklist`` is the
    enforcement of its direction 'in' rows; direction 'out' rows (destinations) go into the TC
    program's ``<pin_root>/<interface>/eg_block`` the same way, while
    ``blocklist.egress_block_enabled`` is on (off: that map is kept empty). Each map is made equal to
    the ledger's 'active' rows: expired rows leave it, missing rows are (re-)added, entries the ledger
    does not know are removed and logged. Dry-run rows (status 'dry-run') are never written to a map.
    """
    now = time.time() if now is None else now
    pin_dir = Path(pin_dir)
    result = ReconcileResult(pin_dir.name)
    with db.immediate(conn):
        _expire(conn, now, result)
        if not (pin_dir / "blacklist").exists():
            result.pinned = False
            return result
        with maps.PinnedMap(pin_dir / "blacklist") as blacklist:
            _sync(conn, blacklist, result, now, _active(conn, "in"), result.interface)
        if (pin_dir / EGRESS_MAP).exists():
            result.egress = ReconcileResult(f"{pin_dir.name} egress")
            # the empty trie is the switch: with egress blocking off, no 'out' entry is enforced
            wanted = _active(conn, "out") if settings.blocklist.egress_block_enabled else {}
            with maps.PinnedMap(pin_dir / EGRESS_MAP) as eg_block:
                _sync(conn, eg_block, result.egress, now, wanted, egress_counter_key(pin_dir.name))
    if result.unknown_removed:
        log.warning("removed %d entr%s the ledger does not know from the blacklist map of %s: %s",
                    len(result.unknown_removed), "y" if len(result.unknown_removed) == 1 else "ies",
                    result.interface, ", ".join(result.unknown_removed))
    if result.readded:
        log.warning("re-added %d blocklist entr%s missing from the map of %s (reload, reboot or a hand flush): %s",
                    len(result.readded), "y" if len(result.readded) == 1 else "ies", result.interface,
                    ", ".join(result.readded))
    return result


def _active(conn, direction: str) -> dict:
    return {r["address"]: r for r in db.entries(conn, ("active",), direction)}


def egress_counter_key(interface: str) -> str:
    """The blacklist_map_counters ``interface`` of an interface's egress block map (its own baselines)."""
    return f"{interface}/egress"


def _sync(conn, blacklist: maps.PinnedMap, result: ReconcileResult, now: float, active: dict,
          interface: str) -> None:
    """Make one LPM map (the XDP blacklist or the TC eg_block) hold exactly ``active``; count its drops
    against the baselines kept under ``interface``.

    Why blacklist.drops is exact: it is kept by reconcile from its OWN baseline, not summed from
    blacklist_drops: ``blacklist_map_counters`` holds, per (interface, entry), the map's cumulative drop counter when
    reconcile last read it. Each reconcile adds ``counter - baseline`` to the ledger and stores the
    new counter; an entry it (re-)adds starts at a baseline of 0 (a new map element counts from 0);
    an entry it removes is read just before the delete, so its last drops land too. A counter lower
    than its baseline was restarted by someone else (maps recreated, re-added by hand) and counts
    whole. So no drop is counted twice and none is lost except those a third party erased with the
    element (a hand flush between two reconciles), which nothing could see. The collector's per-round
    ``blacklist_drops`` rows (from its counter snapshots) stay the per-round history; they can differ
    from the ledger only in that erased-by-hand case and by drops after the last round. The whole
    reconcile runs inside ``BEGIN IMMEDIATE``, so concurrent reconciles (a collector round and a
    ``blacklist add``) serialise and never read the same baseline twice.
    """
    in_map = _read_map(blacklist)
    baselines = db.map_counters(conn, interface)
    for text, (key, drops, drop_bytes) in in_map.items():
        row = active.get(text)
        if row is None:
            # read again right before the delete, so drops counted meanwhile are not lost
            raw = blacklist.lookup(key)
            if raw is not None:
                value = PwBlacklistValue.from_buffer_copy(raw[:ctypes.sizeof(PwBlacklistValue)])
                drops = value.drops
            blacklist.delete(key)
            db.delete_map_counter(conn, interface, text)
            row = db.get_entry(conn, text)
            if row is None:
                db.insert_event(conn, now, text, "reconcile-remove", f"{interface}: not in the ledger ({drops} drops)")
                result.unknown_removed.append(text)
                continue
            db.insert_event(conn, now, text, "map-remove", f"{interface}: entry is {row['status']}")
            result.removed.append(text)
        else:
            db.set_map_counter(conn, interface, text, drops, drop_bytes, now)
        delta = _growth(drops, baselines.get(text))
        if delta:
            db.add_drops(conn, text, delta)
            result.drops += delta
    for text in active:
        if text in in_map:
            continue
        try:
            write_entry(blacklist, text)
        except BpfError as exc:
            log.warning("cannot enforce blocklist entry %s on %s: %s", text, interface, exc)
            db.insert_event(conn, now, text, "map-failed", f"{interface}: {exc}")
            result.failed.append(text)
            continue
        again = text in baselines
        db.set_map_counter(conn, interface, text, 0, 0, now)
        db.insert_event(conn, now, text, "reconcile-add" if again else "map-add",
                        f"{interface}: {'was missing from the map' if again else 'enforced'}")
        (result.readded if again else result.added).append(text)
    for text in baselines:
        if text not in in_map and text not in active:
            db.delete_map_counter(conn, interface, text)
    result.entries = len(in_map) - len(result.removed) - len(result.unknown_removed) + len(result.added) \
        + len(result.readded)


def owned_dirs(conn, settings) -> list[Path]:
    """The pin directories this database may touch: claimed by it, or by none (pin_owner). Another
    database's interface is skipped (logged): a second database never unblocks or merges there."""
    from app.db.rounds import read_database_id
    from app.services.kernel import pin_owner
    db_id = read_database_id(conn)
    dirs = []
    for pdir in pin_dirs(settings):
        if pin_owner.owned_by(pdir, db_id):
            dirs.append(pdir)
        else:
            log.info("the blocklist of %s is enforced by another database: left alone", pdir.name)
    return dirs


def active_cidrs(conn, now: float | None = None) -> list[str]:
    """The ledger's active, unexpired entries (CIDR texts): what a (re)loaded map must hold before it is consulted."""
    now = time.time() if now is None else now
    return [r["address"] for r in db.entries(conn, ("active",), "in") if r["expires_at"] is None or r["expires_at"] > now]


def forget_map(conn, interface: str) -> None:
    """Forget the drop baselines of ``interface``'s map: its entries are new elements counting from 0."""
    with db.immediate(conn):
        for text in db.map_counters(conn, interface):
            db.delete_map_counter(conn, interface, text)


def note_prefilled(conn, interface: str, cidrs: list[str], now: float | None = None) -> None:
    """Record the entries the loader wrote into ``interface``'s map before attaching the program: an event
    each, and a drop baseline of 0 (new map elements count from 0)."""
    if not cidrs:
        return
    now = time.time() if now is None else now
    with db.immediate(conn):
        for text in cidrs:
            db.set_map_counter(conn, interface, text, 0, 0, now)
            db.insert_event(conn, now, text, "map-prefill", f"{interface}: written before the program was attached")
    log.info("%d blocklist entr%s in the map of %s before the program was attached", len(cidrs),
             "y was" if len(cidrs) == 1 else "ies were", interface)


def retire_map(conn, interface: str, path: str | Path) -> int:
    """Add the last drops of a replaced (no longer consulted) blacklist map at ``path`` to the ledger, then
    forget ``interface``'s baselines (the new map counts from 0). The map is not changed. Returns drops added."""
    added = 0
    with db.immediate(conn):
        baselines = db.map_counters(conn, interface)
        for text, drops in (map_drops(path) if Path(path).exists() else {}).items():
            delta = _growth(drops, baselines.get(text))
            if delta and db.get_entry(conn, text) is not None:
                db.add_drops(conn, text, delta)
                added += delta
        for text in baselines:
            db.delete_map_counter(conn, interface, text)
    return added


def apply(conn, settings, now: float | None = None) -> list[ReconcileResult]:
    """Reconcile the ledger with every interface's pinned map under ``general.pin_root`` that this
    database enforces (:func:`owned_dirs`).

    With no pins anywhere, only expiries are recorded and the list is empty (the next collector
    run enforces the ledger).
    """
    now = time.time() if now is None else now
    dirs = owned_dirs(conn, settings)
    if not dirs:
        with db.immediate(conn):
            _expire(conn, now)
        return []
    return [reconcile(conn, settings, pdir, now) for pdir in dirs]


def pending_drops(conn, settings) -> dict[str, int]:
    """Drops in the maps not yet added to the ledger (read-only: no baseline moves)."""
    out: dict[str, int] = {}
    for pdir in owned_dirs(conn, settings):
        try:
            with maps.PinnedMap(pdir / "blacklist") as blacklist:
                in_map = _read_map(blacklist)
        except BpfError as exc:
            log.debug("cannot read %s: %s", pdir / "blacklist", exc)
            continue
        baselines = db.map_counters(conn, pdir.name)
        for text, (_, drops, _) in in_map.items():
            out[text] = out.get(text, 0) + _growth(drops, baselines.get(text))
        if (pdir / EGRESS_MAP).exists():
            try:
                with maps.PinnedMap(pdir / EGRESS_MAP) as eg_block:
                    in_map = _read_map(eg_block)
            except BpfError as exc:
                log.debug("cannot read %s: %s", pdir / EGRESS_MAP, exc)
                continue
            baselines = db.map_counters(conn, egress_counter_key(pdir.name))
            for text, (_, drops, _) in in_map.items():
                out[text] = out.get(text, 0) + _growth(drops, baselines.get(text))
    return out


def limit_port_syns(conn, settings, port: int, syns_per_second: int, ttl_seconds: float) -> bool:
    """Rate-limit SYNs to local TCP ``port`` in XDP for ``ttl_seconds`` on every interface this
    database enforces (app/services/kernel/synlimit.py writes the pinned ``synlimit`` map): a SYN flood judged
    forged is mitigated per port, not by listing its thousands of sources. True when set anywhere."""
    from app.services.kernel import synlimit
    done = False
    for pdir in owned_dirs(conn, settings):
        try:
            synlimit.set_limit(pdir, port, syns_per_second, ttl_seconds)
            done = True
            log.warning("tcp/%d: SYNs limited to %d/s for %.0f s on %s (a SYN flood from forged sources)",
                        port, syns_per_second, ttl_seconds, pdir.name)
        except (OSError, BpfError) as exc:
            log.warning("tcp/%d: no SYN limit on %s (%s): the flood is only alerted", port, pdir.name, exc)
    return done
