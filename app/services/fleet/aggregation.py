"""How the coordinator combines the hosts' weights: a strategy that bounds one member's influence
(:func:`strategy`; README, "One model (Flower)", compares them, measured in bench/fleet.py).

Runs inside the ServerApp (imports Flower). Whatever the strategy, a host's window count is capped at
the round's median count before it weighs anything (:func:`cap_counts`).
"""
from __future__ import annotations

import logging
import statistics
import time

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum

log = logging.getLogger(__name__)

STRATEGIES = ("trimmed-mean", "median", "krum", "fedavg")
WINDOWS_KEY = "num-windows"


def cap_counts(counts: list[float]) -> list[float]:
    """Each count at most the median of ``counts`` (a host cannot buy weight by claiming windows): a host
    reporting a billion windows weighs as much as a typical one (counts are claims the coordinator
    cannot verify)."""
    if not counts:
        return []
    cap = statistics.median(counts)
    return [min(c, cap) for c in counts]


class Contributions:
    """What the coordinator saw of each host this federation (node id -> facts; counts only)."""

    def __init__(self):
        self.hosts: dict[int, dict] = {}

    def trained(self, replies) -> None:
        """Cap the train replies' window counts in place and remember each node's contribution."""
        replies = [m for m in replies if m.has_content() and "metrics" in m.content.metric_records]
        counts = [float(m.content["metrics"].get(WINDOWS_KEY, 0)) for m in replies]
        for msg, reported, capped in zip(replies, counts, cap_counts(counts)):
            msg.content["metrics"][WINDOWS_KEY] = int(capped)
            self.hosts.setdefault(int(msg.metadata.src_node_id), {}).update(
                last_contribution=time.time(), reported_windows=int(reported), weighed_windows=int(capped))
            if capped < reported:
                log.warning("fleet: node %s claimed %d windows; it weighs as the round's median, %d",
                            msg.metadata.src_node_id, reported, capped)

    def evaluated(self, replies) -> None:
        """Remember the model version each node runs after the federation, and whether it adopted."""
        for msg in replies:
            if not msg.has_content() or "metrics" not in msg.content.metric_records:
                continue
            m = msg.content["metrics"]
            self.hosts.setdefault(int(msg.metadata.src_node_id), {}).update(
                model_version=int(m.get("active-version", 0)) or None, adopted=bool(m.get("adopted", 0)),
                refusal=int(m.get("refusal", 0)), fleet_version=int(m.get("version", 0)) or None)


def strategy(name: str, trim_fraction: float, contributions: Contributions, **kwargs):
    """The Flower strategy ``name`` (one of STRATEGIES, ``fleet.aggregation``), its train replies' counts
    capped and recorded:

        trimmed-mean  (default) per weight, the mean after dropping the ``fleet.trim_fraction`` highest and
                      lowest values (at least one each side from 3 hosts on): one host sending weights
                      scaled x100 or random moves no coordinate beyond the honest hosts' range
        median        per weight, the median of the hosts' values
        krum          the one host's weights closest to its neighbours' (Krum, assuming one bad member)
        fedavg        the mean weighted by window counts: one bad member moves it as far as it likes
                      (kept to compare; never the default)
    """
    if name not in STRATEGIES:
        raise ValueError(f"fleet.aggregation {name!r} is not one of {', '.join(STRATEGIES)}")
    base = {"trimmed-mean": FedTrimmedAvg, "median": FedMedian, "krum": MultiKrum, "fedavg": FedAvg}[name]
    extra = {"trimmed-mean": {"beta": trim_fraction},
             "krum": {"num_malicious_nodes": 1, "num_nodes_to_select": 1}}.get(name, {})

    class Capped(base):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            contributions.trained(replies)
            if name == "trimmed-mean" and len(replies) >= 3:
                # at least one host trimmed each side, whatever the fleet's size (beta < 0.5)
                self.beta = min(max(trim_fraction, 1.0 / len(replies) + 1e-9), 0.499)
            return super().aggregate_train(server_round, replies)

    return Capped(weighted_by_key=WINDOWS_KEY, **extra, **kwargs)
