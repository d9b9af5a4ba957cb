"""The findings contract: the one shape of a finding, from detector to database to alert and report.

A :class:`Finding` is what a detector (rule or model) says about one port, or one source across
ports, over a span of rounds; it names the sources it holds responsible as :class:`Source` rows, each
with its share of the traffic and its **evidence class** (TWO_WAY or ONE_WAY). :meth:`Finding.to_json`
is what the ``anomalies.reasons`` column holds. Nothing here touches the database.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from app.db.outbound import OUTBOUND_DETECTORS
from app.services.ports import port_label

# the evidence classes: two-way, the source completed a TCP handshake with this host or carried on a
# conversation in which this host answered it (a forger cannot produce this without seeing the replies);
# one-way, SYN-only, UDP or ICMP toward ports, anything a forger can send with a false source
TWO_WAY = "two-way"
ONE_WAY = "one-way"
EVIDENCE_CLASSES = (TWO_WAY, ONE_WAY)

# keys of the reasons JSON that the contract itself owns; details may not use them
_OWN_KEYS = ("summary", "source", "sources", "covers", "forged_sources", "source_count")


@dataclass
class Source:
    """One source a finding names.

    packets/bytes: over the finding's rounds (toward the finding's port, or in all for a scan);
    share: packets / the port's packets (0-1), None where no port total applies; syn: SYNs sent;
    evidence: TWO_WAY or ONE_WAY; forged: True when the evidence is one-way and the address is a known
    two-way peer or its hop count does not match (see the blocklist's decisions), None when unjudged.
    """

    address: str
    packets: int = 0
    bytes: int = 0
    share: float | None = None
    syn: int = 0
    evidence: str = ONE_WAY
    forged: bool | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, data: dict) -> "Source":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Finding:
    """One anomaly (rules and model alike).

    port_id/port/protocol: the local port, None for findings spanning many ports (port_scan).
    score/threshold: in the detector's units (SYNs per round, distinct ports, window error ...).
    source: the main source address when one is responsible, else None; sources: every source
    named, main source first. source_count: how many distinct sources there were in all (a flood
    from forged sources names a few and counts the rest). covers: the (port_id, first_round_id,
    last_round_id) cells the finding implicates, kept out of the model's refit. id/evaluation_id are
    set once the finding is stored.
    """

    detector: str
    port_id: int | None
    port: int | None
    protocol: str | None
    first_round_id: int
    last_round_id: int
    score: float | None
    threshold: float | None
    source: str | None = None
    sources: list[Source] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    covers: list = field(default_factory=list)     # [(port_id | None, first_round_id, last_round_id)]
    source_count: int | None = None
    summary: str = ""                              # one line for people (alerts, CLI, CrowdSec messages)
    id: int | None = None
    evaluation_id: int | None = None

    def __post_init__(self) -> None:
        clash = set(self.details) & set(_OWN_KEYS)
        if clash:
            raise ValueError(f"finding details may not use the contract's own keys: {sorted(clash)}")

    # -- who -----------------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """Addresses named, main source first."""
        named = [s.address for s in self.sources]
        if self.source and self.source not in named:
            named.insert(0, self.source)
        return named

    def source_of(self, address: str) -> Source | None:
        return next((s for s in self.sources if s.address == address), None)

    @property
    def forged_sources(self) -> list[str]:
        return [s.address for s in self.sources if s.forged]

    @property
    def outbound(self) -> bool:
        """True for what this host (or a client behind it) SENT: its ``sources`` are destinations
        (a DNS tunnel's: the asking client), for which an evidence class means nothing: nobody can
        forge what this host sent."""
        return self.detector in OUTBOUND_DETECTORS

    # -- where ---------------------------------------------------------------------------------------
    @property
    def port_label(self) -> str:
        """'tcp/22', 'udp/ephemeral', or 'host' for a finding spanning ports (ports.port_label)."""
        return port_label(self.port, self.protocol)

    # -- the stored form -----------------------------------------------------------------------------
    def to_json(self) -> str:
        """The ``anomalies.reasons`` text: details flat, plus sources (and covers) under own keys.

        Detector-specific facts (scanned ports, model features, rule text) live in ``details`` and are
        stored flat beside ``sources`` at the top level, readable in ``sqlite3``:
        ``json_extract(reasons, '$.sources[0].address')``; :meth:`from_json` reads it back exactly."""
        data = dict(self.details)
        data["source"] = self.source
        data["sources"] = [s.to_dict() for s in self.sources]
        data["covers"] = [list(c) for c in self.covers]
        if self.source_count is not None:
            data["source_count"] = self.source_count
        if self.summary:
            data["summary"] = self.summary
        forged = self.forged_sources
        if forged:
            data["forged_sources"] = forged
        return json.dumps(data, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str, *, detector: str, port_id: int | None, port: int | None,
                  protocol: str | None, first_round_id: int, last_round_id: int, score: float | None,
                  threshold: float | None, id: int | None = None, evaluation_id: int | None = None) -> "Finding":
        """The inverse of :meth:`to_json`, given the row's own columns."""
        data = json.loads(text) if text else {}
        details = {k: v for k, v in data.items() if k not in _OWN_KEYS}
        return cls(detector=detector, port_id=port_id, port=port, protocol=protocol,
                   first_round_id=first_round_id, last_round_id=last_round_id, score=score,
                   threshold=threshold, source=data.get("source"),
                   sources=[Source.from_dict(s) for s in data.get("sources", [])],
                   details=details, covers=[tuple(c) for c in data.get("covers", [])],
                   source_count=data.get("source_count"), summary=data.get("summary") or "",
                   id=id, evaluation_id=evaluation_id)

    @classmethod
    def from_row(cls, row) -> "Finding":
        """From an ``anomalies`` row joined with ``ports`` (columns value AS port, protocol)."""
        keys = row.keys()
        return cls.from_json(row["reasons"], detector=row["detector"], port_id=row["port_id"],
                             port=row["port"] if "port" in keys else None,
                             protocol=row["protocol"] if "protocol" in keys else None,
                             first_round_id=row["first_round_id"], last_round_id=row["last_round_id"],
                             score=row["score"], threshold=row["threshold"], id=row["id"],
                             evaluation_id=row["evaluation_id"])


def readable_row(row) -> Finding:
    """:meth:`Finding.from_row`, or for a row whose reasons are not the contract's JSON (written by
    hand or by a much older portwatch) a Finding with the row's own columns and a summary saying so:
    a listing shows every row rather than stopping at one."""
    try:
        return Finding.from_row(row)
    except (ValueError, TypeError, AttributeError):
        keys = row.keys()
        return Finding(row["detector"], row["port_id"], row["port"] if "port" in keys else None,
                       row["protocol"] if "protocol" in keys else None, row["first_round_id"], row["last_round_id"],
                       row["score"], row["threshold"], source=row["source"] if "source" in keys else None,
                       summary="(its stored reasons are not a finding's JSON)", id=row["id"],
                       evaluation_id=row["evaluation_id"])


def _json_default(value):
    """numpy scalars and arrays inside details."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def anomaly_key(finding: Finding) -> str:
    """The cooldown key of a finding's alert: detector + port + source (an ongoing attack on the same
    port from the same source alerts once per cooldown, and a scan that grows keeps its key)."""
    where = "host" if finding.port is None else ("ephemeral" if finding.port == -1 else str(finding.port))
    return f"anomaly:{finding.detector}:{finding.protocol or '?'}/{where}:{finding.source or '-'}"
