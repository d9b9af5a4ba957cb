"""The report's blocklist facts and its ONE drop total: entries in force over time, block/expire/remove
events, and the packets dropped (app/db/report_rates.drop_total: the rounds' XDP drop counter) split by
blocked address where the per-round rows allow (the rest: GONE). Plain data; nothing here draws.
``since``: Unix epoch seconds or None for everything."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from app.db import report_rates as rates
from app.db import reports as queries


def active_counts(entries: Iterable, times: list[float]) -> list[int]:
    """Blocklist entries in force at each time: created_at <= t < (removed_at or expires_at)."""
    spans = []
    for entry in entries:
        end = entry["removed_at"] if entry["removed_at"] is not None else entry["expires_at"]
        spans.append((entry["created_at"], end if end is not None else float("inf")))
    return [sum(1 for start, end in spans if start <= t < end) for t in times]


@dataclass
class Blocklist:
    """Entries in force over time, block/expire/remove events, drops per second by address and round
    (the five addresses that lost most, the rest summed as 'other addresses', and GONE), and the
    window's drop total (rates.drop_total: the one drop count the whole report shows)."""
    entries: list
    events: list
    times: list[float]
    in_force: list[int]
    round_ends: list[float]
    drop_labels: list[str]
    drop_series: list[list[float]]
    total_drops: int


GONE = "entries gone before the round closed"   # drops of entries removed or expired between rounds


def drops_by_address(conn, since: float | None) -> dict[str, int]:
    """The window's drops per blocked address (blacklist_drops), plus GONE: what the rounds' drop
    counter holds beyond them. Sums to the one drop total (rates.drop_total)."""
    totals: dict[str, int] = {}
    for row in rates.drops_by_round_and_address(conn, since):
        totals[row["address"]] = totals.get(row["address"], 0) + row["drops"]
    gone = rates.drop_total(conn, since) - sum(totals.values())
    if gone > 0:
        totals[GONE] = gone
    return totals


def replies_by_address(conn, since: float | None) -> dict[str, int]:
    """The window's answers to this host's own conversations each blocked address let through."""
    totals: dict[str, int] = {}
    for row in rates.drops_by_round_and_address(conn, since):
        if row["replies"]:
            totals[row["address"]] = totals.get(row["address"], 0) + row["replies"]
    return totals


def _drop_stacks(drops, rounds_rows, round_ends: list[float]) -> tuple[list[str], list[list[float]]]:
    """Drops per second per round: the five addresses that lost most, 'other addresses', and GONE
    (a round's XDP drop counter beyond its per-address rows)."""
    totals: dict[str, int] = {}
    for row in drops:
        totals[row["address"]] = totals.get(row["address"], 0) + row["drops"]
    top = sorted(totals, key=totals.get, reverse=True)[:5]
    index = {t: i for i, t in enumerate(round_ends)}
    stacks = {address: [0.0] * len(round_ends) for address in top}
    other = [0.0] * len(round_ends)
    gone = [0.0] * len(round_ends)
    for row in drops:
        stacks.get(row["address"], other)[index[row["end_time"]]] += row["drops"] / row["seconds"]
    for row in rounds_rows:
        if row["drops"] > row["attributed"] and row["end_time"] in index:
            gone[index[row["end_time"]]] += (row["drops"] - row["attributed"]) / row["seconds"]
    labels = [f"{a} ({totals[a]} total)" for a in top]
    series = [stacks[a] for a in top]
    for label, values in (("other addresses", other), (GONE, gone)):
        if any(values):
            labels.append(label)
            series.append(values)
    return labels, series


def load_blocklist(conn, since: float | None, now: float) -> Blocklist | None:
    entries = queries.blacklist_entries(conn, since)
    events = queries.blacklist_events(conn, since)
    drops = rates.drops_by_round_and_address(conn, since)
    total = rates.drop_total(conn, since)
    if not entries and not events and not drops and not total:
        return None
    round_times = queries.round_times(conn, since)
    marks = sorted({t for e in entries for t in (e["created_at"], e["removed_at"], e["expires_at"])
                    if t is not None and (since is None or t >= since) and 0 <= t <= now})
    times = sorted(set(round_times) | set(marks))
    round_ends: list[float] = []
    labels: list[str] = []
    series: list[list[float]] = []
    if total:
        round_ends = sorted({row["end_time"] for row in drops} | set(round_times))
        labels, series = _drop_stacks(drops, rates.round_rates(conn, since), round_ends)
    return Blocklist(entries, events, times, active_counts(entries, times), round_ends, labels, series, total)


