"""Score a store's findings and blocks against labelled attacks: precision, recall, time to detect.

:func:`read_labels` reads the labels CSV (a header line ``start,end,address,detector,label``; the columns:
README, "Try it on a capture") and :func:`score` counts findings and blocks against it. Used by
``python -m app score``; reads the store through app/db/score.py only.
"""
from __future__ import annotations

import csv
import ipaddress
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from app.db import score as db
from app.errors import UsageError

BENIGN = "benign"


@dataclass
class Label:
    start: float
    end: float
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    detector: str
    label: str
    line: int

    @property
    def attack(self) -> bool:
        return self.label != BENIGN


def _time(text: str, path, line: int) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{path} line {line}: {text!r} is neither Unix seconds nor an ISO 8601 time") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def read_labels(path: str | Path) -> list[Label]:
    """The labels of a CSV file; UsageError naming the file and line for the first bad row.

    start/end are Unix seconds or ISO 8601 (UTC when no zone is given); address is an address or CIDR;
    detector is empty (any detector may find it) or a detector name (only that one is expected to);
    label is ``benign`` or the attack's name."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise UsageError(f"cannot read the labels {path}: {exc.strerror}") from None
    if not rows or [c.strip().lower() for c in rows[0][:5]] != ["start", "end", "address", "detector", "label"]:
        raise UsageError(f"{path} must start with the header line start,end,address,detector,label")
    labels = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 5:
            raise UsageError(f"{path} line {line}: expected 5 fields (start,end,address,detector,label), got {len(row)}")
        start, end = _time(row[0], path, line), _time(row[1], path, line)
        if end < start:
            raise UsageError(f"{path} line {line}: the end is before the start")
        try:
            network = ipaddress.ip_network(row[2].strip(), strict=False)
        except ValueError:
            raise UsageError(f"{path} line {line}: {row[2].strip()!r} is not an address or CIDR") from None
        label = row[4].strip().lower()
        if not label:
            raise UsageError(f"{path} line {line}: the label is empty (benign, or the attack's name)")
        labels.append(Label(start, end, network, row[3].strip(), label, line))
    return labels


@dataclass
class DetectorScore:
    detector: str
    true_positives: int = 0
    false_positives: int = 0
    attacks: int = 0                 # attack labels this detector is expected to find
    attacks_found: int = 0
    detect_seconds: list = field(default_factory=list)   # per found attack: first detection - its start

    @property
    def false_negatives(self) -> int:
        return self.attacks - self.attacks_found

    @property
    def precision(self) -> float | None:
        n = self.true_positives + self.false_positives
        return self.true_positives / n if n else None

    @property
    def recall(self) -> float | None:
        return self.attacks_found / self.attacks if self.attacks else None

    def to_dict(self) -> dict:
        ttd = self.detect_seconds
        return {"detector": self.detector, "true_positives": self.true_positives,
                "false_positives": self.false_positives, "false_negatives": self.false_negatives,
                "attacks": self.attacks, "precision": self.precision, "recall": self.recall,
                "ttd_median_seconds": statistics.median(ttd) if ttd else None,
                "ttd_max_seconds": max(ttd) if ttd else None}


@dataclass
class Score:
    detectors: list[DetectorScore]
    innocents_blocked: list[str]
    attackers_blocked: list[str]
    benign_hours: float
    false_per_benign_hour: float | None

    def to_dict(self) -> dict:
        return {"detectors": [d.to_dict() for d in self.detectors], "innocents_blocked": self.innocents_blocked,
                "attackers_blocked": self.attackers_blocked, "benign_hours": round(self.benign_hours, 4),
                "false_findings_per_benign_hour": self.false_per_benign_hour}

    def table(self) -> str:
        def pct(v):
            return "-" if v is None else f"{100 * v:.0f}%"

        def secs(v):
            return "-" if v is None else f"{v:.0f} s"
        head = f"{'detector':<16} {'TP':>4} {'FP':>4} {'FN':>4} {'precision':>9} {'recall':>7} {'TTD median':>10} {'TTD max':>8}"
        lines = [head]
        for d in self.detectors:
            x = d.to_dict()
            lines.append(f"{d.detector:<16} {d.true_positives:>4} {d.false_positives:>4} {d.false_negatives:>4} "
                         f"{pct(d.precision):>9} {pct(d.recall):>7} {secs(x['ttd_median_seconds']):>10} "
                         f"{secs(x['ttd_max_seconds']):>8}")
        rate = "-" if self.false_per_benign_hour is None else f"{self.false_per_benign_hour:.2f}"
        lines.append(f"blocks: {len(self.attackers_blocked)} attackers, {len(self.innocents_blocked)} innocents"
                     + (f" ({', '.join(self.innocents_blocked)})" if self.innocents_blocked else ""))
        lines.append(f"false findings per benign hour: {rate} (over {self.benign_hours:.2f} benign hours)")
        return "\n".join(lines)


def _matches(finding: dict, label: Label) -> bool:
    """A finding matches a label when the label's detector is empty or the finding's, one of the
    addresses the finding names is inside the label's network, and the finding's rounds overlap
    [start, end]."""
    if label.detector and label.detector != finding["detector"]:
        return False
    start, end = finding["start"], finding["end"]
    if start is None or end is None or end < label.start or start > label.end:
        return False
    for text in finding["addresses"]:
        try:
            if ipaddress.ip_address(text) in label.network:
                return True
        except ValueError:
            continue
    return False


def _detected_at(finding: dict, span: tuple) -> float:
    """When the finding was stored if that lies in the store's time (a replay evaluated with
    ``--evaluate-every``), else the end of its first round."""
    lo, hi = span
    created = finding["created_at"]
    if lo is not None and hi is not None and created is not None and lo <= created <= hi:
        return max(created, finding["first_end"] or created)
    return finding["first_end"] if finding["first_end"] is not None else created


def score(conn, labels: list[Label]) -> Score:
    """Findings and blocks of the store ``conn`` against ``labels`` (matching: :func:`_matches`).

    Per detector: TP = its findings matching an attack label, FP = its findings matching none, FN =
    attack labels naming that detector that none of its findings matched; recall counts those labels;
    time to detect = the finding's detection time (:func:`_detected_at`) minus the attack's start. Row
    ``all``: every finding, and every attack label matched by any finding whose detector it allows.
    Blocks: entries covering a benign-labelled address (innocents) or an attack-labelled one. False
    findings per benign hour: FP of all detectors over :func:`_benign_hours`."""
    found = db.findings(conn)
    span = db.round_span(conn)
    attacks = [lb for lb in labels if lb.attack]
    names = sorted({f["detector"] for f in found} | {lb.detector for lb in attacks if lb.detector})
    per = {name: DetectorScore(name) for name in names}
    overall = DetectorScore("all", attacks=len(attacks))
    first_by: dict[tuple[str, int], float] = {}          # (detector, label index) -> earliest detection
    for f in found:
        hits = [i for i, lb in enumerate(attacks) if _matches(f, lb)]
        d = per[f["detector"]]
        if hits:
            d.true_positives += 1
            overall.true_positives += 1
        else:
            d.false_positives += 1
            overall.false_positives += 1
        when = _detected_at(f, span)
        for i in hits:
            for key in ((f["detector"], i), ("all", i)):
                first_by[key] = min(first_by.get(key, when), when)
    for i, lb in enumerate(attacks):
        if lb.detector:
            per[lb.detector].attacks += 1
            if (lb.detector, i) in first_by:
                per[lb.detector].attacks_found += 1
                per[lb.detector].detect_seconds.append(first_by[(lb.detector, i)] - lb.start)
        if ("all", i) in first_by:
            overall.attacks_found += 1
            overall.detect_seconds.append(first_by[("all", i)] - lb.start)
    innocents, attackers = _blocks(conn, labels)
    benign = _benign_hours(span, [lb for lb in labels if not lb.attack], attacks)
    return Score([per[n] for n in names] + [overall], innocents, attackers, benign,
                 overall.false_positives / benign if benign > 0 else None)


def _blocks(conn, labels: list[Label]) -> tuple[list[str], list[str]]:
    innocents, attackers = [], []
    for row in db.blocks(conn):
        try:
            net = ipaddress.ip_network(row["address"], strict=False)
        except ValueError:
            continue
        over = [lb for lb in labels if lb.network.version == net.version and lb.network.overlaps(net)]
        if any(lb.attack for lb in over):
            attackers.append(row["address"])
        elif over:
            innocents.append(row["address"])
    return innocents, attackers


def _union_seconds(lo: float, hi: float, spans) -> float:
    """Seconds of [lo, hi] covered by the union of (start, end) ``spans``."""
    total, cur_lo, cur_hi = 0.0, None, None
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi):
        if cur_hi is None or a > cur_hi:
            total += (cur_hi - cur_lo) if cur_hi is not None else 0.0
            cur_lo, cur_hi = a, b
        else:
            cur_hi = max(cur_hi, b)
    return total + ((cur_hi - cur_lo) if cur_hi is not None else 0.0)


def _benign_hours(span: tuple, benign: list[Label], attacks: list[Label]) -> float:
    """Hours of the store's span with benign-labelled traffic; without benign labels, the span outside
    every attack label."""
    lo, hi = span
    if lo is None or hi is None or hi <= lo:
        return 0.0
    if benign:
        return _union_seconds(lo, hi, [(lb.start, lb.end) for lb in benign]) / 3600.0
    return max(0.0, hi - lo - _union_seconds(lo, hi, [(lb.start, lb.end) for lb in attacks])) / 3600.0
