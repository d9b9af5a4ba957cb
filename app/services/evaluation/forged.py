"""Is a finding's source possibly forged? One-way evidence (anything a forger can send) naming a
verified peer (the batch's ``peers``, within ``blocklist.peer_lookback_seconds``) without the peer's
fingerprint (TTL, MAC), or seen with an IP TTL outside its usual range by more than
``blocklist.ttl_tolerance``, is possibly forged: the evaluation marks it before storing its
findings, alerts say so and block decisions never act on it."""
from __future__ import annotations

import time
from typing import Sequence

from app.db import peers
from app.services.evaluation.batch import Batch
from app.services.evaluation.findings import ONE_WAY, TWO_WAY, Finding
from app.services.text import utc


def judge_sources(conn, settings, findings: Sequence[Finding], batch: Batch, now: float | None = None) -> int:
    """Set Source.forged (and its note) on every source of every inbound finding (an outbound one
    names destinations, which nobody forges); returns how many are possibly forged. Call before the
    findings are stored: their reasons JSON then carries it. The verified peers come from
    ``batch.peers`` (loaded once, from ``batch.peers_since``: at or before now - the look-back).

    Two-way evidence (handshake flows of a verified peer) whose rounds show another TTL or MAC than
    the peer's fingerprint is what a blind forger's SYN then ACK looks like when the owner stays silent:
    it becomes one-way, forged; otherwise two-way is never forged. One-way evidence naming a verified peer (within
    blocklist.peer_lookback_seconds) is forged unless it carries the peer's fingerprint: its TTL range
    in the finding's rounds within blocklist.ttl_tolerance of the TTL the peer proved itself with, and
    no other source MAC than the peer's when it has one (an off-link peer has none: its packets carry a
    router's MAC; app/services/kernel/onlink.py) — then it is the peer's own, judged like anyone's. One-way
    evidence naming any other address is forged when its TTL range leaves the range of its earlier
    rounds by more than blocklist.ttl_tolerance. A flood's sources judged forged by the rules stay so.
    Otherwise forged = False (judged).
    """
    cfg = settings.blocklist
    now = time.time() if now is None else now
    since = now - cfg.peer_lookback_seconds
    if batch.peers_since is None or batch.peers_since > since:
        raise ValueError(f"the batch's peers start at {batch.peers_since}: judging sources needs those since {since}")
    verified = {a: row for a, row in batch.peers.items() if row["last_verified"] >= since}
    prints = Prints.read(conn, [f for f in findings if not f.outbound])
    forged = 0
    for f in findings:
        if f.outbound:             # this host sent it: nothing to forge (its sources are destinations)
            continue
        for s in f.sources:
            if s.evidence == TWO_WAY:
                why = _handshakes_forged_why(prints, cfg, f, batch.peers.get(s.address))
                s.forged = bool(why)
                if why:
                    s.evidence, s.note = ONE_WAY, why
            elif not s.forged:
                why = _forged_why(prints, cfg, s.address, f, verified.get(s.address))
                s.forged = bool(why)
                if why:
                    s.note = why
            forged += bool(s.forged)
        names = f.forged_sources
        if names and not f.summary:
            f.summary = (f"{f.detector.replace('_', ' ')} on {f.port_label}: source possibly forged "
                         f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): alert only, not blocked")
    return forged


class Prints:
    """The TTL ranges and source MACs per round (source_stats) of the sources of some findings, and
    each one's TTL range before them: read once per evaluation (two indexed queries), not per source."""

    def __init__(self, rows: dict, before: dict, lo: int):
        self.rows, self.before, self.lo = rows, before, lo

    @classmethod
    def read(cls, conn, findings: Sequence[Finding]) -> "Prints":
        addresses = {s.address for f in findings for s in f.sources}
        if not addresses:
            return cls({}, {}, 0)
        lo, hi = min(f.first_round_id for f in findings), max(f.last_round_id for f in findings)
        return cls(peers.fingerprints(conn, addresses, lo, hi), peers.ttl_before(conn, addresses, lo), lo)

    def ttl_range(self, address: str, first: int, last: int) -> tuple[int, int] | None:
        """(lowest, highest) TTL of ``address`` in rounds first..last (None: nothing recorded)."""
        spans = [(a, b) for rid, a, b, _mac in self.rows.get(address, ()) if first <= rid <= last
                 and a is not None and b is not None]
        return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None

    def usual(self, address: str, before: int) -> tuple[int, int] | None:
        """(lowest, highest) TTL of ``address`` in every round before ``before``."""
        spans = [x for x in (self.before.get(address), self.ttl_range(address, self.lo, before - 1)) if x]
        return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None

    def macs(self, address: str, first: int, last: int) -> set[str]:
        """The source MACs of ``address`` in rounds first..last ('mixed': several in one round)."""
        return {mac for rid, _a, _b, mac in self.rows.get(address, ()) if first <= rid <= last and mac is not None}


def _forged_why(prints: Prints, cfg, address: str, f: Finding, row) -> str:
    """Why one-way evidence from ``address`` in f's rounds is possibly forged ('' when it is not);
    ``row``: its peers row when it is a verified peer within the look-back, else None."""
    seen = prints.ttl_range(address, f.first_round_id, f.last_round_id)
    if row is not None:
        mismatch = _fingerprint_mismatch(prints, cfg, row, f, seen)
        if not mismatch:
            return ""             # the verified peer's own fingerprint: its evidence is judged like anyone's
        last = utc(row["last_two_way"], seconds=False)
        return f"possibly forged: one-way evidence naming a verified peer (last verified {last}) {mismatch}"
    usual = prints.usual(address, f.first_round_id) if seen else None
    if seen and usual and (seen[0] < usual[0] - cfg.ttl_tolerance or seen[1] > usual[1] + cfg.ttl_tolerance):
        return (f"possibly forged: IP TTL {seen[0]}-{seen[1]} in these rounds, usually {usual[0]}-{usual[1]} "
                "(another hop count)")
    return ""


def _handshakes_forged_why(prints: Prints, cfg, f: Finding, row) -> str:
    """Why the handshake flows under the verified peer ``row`` (None: not one) in f's rounds are not
    its own: its rounds carry another TTL or MAC than its fingerprint; '' when they match or when there
    is nothing to compare (no fingerprint, no TTLs recorded: the handshakes stay two-way)."""
    if row is None:
        return ""
    seen = prints.ttl_range(row["address"], f.first_round_id, f.last_round_id)
    if row["ttl"] is None or seen is None:
        return ""
    mismatch = _fingerprint_mismatch(prints, cfg, row, f, seen)
    return f"possibly forged: handshakes under a verified peer's address {mismatch}" if mismatch else ""


def _fingerprint_mismatch(prints: Prints, cfg, row, f: Finding, seen: tuple[int, int] | None) -> str:
    """Why one-way evidence in f's rounds does not carry the verified peer ``row``'s fingerprint (its
    TTL within ttl_tolerance hops, its MAC), or '' when it does. No fingerprint to compare is a mismatch:
    a peer is never blocked on evidence that cannot be told from a forgery."""
    if row["ttl"] is None or seen is None:
        return "with no fingerprint to compare"
    if seen[0] < row["ttl"] - cfg.ttl_tolerance or seen[1] > row["ttl"] + cfg.ttl_tolerance:
        return f"with IP TTL {seen[0]}-{seen[1]}, the peer's {row['ttl']}"
    macs = prints.macs(row["address"], f.first_round_id, f.last_round_id)
    if row["mac"] and macs - {row["mac"]}:
        return f"from MAC {', '.join(sorted(macs - {row['mac']}))}, the peer's {row['mac']}"
    return ""
