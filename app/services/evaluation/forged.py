"""Is a finding's source possibly forged? One-way evidence (anything a forger can send) naming an
address that had a two-way conversation with this host within ``blocklist.peer_lookback_seconds``
(the ``peers`` table), or seen with an IP TTL outside its usual range by more than
``blocklist.ttl_tolerance``, is possibly forged: the evaluation marks it before storing its
findings, alerts say so and block decisions never act on it."""
from __future__ import annotations

import time
from typing import Sequence

from app.db import peers
from app.services.evaluation.findings import TWO_WAY, Finding


def judge_sources(conn, settings, findings: Sequence[Finding], now: float | None = None) -> int:
    """Set Source.forged (and its note) on every source of every inbound finding (an outbound one
    names destinations, which nobody forges); returns how many are possibly forged. Call before the
    findings are stored: their reasons JSON then carries it.

    Two-way evidence is never forged. One-way evidence is forged when the address is a two-way peer
    within blocklist.peer_lookback_seconds, or its TTL range in the finding's rounds leaves the range
    of its earlier rounds by more than blocklist.ttl_tolerance. A flood's sources judged forged by
    the rules stay so. Otherwise forged = False (judged: an unknown address).
    """
    cfg = settings.blocklist
    now = time.time() if now is None else now
    has_peers = peers.has_table(conn)
    forged = 0
    for f in findings:
        if f.outbound:             # this host sent it: nothing to forge (its sources are destinations)
            continue
        for s in f.sources:
            if s.evidence == TWO_WAY:
                s.forged = False
            elif not s.forged:
                why = _forged_why(conn, cfg, s.address, f, now, has_peers)
                s.forged = bool(why)
                if why:
                    s.note = why
            forged += bool(s.forged)
        names = f.forged_sources
        if names and not f.summary:
            f.summary = (f"{f.detector.replace('_', ' ')} on {f.port_label}: source possibly forged "
                         f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): alert only, not blocked")
    return forged


def _forged_why(conn, cfg, address: str, f: Finding, now: float, has_peers: bool) -> str:
    if has_peers and peers.two_way_since(conn, address, now - cfg.peer_lookback_seconds):
        row = peers.peer(conn, address)
        last = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(row["last_two_way"]))
        return f"possibly forged: one-way evidence naming a two-way peer (last two-way traffic {last})"
    seen = peers.ttl_range(conn, address, f.first_round_id, f.last_round_id)
    usual = peers.ttl_range(conn, address, 0, f.first_round_id - 1) if seen else None
    if seen and usual and (seen[0] < usual[0] - cfg.ttl_tolerance or seen[1] > usual[1] + cfg.ttl_tolerance):
        return (f"possibly forged: IP TTL {seen[0]}-{seen[1]} in these rounds, usually {usual[0]}-{usual[1]} "
                "(another hop count)")
    return ""
