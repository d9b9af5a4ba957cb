"""The blocklist: block decisions from anomalies, safety interlocks, and ledger ⇄ pinned-map reconciliation.

Truth and enforcement
    The ``blacklist`` table is the truth (one row per CIDR: reason, evidence, anomaly, created,
    expiry, status, drops, offences); the pinned LPM trie ``<pin_root>/<interface>/blacklist`` of
    every watched interface is the enforcement. :func:`reconcile` makes one map equal the ledger's
    'active' rows: expired rows leave it, missing rows are (re-)added, entries the ledger does not
    know are removed and logged. The collector calls it after every round; the evaluator after its
    decisions (:func:`after_evaluation`); the CLI after each change (:func:`apply`, all interfaces).

Drop accounting (why blacklist.drops is exact)
    blacklist.drops is kept by reconcile from its OWN baseline, not summed from blacklist_drops:
    ``blacklist_map_counters`` holds, per (interface, entry), the map's cumulative drop counter when
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

Decisions (:func:`decide`, after each evaluation)
    Sources of rule findings listed in ``blocklist.rule_detectors`` (port scanners, SYN-flood
    sources: the anomaly's ``source``, plus sources its reasons name with a share at or above
    ``model_source_share``), and the dominant sources of a model anomaly on a port: those that sent
    at least ``model_source_share`` of the port's packets in the anomaly's rounds (port-specific
    counts from flows/source_ports, lower bounds, or a ``share`` the reasons JSON states). The TTL
    escalates like fail2ban's bantime.increment: ``base_ttl * escalation ** (offences - 1)`` capped
    at ``max_ttl``. Never blocked automatically (:class:`Protection`): loopback, unspecified, every
    address of this host (root network namespace), default gateways, resolv.conf name servers,
    peers of established SSH sessions, the allowlist — nor any network overlapping one of them.
    Also refused: an address removed by hand less than ``manual_remove_grace_seconds`` ago, more
    than ``max_new_per_evaluation`` new blocks in one evaluation, more entries than
    ``min(max_entries, collector.blacklist_map_size)``. Dry-run records 'would-block' rows with
    status 'dry-run', which no reconcile ever writes to a map. Every action is a blacklist_events row.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from app.config import ConfigError
from app.db import blacklist as db
from app.db import series as series_db
from app.errors import BpfError, UsageError
from app.services import maps
from app.services.bpf_structs import PwBlacklistValue, lpm_key, lpm_key_text

log = logging.getLogger(__name__)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
RESOLV_PATHS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
SSH_PORT = 22
_ZERO_VALUE = bytes(PwBlacklistValue())
_MAPPED_V4 = ipaddress.ip_network("::ffff:0:0/96")


# --- addresses -------------------------------------------------------------------------------------

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


# --- safety interlocks -------------------------------------------------------------------------------

@dataclass
class Protection:
    """Networks never blocked automatically, each with why: (network, why) pairs."""
    networks: list = field(default_factory=list)

    def add(self, text: str, why: str) -> None:
        try:
            network = normalise(ipaddress.ip_network(text.split("%")[0], strict=False))
        except ValueError:
            log.debug("ignoring %r (%s): not an address", text, why)
            return
        self.networks.append((network, why))

    def refusal(self, network: Network) -> str | None:
        """Why ``network`` must not be blocked (it overlaps a protected network), or None."""
        network = normalise(network)
        for protected, why in self.networks:
            if protected.version == network.version and protected.overlaps(network):
                return f"overlaps {protected} ({why})"
        return None

    @classmethod
    def gather(cls, settings) -> "Protection":
        """Everything protected on this host now, plus the configured allowlist."""
        p = cls()
        for text, why in (("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
                          ("0.0.0.0/32", "the unspecified address"), ("::/128", "the unspecified address")):
            p.add(text, why)
        for text in local_addresses():
            p.add(text, "an address of this host")
        for text in default_gateways():
            p.add(text, "a default gateway")
        for text in resolvers():
            p.add(text, "a configured DNS resolver")
        for text in ssh_peers():
            p.add(text, "the peer of an established SSH session")
        for text in settings.blocklist.allowlist:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(f"blocklist.allowlist entry {text!r} is not an address or prefix") from None
            p.add(text, "allowlisted")
        return p


def local_addresses() -> list[str]:
    """Every IPv4/IPv6 address on any interface of this (root) network namespace."""
    import socket
    import psutil
    out = []
    for addrs in psutil.net_if_addrs().values():
        out.extend(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return out


def default_gateways() -> list[str]:
    """Gateways of the IPv4 and IPv6 default routes (multipath next hops included)."""
    out = []
    for family in ("-4", "-6"):
        try:
            proc = subprocess.run(["ip", "-j", family, "route", "show", "default"], capture_output=True, text=True,
                                  timeout=10)
            routes = json.loads(proc.stdout or "[]")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            log.warning("cannot read the default routes (ip %s route): gateways are not protected", family)
            continue
        for route in routes:
            for hop in [route, *(route.get("nexthops") or [])]:
                if isinstance(hop.get("gateway"), str):
                    out.append(hop["gateway"])
    return out


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


# --- decisions -----------------------------------------------------------------------------------------

@dataclass
class Decision:
    """One source considered after an evaluation (or one manual add).

    action: 'block' (listed and enforced), 'would-block' (dry-run), 'refused' (an interlock, the
    grace period or a cap said no: see ``detail``), 'skipped' (already covered by a listed entry).
    Times are Unix seconds; ``expires_at`` None means never.
    """
    address: str
    action: str
    reason: str
    anomaly_id: int | None
    detector: str
    created_at: float
    expires_at: float | None = None
    ttl_seconds: float | None = None
    offences: int = 0
    detail: str = ""
    evidence: dict = field(default_factory=dict)


@dataclass
class Candidate:
    network: Network
    reason: str
    anomaly_id: int
    detector: str
    evidence: dict


def ttl_for(settings, offences: int) -> float:
    """Block duration in seconds for the n-th offence: base * escalation^(n-1), capped at max_ttl."""
    cfg = settings.blocklist
    exponent = max(0, offences - 1)
    try:
        ttl = cfg.base_ttl_seconds * cfg.escalation ** exponent
    except OverflowError:
        ttl = math.inf
    return min(ttl, cfg.max_ttl_seconds)


def capacity(settings) -> int:
    """Most entries the blocklist may hold: the configured cap, and never more than the map holds."""
    return min(settings.blocklist.max_entries, settings.collector.blacklist_map_size)


def _json(text) -> dict:
    try:
        data = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _named_sources(reasons: dict) -> list[tuple[str, dict]]:
    """(address, info) for every source the reasons JSON names (strings or objects)."""
    items = reasons.get("sources") or reasons.get("top_sources") or []
    if isinstance(items, (str, dict)):
        items = [items]
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, dict):
            for key in ("address", "source", "addr", "ip", "src"):
                if isinstance(item.get(key), str):
                    out.append((item[key], item))
                    break
    return out


def _share(info: dict) -> float | None:
    try:
        share = float(info["share"])
    except (KeyError, TypeError, ValueError):
        return None
    return share if 0.0 <= share <= 1.0 else None


def _port_label(anomaly) -> str:
    if anomaly["port"] is None:
        return ""
    value = "ephemeral" if anomaly["port"] == -1 else str(anomaly["port"])
    return f"{anomaly['protocol']}/{value}"


def candidates(conn, settings, evaluation_id: int) -> list[Candidate]:
    """Sources the evaluation's anomalies make responsible, in anomaly order (one per network)."""
    cfg = settings.blocklist
    out: dict[str, Candidate] = {}
    for a in db.anomalies_of_evaluation(conn, evaluation_id):
        reasons = _json(a["reasons"])
        named = _named_sources(reasons)
        port = _port_label(a)
        base = {"anomaly_id": a["id"], "evaluation_id": evaluation_id, "detector": a["detector"], "port": port or None,
                "rounds": [a["first_round_id"], a["last_round_id"]], "score": a["score"], "threshold": a["threshold"]}
        found: list[tuple[str, dict, str]] = []
        if a["detector"] in cfg.rule_detectors:
            label = a["detector"].replace("_", " ")
            if label == "syn flood":
                label = "SYN flood"
            what = f"{label}{' on ' + port if port else ''} (anomaly {a['id']})"
            if a["source"]:
                found.append((a["source"], {}, what))
            for address, info in named:
                share = _share(info)
                if (share is not None and share >= cfg.model_source_share) or (share is None and not a["source"]):
                    found.append((address, {"share": share} if share is not None else {}, what))
        elif a["detector"] == "model":
            if a["score"] is None or a["threshold"] is None or a["score"] < cfg.model_block_factor * a["threshold"]:
                log.info("model anomaly %s (score %s, threshold %s) is below %g x its threshold: alert only, no block",
                         a["id"], a["score"], a["threshold"], cfg.model_block_factor)
                continue
            for address, share, packets, total in _model_shares(conn, a, named, cfg.model_source_share):
                if share >= cfg.model_source_share and not _usual_for_source(conn, cfg, a, address):
                    found.append((address, {"share": round(share, 4), "packets": packets, "port_packets": total},
                                  f"model anomaly on {port or 'the host'}: {share:.0%} of its packets (anomaly {a['id']})"))
        for address, extra, what in found:
            try:
                network = normalise(ipaddress.ip_network(address, strict=True))
            except ValueError:
                log.warning("anomaly %s names %r as a source, which is not an address: ignored", a["id"], address)
                continue
            out.setdefault(str(network), Candidate(network, what, a["id"], a["detector"], {**base, **extra}))
    return list(out.values())


def _usual_for_source(conn, cfg, anomaly, address: str) -> bool:
    """True when ``address`` sent about its usual amount in the anomaly's rounds: the port behaved
    oddly, but this source is not what changed (an autoencoder's error also spreads to rounds next
    to the real change). Such a source is not blocked for a model finding."""
    first, last = anomaly["first_round_id"], anomaly["last_round_id"]
    if first is None or last is None:
        return False
    now, usual = db.source_rates(conn, address, first, last, cfg.surge_baseline_rounds)
    if usual is None or usual <= 0:
        return False                                    # a new source: it is the change
    if now < cfg.model_source_surge * usual:
        log.info("anomaly %s: %s sent %.1f packets/round against its usual %.1f (< %g x): not blocked",
                 anomaly["id"], address, now, usual, cfg.model_source_surge)
        return True
    return False


def _model_shares(conn, anomaly, named, min_share: float) -> list[tuple[str, float, int, int]]:
    """(address, share, packets, port packets) of the sources of a model anomaly's port and rounds.

    share = the larger of the port-specific count in the store (flows/source_ports: partial, so a
    lower bound) over the port's packets, and a ``share`` the reasons JSON states. Only the top
    ceil(1 / model_source_share) sources can reach the share, so only those are read.
    """
    counts, total = {}, 0
    first, last = anomaly["first_round_id"], anomaly["last_round_id"]
    if anomaly["port_id"] is not None and first is not None and last is not None:
        total = series_db.port_totals(conn, anomaly["port_id"], first, last)[0]
        if anomaly["port"] is not None and anomaly["port"] >= 0 and total:
            top = math.ceil(1 / max(min_share, 1e-3)) + 1
            counts = {address: int(packets) for address, packets, _ in
                      series_db.top_sources(conn, anomaly["port"], anomaly["protocol"], first, last, top)}
    stated = {address: _share(info) for address, info in named}
    out = []
    for address in dict.fromkeys([*counts, *stated]):
        packets = counts.get(address, 0)
        share = max(packets / total if total else 0.0, stated.get(address) or 0.0)
        out.append((address, share, packets, total))
    return out


def decide(conn, settings, evaluation_id: int, now: float | None = None, *,
           protection: Protection | None = None) -> list[Decision]:
    """Turn the findings of one evaluation into ledger rows; returns one Decision per source considered.

    Writes the ledger and blacklist_events only (one transaction); no map is touched here — call
    :func:`apply` (or use :func:`after_evaluation`) to enforce. ``protection`` defaults to
    :meth:`Protection.gather` (tests pass their own).
    """
    cfg = settings.blocklist
    if not cfg.enabled:
        log.info("blocklist disabled (blocklist.enabled = false): no decisions for evaluation %s", evaluation_id)
        return []
    now = time.time() if now is None else now
    db.ensure_schema(conn)
    found = candidates(conn, settings, evaluation_id)
    if not found:
        return []
    protection = protection if protection is not None else Protection.gather(settings)
    status = "dry-run" if cfg.dry_run else "active"
    action = "would-block" if cfg.dry_run else "block"
    limit = capacity(settings)
    decisions: list[Decision] = []
    over_new = over_total = 0
    with db.immediate(conn):
        # what already covers a source: enforced entries (and, in dry-run, simulated ones too)
        listed = [(ipaddress.ip_network(r["address"]), r["address"])
                  for r in db.entries(conn, db.LISTED if cfg.dry_run else ("active",))]
        n_listed = db.count_status(conn, status)
        n_new = 0
        for c in found:
            address = str(c.network)
            d = Decision(address, "refused", c.reason, c.anomaly_id, c.detector, now, evidence=c.evidence)
            decisions.append(d)
            covering = next((text for net, text in listed
                             if net.version == c.network.version and c.network.subnet_of(net)), None)
            row = db.get_entry(conn, address)
            why = protection.refusal(c.network)
            if why:
                d.detail = f"{address} {why}"
            elif covering:
                d.action, d.detail = "skipped", f"already listed as {covering}"
                continue
            elif (row is not None and row["status"] == "removed" and row["removed_at"] is not None
                  and now - row["removed_at"] < cfg.manual_remove_grace_seconds):
                until = row["removed_at"] + cfg.manual_remove_grace_seconds
                d.detail = (f"removed by hand {now - row['removed_at']:.0f} s ago: not re-blocked automatically "
                            f"before {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}")
            elif n_new >= cfg.max_new_per_evaluation:
                over_new += 1
                d.detail = f"cap of {cfg.max_new_per_evaluation} new blocks per evaluation reached"
            elif n_listed >= limit:
                over_total += 1
                d.detail = f"blocklist full ({limit} entries)"
            else:
                d.offences = (row["offences"] + 1) if row is not None else 1
                d.ttl_seconds = ttl_for(settings, d.offences)
                d.expires_at = now + d.ttl_seconds
                d.action = action
                d.detail = f"offence {d.offences}, ttl {d.ttl_seconds:.0f} s"
                db.upsert_entry(conn, address, c.reason, json.dumps(c.evidence, default=str), c.anomaly_id, "auto",
                                now, d.expires_at, status, d.offences)
                listed.append((c.network, address))
                n_new += 1
                n_listed += 1
            db.insert_event(conn, now, address, d.action, f"{c.reason}: {d.detail}")
            log.info("%s %s: %s (%s)", d.action, address, c.reason, d.detail)
    if over_new:
        log.warning("blocklist: the cap of %d new automatic blocks per evaluation was reached; %d more source(s) "
                    "were not blocked (raise blocklist.max_new_per_evaluation to allow more)",
                    cfg.max_new_per_evaluation, over_new)
    if over_total:
        log.warning("blocklist: full at %d entries (min of blocklist.max_entries and collector.blacklist_map_size); "
                    "%d more source(s) were not blocked", limit, over_total)
    return decisions


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


def _growth(counter: int, baseline: tuple[int, int] | None) -> int:
    """Drops since the baseline; a counter below it restarted from 0 and counts whole."""
    if baseline is None or counter < baseline[0]:
        return counter
    return counter - baseline[0]


def reconcile(conn, settings, pin_dir: str | Path, now: float | None = None) -> ReconcileResult:
    """Make the pinned blacklist map in ``pin_dir`` equal the ledger's active entries; count drops.

    Expires due ledger rows first (globally). Without a pinned map only that happens
    (``result.pinned`` False). Raises BpfError when the map exists but cannot be opened.
    """
    now = time.time() if now is None else now
    pin_dir = Path(pin_dir)
    result = ReconcileResult(pin_dir.name)
    db.ensure_schema(conn)
    with db.immediate(conn):
        _expire(conn, now, result)
        if not (pin_dir / "blacklist").exists():
            result.pinned = False
            return result
        with maps.PinnedMap(pin_dir / "blacklist") as blacklist:
            _sync(conn, blacklist, result, now)
    if result.unknown_removed:
        log.warning("removed %d entr%s the ledger does not know from the blacklist map of %s: %s",
                    len(result.unknown_removed), "y" if len(result.unknown_removed) == 1 else "ies",
                    result.interface, ", ".join(result.unknown_removed))
    if result.readded:
        log.warning("re-added %d blocklist entr%s missing from the map of %s (reload, reboot or a hand flush): %s",
                    len(result.readded), "y" if len(result.readded) == 1 else "ies", result.interface,
                    ", ".join(result.readded))
    return result


def _sync(conn, blacklist: maps.PinnedMap, result: ReconcileResult, now: float) -> None:
    interface = result.interface
    in_map = _read_map(blacklist)
    active = {r["address"]: r for r in db.entries(conn, ("active",))}
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
            blacklist.update(lpm_key(ipaddress.ip_network(text)), _ZERO_VALUE)
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


def apply(conn, settings, now: float | None = None) -> list[ReconcileResult]:
    """Reconcile the ledger with EVERY interface's pinned map under ``general.pin_root``.

    With no pins anywhere, only expiries are recorded and the list is empty (the next collector
    run enforces the ledger).
    """
    now = time.time() if now is None else now
    dirs = pin_dirs(settings)
    if not dirs:
        db.ensure_schema(conn)
        with db.immediate(conn):
            _expire(conn, now)
        return []
    return [reconcile(conn, settings, pdir, now) for pdir in dirs]


def after_evaluation(conn, settings, evaluation_id: int, now: float | None = None
                     ) -> tuple[list[Decision], list[ReconcileResult]]:
    """What the evaluator calls after storing its anomalies: :func:`decide`, then :func:`apply`."""
    decisions = decide(conn, settings, evaluation_id, now)
    results = apply(conn, settings, now)
    return decisions, results


# --- manual changes (the CLI) ------------------------------------------------------------------------

def add_manual(conn, settings, text: str, ttl: float | None = None, reason: str | None = None, force: bool = False,
               now: float | None = None, protection: Protection | None = None) -> Decision:
    """List ``text`` (ADDR or ADDR/LEN) by hand. Checks everything before changing anything.

    A protected or allowlisted network is refused unless ``force``. ttl None uses
    ``blocklist.manual_ttl_seconds``. Manual entries are always 'active' (dry-run is about automatic
    decisions). The caller enforces with :func:`apply`.
    """
    network = parse_network(text)
    ttl = settings.blocklist.manual_ttl_seconds if ttl is None else ttl
    if not (ttl > 0 and math.isfinite(ttl)):
        raise UsageError(f"--ttl must be a positive number of seconds, not {ttl:g}")
    protection = protection if protection is not None else Protection.gather(settings)
    why = protection.refusal(network)
    if why and not force:
        raise UsageError(f"{network} is not blocked because it {why}: pass --force to block it anyway")
    now = time.time() if now is None else now
    address = str(network)
    reason = (reason or "").strip() or "manual"
    db.ensure_schema(conn)
    with db.immediate(conn):
        row = db.get_entry(conn, address)
        listed = row is not None and row["status"] == "active"
        limit = capacity(settings)
        if not listed and db.count_status(conn, "active") >= limit:
            raise UsageError(f"the blocklist is full ({limit} entries): remove entries first or raise "
                             "blocklist.max_entries and collector.blacklist_map_size")
        offences = row["offences"] if row is not None else 1
        evidence = {"origin": "manual", "forced": why} if why else {"origin": "manual"}
        db.upsert_entry(conn, address, reason, json.dumps(evidence), None, "manual", now, now + ttl, "active", offences)
        detail = f"manual: {reason}, ttl {ttl:.0f} s" + (f", forced although it {why}" if why else "")
        db.insert_event(conn, now, address, "block", detail)
    if why:
        log.warning("blocked %s by hand although it %s (--force)", address, why)
    return Decision(address, "block", reason, None, "manual", now, now + ttl, ttl, offences, detail, evidence)


def remove_manual(conn, settings, text: str, now: float | None = None) -> str:
    """Take ``text`` off the blocklist by hand (status 'removed'; automatic re-blocks wait out the grace)."""
    address = str(parse_network(text))
    now = time.time() if now is None else now
    db.ensure_schema(conn)
    with db.immediate(conn):
        row = db.get_entry(conn, address)
        if row is None or row["status"] not in db.LISTED:
            raise UsageError(f"{address} is not on the blocklist: `python -m app blacklist list` shows what is")
        db.mark_removed(conn, address, now)
        db.insert_event(conn, now, address, "remove", f"by hand (was {row['status']})")
    log.info("removed %s from the blocklist", address)
    return address


def flush(conn, settings, now: float | None = None) -> list[str]:
    """Take every listed entry off the blocklist (as a manual remove each); returns their addresses."""
    now = time.time() if now is None else now
    db.ensure_schema(conn)
    with db.immediate(conn):
        rows = db.entries(conn)
        for row in rows:
            db.mark_removed(conn, row["address"], now)
            db.insert_event(conn, now, row["address"], "remove", f"flush (was {row['status']})")
    log.info("flushed %d blocklist entries", len(rows))
    return [r["address"] for r in rows]


def pending_drops(conn, settings) -> dict[str, int]:
    """Drops in the maps not yet added to the ledger (read-only: no baseline moves)."""
    out: dict[str, int] = {}
    for pdir in pin_dirs(settings):
        try:
            with maps.PinnedMap(pdir / "blacklist") as blacklist:
                in_map = _read_map(blacklist)
        except BpfError as exc:
            log.debug("cannot read %s: %s", pdir / "blacklist", exc)
            continue
        baselines = db.map_counters(conn, pdir.name)
        for text, (_, drops, _) in in_map.items():
            out[text] = out.get(text, 0) + _growth(drops, baselines.get(text))
    return out
