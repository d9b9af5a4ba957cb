"""A report's anomalies read through the findings contract (:meth:`Finding.from_row`): the finding of an
anomalies row, a model finding's per-feature contributions (``details["features"]``: a list of
``{feature, observed, reconstructed, error, share}``), the addresses it names, and its one-line reason.
Pure functions of rows; imported by facts.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from app.services.evaluation.findings import Finding

log = logging.getLogger(__name__)


@dataclass
class FeatureContribution:
    """One feature of a model anomaly: its share of the reconstruction error and the two values."""
    name: str
    contribution: float
    observed: float | None = None
    reconstructed: float | None = None


def finding_of(row) -> Finding | None:
    """The finding an anomalies row holds, or None when its reasons are not the contract's JSON
    (the report then shows the row without detail rather than failing)."""
    try:
        return Finding.from_row(row)
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("anomaly #%s: reasons are not a finding's JSON (%s); shown without detail", row["id"], exc)
        return None


def feature_contributions(finding: Finding | None) -> list[FeatureContribution]:
    """A model finding's features (``details["features"]``), in the order written; none when they
    do not have the contract's keys (feature, share; observed and reconstructed when known)."""
    if finding is None:
        return []
    try:
        return [FeatureContribution(f["feature"], float(f["share"]), f.get("observed"), f.get("reconstructed"))
                for f in finding.details.get("features", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("anomaly #%s: features without the contract's keys (%s); shown without detail", finding.id, exc)
        return []


def anomaly_sources(rows: Iterable) -> list[str]:
    """Every address the anomalies name: the row's main source, then its finding's sources."""
    sources: list[str] = []
    for row in rows:
        if row["source"]:
            sources.append(row["source"])
        finding = finding_of(row)
        if finding is not None:
            sources.extend(finding.addresses)
    return sources


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} items" if len(value) > 4 else ", ".join(_value_text(v) for v in value)
    return str(value)


def reason_text(row, max_sources: int = 3) -> str:
    """Why a finding was raised, in one line: its summary, its sources (packets, share, evidence),
    for a model finding the features that drove it (observed vs reconstructed), else its scalar details."""
    finding = finding_of(row)
    if finding is None:
        return (row["reasons"] or "-")[:200]
    parts = [finding.summary] if finding.summary else []       # the contract's one line, when the detector wrote one
    if finding.outbound:           # its sources are destinations: the summary says what was sent to them
        pass
    elif finding.sources:
        shown = []
        for s in finding.sources[:max_sources]:
            share = f", {s.share:.0%}" if s.share is not None else ""
            packets = f"{s.packets} pkts, " if s.packets else ""
            shown.append(f"{s.address} ({packets}{share.lstrip(', ')}{', ' if share else ''}"
                         f"{s.evidence.replace('_', '-')})")
        more = (finding.source_count or len(finding.sources)) - len(shown)
        parts.append("sources " + "; ".join(shown) + (f" (+{more} more)" if more > 0 else ""))
    elif finding.source:
        parts.append(f"source {finding.source}")
    features = feature_contributions(finding)
    if features:
        top = sorted(features, key=lambda f: -f.contribution)[:3]
        parts.append("driven by " + ", ".join(
            f"{f.name} {_value_text(f.observed) if f.observed is not None else '?'} vs usual "
            f"{_value_text(f.reconstructed) if f.reconstructed is not None else '?'} ({f.contribution:.0%})" for f in top))
    else:
        scalars = [(k, v) for k, v in sorted(finding.details.items())
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in ("port", "protocol")]
        if scalars:
            parts.append(", ".join(f"{k.replace('_', ' ')} {_value_text(v)}" for k, v in scalars[:5]))
    return "; ".join(parts) or "-"

