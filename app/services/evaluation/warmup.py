"""Detectors that compare with "usual" wait until they have a baseline, and say so.

On a fresh store "usual" is undefined (the exfiltration rule's usual rate would be 0), so each such
detector needs rounds of history in its own look-back before it raises anything (:func:`of_batch`,
:func:`of_model`; the table: README, "What it does"). ``status``, the evaluation summary and
``anomalies list`` print :meth:`Warmup.text` ("exfiltration: warming up, 12 of 30 rounds").
"""
from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass

from app.config import Evaluator
from app.db import evaluations as dbe
from app.db import series as dbs
from app.services.evaluation.batch import Batch

ALL = 2 ** 62           # a round id above every stored one


@dataclass(frozen=True)
class Warmup:
    """One detector's baseline: ``rounds`` of history it has, ``needed`` before it raises anything."""

    detector: str
    rounds: int
    needed: int

    @property
    def ready(self) -> bool:
        return self.rounds >= self.needed

    def text(self) -> str:
        if self.ready:
            return f"{self.detector}: ready ({self.rounds} rounds of history)"
        return f"{self.detector}: warming up, {self.rounds} of {self.needed} rounds"

    def as_dict(self) -> dict:
        return {**asdict(self), "ready": self.ready, "text": self.text()}


def of_batch(batch: Batch, cfg: Evaluator) -> list[Warmup]:
    """The rule detectors' baselines for a loaded batch: exfiltration, the rounds before the judged ones
    within evaluator.exfiltration_baseline_seconds (its usual rates), at least
    evaluator.exfiltration_warmup_rounds; beaconing, those within evaluator.beacon_span_seconds (the
    connections it looks back over), at least evaluator.beacon_warmup_rounds."""
    return [Warmup("exfiltration", int(batch.baseline_rounds), int(cfg.exfiltration_warmup_rounds)),
            Warmup("beaconing", len(batch.beacon_rounds), int(cfg.beacon_warmup_rounds))]


def of_model(history: int, cfg: Evaluator, origin: str | None = None) -> Warmup:
    """The model's: ``history`` rounds stored up to the batch's last (the judged ones included: it trains
    on them), at least evaluator.warmup_rounds; a fleet model needs none (learned elsewhere)."""
    return Warmup("model", int(history), 0 if origin == "fleet" else int(cfg.warmup_rounds))


def ready(warmups: list[Warmup], detector: str) -> bool:
    """True when ``detector`` has its baseline (a detector not listed needs none)."""
    return all(w.ready for w in warmups if w.detector == detector)


def pending(warmups: list[Warmup]) -> list[Warmup]:
    return [w for w in warmups if not w.ready]


def next_evaluation(conn: sqlite3.Connection, cfg: Evaluator, now: float) -> list[Warmup]:
    """What the next evaluation will have: history before its first round (the first round not yet
    judged; ``now`` when every round is judged), the model's over every round stored."""
    after = dbe.last_evaluated_round(conn)
    upcoming = dbs.rounds_after(conn, after, 1)
    if upcoming:
        first, start = upcoming[0]["id"], upcoming[0]["end_time"]
    else:
        first, start = ALL, now
    model = dbe.active_model(conn)
    rules = [Warmup("exfiltration", dbs.count_rounds_since(conn, start - cfg.exfiltration_baseline_seconds, first),
                    int(cfg.exfiltration_warmup_rounds)),
             Warmup("beaconing", dbs.count_rounds_since(conn, start - cfg.beacon_span_seconds, first),
                    int(cfg.beacon_warmup_rounds))]
    history = dbs.count_rounds(conn, ALL)
    return rules + [of_model(history, cfg, model["origin"] if model is not None else None)]
