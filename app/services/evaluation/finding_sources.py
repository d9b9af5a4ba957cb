"""Who a finding names, from the evaluation's loaded batch: each source's evidence class (the ONE
place it is classified), its counts toward a port or in all, and the top sources of a port.

Pure functions of an :class:`app.services.evaluation.batch.Batch` (no SQL); used by the rule detectors
(app/services/evaluation/rules.py) and the model's findings (app/services/evaluation/evaluation.py).
"""
from __future__ import annotations

from app.services.evaluation.batch import Batch
from app.services.evaluation.findings import ONE_WAY, TWO_WAY, Source
from app.services.ports import EPHEMERAL


def evidence_class(batch: Batch, address: str, first: int, last: int, ports=None, need: int = 1,
                   kind: str = "traffic") -> str:
    """The evidence class of what ``address`` sent in rounds first..last: findings.TWO_WAY or ONE_WAY.

    The ONE place a source's evidence is classified. Two-way evidence is a completed TCP handshake
    with this host (``batch.handshakes``: flows showing SYN then ACK, or data with ACK, from that
    source; app/db/peers.py) on ``need`` or more distinct local (port, protocol) pairs, among
    ``ports`` when given. kind 'flood': the evidence is unanswered SYNs, one-way by definition;
    kind 'scan': two-way only when the source completed handshakes with at least ``need`` of the
    ports it is said to have scanned (a scan of completed connections); kind 'traffic': its traffic
    to a port (``ports``) carried a completed handshake. Everything else (SYN-only, UDP, ICMP
    toward ports) is one-way: a forger can send it with any source address.
    """
    if kind == "flood":
        return ONE_WAY
    done = {(port, proto) for round_id, port, proto in batch.handshakes.get(address, ())
            if first <= round_id <= last}
    if ports is not None:
        done &= set(ports)
    return TWO_WAY if len(done) >= max(1, need) else ONE_WAY


def source(batch: Batch, address: str, first: int, last: int, *, ports=None, need: int = 1,
           kind: str = "traffic", **numbers) -> Source:
    """A :class:`Source` with its evidence class over rounds first..last (see :func:`evidence_class`)."""
    return Source(address, evidence=evidence_class(batch, address, first, last, ports, need, kind), **numbers)


def top_sources(batch: Batch, value: int, protocol: str, first: int, last: int,
                limit: int = 5) -> list[tuple[str, int, int]]:
    """The sources that sent most to local port (value, protocol) in rounds first..last:
    (address, packets, bytes), most packets first (then by address). Per round the larger of the
    source_ports and flows evidence (partial: a lower bound of what each sent)."""
    rounds, addresses, packets, nbytes = batch.source_ports_of(value, protocol)
    inside = (rounds >= first) & (rounds <= last)
    totals: dict[str, list[int]] = {}
    for address, sent, size in zip(addresses[inside], packets[inside].tolist(), nbytes[inside].tolist()):
        total = totals.setdefault(address, [0, 0])
        total[0] += sent
        total[1] += size
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    return [(address, packets, nbytes) for address, (packets, nbytes) in ranked]


def port_sources(batch: Batch, value: int, protocol: str, port_packets: int, first: int, last: int,
                 limit: int = 5) -> tuple[list[Source], str | None]:
    """Top sources of one local port over rounds first..last and the dominant one.

    Returns ([Source(address, packets, bytes, share)], dominant address or None). share = packets /
    port_packets; a source dominates with share >= 0.5. The ephemeral bucket has no per-source
    evidence (its real ports are many) and gets no sources.
    """
    if value == EPHEMERAL:
        return [], None
    out = [source(batch, a, first, last, ports={(value, protocol)}, packets=int(p), bytes=int(b),
                  share=round(p / port_packets, 3) if port_packets else None)
           for a, p, b in top_sources(batch, value, protocol, first, last, limit)]
    dominant = out[0].address if out and out[0].share is not None and out[0].share >= 0.5 else None
    return out, dominant


def port_totals(batch: Batch, port_id: int, first: int, last: int) -> tuple[int, int, int]:
    """(packets, bytes, syn) of one port over rounds first..last."""
    rows = batch.port_stats_of(port_id)
    inside = rows[(rows[:, 0] >= first) & (rows[:, 0] <= last)]
    return int(inside[:, 2].sum()), int(inside[:, 3].sum()), int(inside[:, 6].sum())
