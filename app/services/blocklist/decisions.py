"""Block decisions: an evaluation's findings → ledger rows, behind the safety interlocks.

Decisions (:func:`decide`, after each evaluation, on the evaluation's own findings objects)
    Sources of rule findings listed in ``blocklist.rule_detectors`` (port scanners, SYN-flood
    sources: the finding's ``source``, plus sources it names with a share at or above
    ``model_source_share``, or every named source when it has no main source and states no
    share), and the dominant sources of a model finding on a port: those that sent at least
    ``model_source_share`` of the port's packets in the finding's rounds (the :class:`Source`
    share the evaluation computed from flows/source_ports: a lower bound) and more than
    ``model_source_surge`` times their usual rate. A model finding blocks only when its score is at
    least ``model_block_factor`` times its threshold. Every source carries its evidence class
    (findings.ONE_WAY / TWO_WAY) into the ledger's evidence JSON. The TTL escalates like
    fail2ban's bantime.increment: ``base_ttl * escalation ** (offences - 1)`` capped at ``max_ttl``.
Evidence that survives spoofing
    A possibly forged source (app/services/evaluation/forged.py marks it before the findings are
    stored) is never blocked: the finding is kept, flags it and alerts. Two-way evidence still blocks
    a peer; unknown addresses may be blocked on one-way evidence for the usual (short, escalating) TTL.
    One finding adds at most ``max_new_per_evaluation`` entries, and a SYN flood judged forged
    (many one-way sources, none dominant) at most ``max_new_per_forged_flood`` (0): it is mitigated
    per port instead (``blocklist.syn_limit_enabled``, off by default: enforcement.limit_port_syns).
    A model finding blocks a source only when a rule finding of the same evaluation names that
    source and does not judge it forged (``model_needs_corroboration``, default on): a rule on
    two-way evidence corroborates even a known peer, one on one-way evidence only an unknown address.
    Two-way traffic alone does not: it shows the source is real, not that it is hostile (a benign
    iperf3 burst from a real client is two-way).
Egress (issue 12; ``blocklist.egress_block_enabled``, off by default)
    Outbound findings (``blocklist.egress_detectors``: outbound_scan, exfiltration, beaconing) only
    alert unless the switch is on; then the destination they name (details 'destination') goes into
    the same ledger with direction 'out', the same TTL/escalation, interlocks, caps and dry-run/simulate,
    and enforcement reconciles it into the TC program's ``eg_block`` map. One row per address: an
    address listed for one direction is not listed for the other too.
Interlocks (:class:`Protection`)
    Never blocked automatically: loopback, unspecified, every address of this host (root network
    namespace), default gateways, resolv.conf name servers, peers of established SSH sessions, the
    allowlist — nor any network overlapping one of them (the facts come from app/services/host.py).
    Also refused: an address removed by hand less than ``manual_remove_grace_seconds`` ago, more
    than ``max_new_per_evaluation`` new blocks in one evaluation, more entries than
    ``min(max_entries, collector.blacklist_map_size)``. Dry-run records 'would-block' rows with
    status 'dry-run', which no reconcile ever writes to a map; ``blocklist.simulate`` does the same
    for the detectors it names (``["syn_flood"]``: SYN-flood blocks are simulated, scans still
    block). Every action is a blacklist_events row.

Nothing here touches a map: :func:`after_evaluation` decides, then enforces with
app/services/kernel/enforcement.py (which never imports this module).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from app.config import ConfigError
from app.db import blacklist as db
from app.services import host
from app.services.blocklist import allowlist
from app.services.kernel import enforcement
from app.services.kernel.enforcement import Network, capacity, normalise
from app.services.evaluation.findings import Finding

log = logging.getLogger(__name__)


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
    def gather(cls, settings, conn=None) -> "Protection":
        """Everything protected on this host now, plus the allowlists: the configured one and the
        database's (`allow add`; read through ``conn``, else from general.db when it exists)."""
        p = cls()
        for text, why in (("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
                          ("0.0.0.0/32", "the unspecified address"), ("::/128", "the unspecified address")):
            p.add(text, why)
        for text in host.local_addresses():
            p.add(text, "an address of this host")
        for text in host.default_gateways():
            p.add(text, "a default gateway")
        for text in host.resolvers():
            p.add(text, "a configured DNS resolver")
        for text in host.ssh_peers():
            p.add(text, "the peer of an established SSH session")
        for text in settings.blocklist.allowlist:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(f"blocklist.allowlist entry {text!r} is not an address or prefix") from None
            p.add(text, "allowlisted")
        for text in allowlist.addresses(settings, conn):
            p.add(text, "allowlisted (python -m app allow)")
        return p


# --- decisions -------------------------------------------------------------------------------------

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
    direction: str = "in"         # 'out': a destination this host may not send to


@dataclass
class Candidate:
    network: Network
    reason: str
    anomaly_id: int
    detector: str
    evidence: dict
    forged: str = ""              # why the source is possibly forged (never blocked), else ""
    cap: int | None = None        # most new entries the candidate's finding may add
    direction: str = "in"         # 'in': a source (XDP blacklist); 'out': a destination (TC egress block)


def ttl_for(settings, offences: int) -> float:
    """Block duration in seconds for the n-th offence: base * escalation^(n-1), capped at max_ttl."""
    cfg = settings.blocklist
    exponent = max(0, offences - 1)
    try:
        ttl = cfg.base_ttl_seconds * cfg.escalation ** exponent
    except OverflowError:
        ttl = math.inf
    return min(ttl, cfg.max_ttl_seconds)


def _share(value) -> float | None:
    return value if value is not None and 0.0 <= value <= 1.0 else None


def _what(finding: Finding) -> str:
    port = _port(finding)
    label = finding.detector.replace("_", " ")
    if label == "syn flood":
        label = "SYN flood"
    return f"{label}{' on ' + port if port else ''} (anomaly {finding.id})"


def _port(finding: Finding) -> str:
    return finding.port_label if finding.port is not None else ""


def candidates(conn, settings, findings: Sequence[Finding]) -> list[Candidate]:
    """Sources the findings make responsible, in finding order (one per network)."""
    cfg = settings.blocklist
    out: dict[tuple[str, str], Candidate] = {}
    # addresses a rule finding of this evaluation names, not forged: what corroborates a model finding
    by_rules = {s.address for f in findings if f.detector != "model" for s in f.sources if not s.forged}
    for f in findings:
        port = _port(f)
        base = {"anomaly_id": f.id, "evaluation_id": f.evaluation_id, "detector": f.detector, "port": port or None,
                "rounds": [f.first_round_id, f.last_round_id], "score": f.score, "threshold": f.threshold}
        if f.source_count is not None:
            base["source_count"] = f.source_count
        cap = cfg.max_new_per_evaluation
        if f.details.get("many_one_way_sources"):
            cap = min(cap, cfg.max_new_per_forged_flood)
        found: list[tuple[str, dict, str]] = []
        if f.detector in cfg.egress_detectors:
            if cfg.egress_block_enabled:
                for c in _destinations(f, base, cap):
                    out.setdefault(("out", str(c.network)), c)
            continue
        if f.detector in cfg.rule_detectors:
            what = _what(f)
            if f.source:
                main = f.source_of(f.source)
                found.append((f.source, {"evidence": main.evidence} if main else {}, what))
            for s in f.sources:
                share = _share(s.share)
                if (share is not None and share >= cfg.model_source_share) or (share is None and not f.source):
                    extra = {"share": share} if share is not None else {}
                    found.append((s.address, {**extra, "evidence": s.evidence}, what))
        elif f.detector == "model":
            if f.score is None or f.threshold is None or f.score < cfg.model_block_factor * f.threshold:
                log.info("model anomaly %s (score %s, threshold %s) is below %g x its threshold: alert only, no block",
                         f.id, f.score, f.threshold, cfg.model_block_factor)
                continue
            total = int(f.details.get("packets") or 0)
            for s in f.sources:
                share = _share(s.share) or 0.0
                if cfg.model_needs_corroboration and s.address not in by_rules and share >= cfg.model_source_share:
                    log.info("model anomaly %s names %s (%.0f%% of the port's packets, %s) and no rule finding "
                             "names it: alert only, no block", f.id, s.address, 100 * share, s.evidence)
                    continue
                if share >= cfg.model_source_share and not _usual_for_source(conn, cfg, f, s.address):
                    found.append((s.address, {"share": round(share, 4), "packets": s.packets, "port_packets": total,
                                              "evidence": s.evidence},
                                  f"model anomaly on {port or 'the host'}: {share:.0%} of its packets (anomaly {f.id})"))
        for address, extra, what in found:
            try:
                network = normalise(ipaddress.ip_network(address, strict=True))
            except ValueError:
                log.warning("anomaly %s names %r as a source, which is not an address: ignored", f.id, address)
                continue
            named = f.source_of(address)
            forged = (named.note or "possibly forged") if named is not None and named.forged else ""
            if forged:
                extra = {**extra, "forged": True}
            key, candidate = ("in", str(network)), Candidate(network, what, f.id, f.detector, {**base, **extra}, forged, cap)
            if key not in out or (out[key].forged and not forged):     # evidence not forged wins over forged
                out[key] = candidate
    return list(out.values())


def _destinations(f: Finding, base: dict, cap: int) -> list[Candidate]:
    """The destination an outbound finding names (details 'destination': one remote address; a scan of
    many addresses names none and only alerts), as an egress candidate. This host sent the packets,
    so nothing about them is forged."""
    address = f.details.get("destination")
    if not address:
        log.info("%s anomaly %s names no single destination: alert only, no egress block", f.detector, f.id)
        return []
    try:
        network = normalise(ipaddress.ip_network(address, strict=True))
    except ValueError:
        log.warning("anomaly %s names %r as a destination, which is not an address: ignored", f.id, address)
        return []
    what = f"{f.detector.replace('_', ' ')} to {address} (anomaly {f.id})"
    return [Candidate(network, what, f.id, f.detector, {**base, "direction": "out"}, "", cap, "out")]


def _usual_for_source(conn, cfg, finding: Finding, address: str) -> bool:
    """True when ``address`` sent about its usual amount in the anomaly's rounds: the port behaved
    oddly, but this source is not what changed (an autoencoder's error also spreads to rounds next
    to the real change). Such a source is not blocked for a model finding."""
    first, last = finding.first_round_id, finding.last_round_id
    if first is None or last is None:
        return False
    now, usual = db.source_rates(conn, address, first, last, cfg.surge_baseline_rounds)
    if usual is None or usual <= 0:
        return False                                    # a new source: it is the change
    if now < cfg.model_source_surge * usual:
        log.info("anomaly %s: %s sent %.1f packets/round against its usual %.1f (< %g x): not blocked",
                 finding.id, address, now, usual, cfg.model_source_surge)
        return True
    return False


def decide(conn, settings, findings: Sequence[Finding], now: float | None = None, *,
           protection: Protection | None = None) -> list[Decision]:
    """Turn the findings of one evaluation (stored: ids set) into ledger rows; one Decision per source considered.

    Writes the ledger and blacklist_events only (one transaction); no map is touched here — call
    :func:`enforcement.apply` (or use :func:`after_evaluation`) to enforce. ``protection`` defaults to
    :meth:`Protection.gather` (tests pass their own).
    """
    cfg = settings.blocklist
    if not cfg.enabled:
        log.info("blocklist disabled (blocklist.enabled = false): no decisions for %d finding(s)", len(findings))
        return []
    now = time.time() if now is None else now
    found = candidates(conn, settings, findings)
    if not found:
        return []
    protection = protection if protection is not None else Protection.gather(settings, conn)
    limit = capacity(settings)
    decisions: list[Decision] = []
    over_new = over_total = 0
    with db.immediate(conn):
        # what already covers a source: enforced entries (and, for a simulated decision, simulated ones too)
        listed = [(ipaddress.ip_network(r["address"]), r["address"], r["status"], r["direction"])
                  for r in db.entries(conn, db.LISTED)]
        n_listed = {s: db.count_status(conn, s) for s in db.LISTED}
        n_new = 0
        n_new_by_finding: dict[int, int] = {}
        for c in found:
            address = str(c.network)
            simulated = cfg.dry_run or c.detector in cfg.simulate      # recorded as would-block, never enforced
            status, action = ("dry-run", "would-block") if simulated else ("active", "block")
            d = Decision(address, "refused", c.reason, c.anomaly_id, c.detector, now, evidence=c.evidence,
                         direction=c.direction)
            decisions.append(d)
            covering = next((text for net, text, st, way in listed if (simulated or st == "active")
                             and way == c.direction and net.version == c.network.version
                             and c.network.subnet_of(net)), None)
            row = db.get_entry(conn, address)
            why = protection.refusal(c.network)
            cap = cfg.max_new_per_evaluation if c.cap is None else c.cap
            if why:
                d.detail = f"{address} {why}"
            elif c.forged:
                d.detail = f"{c.forged}: alert only, never blocked on one-way evidence"
            elif n_new_by_finding.get(c.anomaly_id, 0) >= cap:
                d.detail = (f"cap of {cap} new blocks from one finding reached"
                            + (" (a SYN flood judged forged: blocklist.max_new_per_forged_flood)"
                               if cap < cfg.max_new_per_evaluation else ""))
            elif row is not None and row["status"] in db.LISTED and row["direction"] != c.direction:
                d.detail = (f"already listed for the other direction ({row['direction']}); the ledger holds one "
                            "entry per address")
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
            elif n_listed[status] >= limit:
                over_total += 1
                d.detail = f"blocklist full ({limit} entries)"
            else:
                d.offences = (row["offences"] + 1) if row is not None else 1
                d.ttl_seconds = ttl_for(settings, d.offences)
                d.expires_at = now + d.ttl_seconds
                d.action = action
                d.detail = f"offence {d.offences}, ttl {d.ttl_seconds:.0f} s"
                db.upsert_entry(conn, address, c.reason, json.dumps(c.evidence, default=str), c.anomaly_id, "auto",
                                now, d.expires_at, status, d.offences, c.direction)
                listed.append((c.network, address, status, c.direction))
                n_new += 1
                n_new_by_finding[c.anomaly_id] = n_new_by_finding.get(c.anomaly_id, 0) + 1
                n_listed[status] += 1
            egress = " (egress: sending to it)" if c.direction == "out" else ""
            db.insert_event(conn, now, address, d.action, f"{c.reason}{egress}: {d.detail}")
            log.info("%s %s%s: %s (%s)", d.action, address, egress, c.reason, d.detail)
    if over_new:
        log.warning("blocklist: the cap of %d new automatic blocks per evaluation was reached; %d more source(s) "
                    "were not blocked (raise blocklist.max_new_per_evaluation to allow more)",
                    cfg.max_new_per_evaluation, over_new)
    if over_total:
        log.warning("blocklist: full at %d entries (min of blocklist.max_entries and collector.blacklist_map_size); "
                    "%d more source(s) were not blocked", limit, over_total)
    return decisions


def after_evaluation(conn, settings, findings: Sequence[Finding], now: float | None = None
                     ) -> tuple[list[Decision], list[enforcement.ReconcileResult]]:
    """What the evaluation job calls with the findings it just stored: :func:`decide`, then
    :func:`enforcement.apply` on every interface."""
    decisions = decide(conn, settings, findings, now)
    limit_forged_floods(conn, settings, findings, now)
    results = enforcement.apply(conn, settings, now)
    return decisions, results


def limit_forged_floods(conn, settings, findings: Sequence[Finding], now: float | None = None) -> list[int]:
    """For each SYN flood judged forged, a per-port SYN rate limit in XDP (``blocklist.syn_limit_enabled``,
    off by default: ``syn_limit_per_second`` SYNs/s for ``syn_limit_ttl_seconds``). Returns the ports limited."""
    cfg = settings.blocklist
    if not cfg.syn_limit_enabled or not cfg.enabled or cfg.dry_run:
        return []
    limited = []
    for f in findings:
        if f.detector == "syn_flood" and f.details.get("many_one_way_sources") and f.port is not None:
            if enforcement.limit_port_syns(conn, settings, f.port, cfg.syn_limit_per_second, cfg.syn_limit_ttl_seconds):
                limited.append(f.port)
    return limited
