"""What the report shows, read from the store: plain data for the figures and the page.

Nothing here draws or writes HTML. The ``load_*`` functions read through ``app.db.reports``
(a read-only connection and ``since``: Unix epoch seconds, UTC, or None for everything); the rest
are pure functions of rows. Anomalies are read through the findings contract (anomalies.py).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from app import durations
from app.db import report_rates as rates
from app.db import reports as queries
from app.errors import UsageError
from app.services.ops.reports.anomalies import FeatureContribution, finding_of, feature_contributions, anomaly_sources, reason_text
from app.services.ops.reports.drops import drops_by_address, replies_by_address
from app.services.ports import port_label
from app.services.text import plural, utc

from app.services.text import utc

log = logging.getLogger(__name__)

# what a model finding's per-feature "share" is, for the contribution figure's axis
CONTRIBUTION_MEASURE = "share of the reconstruction error (0-1)"


def parse_since(text: str | float | int | None, now: float | None = None) -> float | None:
    """Start of the report window as Unix epoch seconds, or None for everything.

    Accepts a number (epoch seconds), ``all``, a relative span (``90s``, ``30m``, ``24h``, ``7d``,
    ``2w``) counted back from ``now``, or an ISO date/time (``2024-05-01``, ``2024-05-01T12:00``,
    ``2024-05-01 12:00:00+02:00``); an ISO time without a zone is UTC, like the database views.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip()
    if value.lower() in ("", "all"):
        return None
    now = time.time() if now is None else now
    if value[-1:].lower() in durations.UNIT_SECONDS:      # a span (24h, 7d): the one duration parser
        return now - durations.flag("--since", value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r} is neither an ISO date/time (2024-05-01T12:00) nor a span "
                         "like 24h or 7d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def fmt_time(t: float | None) -> str:
    return utc(t)


# -- pure helpers ----------------------------------------------------------------------------------

def figure_name_for_port(value: int, protocol: str) -> str:
    port = "ephemeral" if value == -1 else str(int(value))
    return f"port_{re.sub(r'[^a-z0-9]', '', protocol.lower()) or 'other'}_{port}.png"


def _covers(entry: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("/")[0]) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return entry.split("/")[0] == address.split("/")[0]


def blocked_for(anomaly_ids: set[int], sources: Iterable[str], entries: Iterable) -> list[str]:
    """Blocklist addresses tied to these anomalies: by anomaly_id, or covering one of their sources."""
    sources = [s for s in sources if s]
    blocked = []
    for entry in entries:
        if entry["anomaly_id"] in anomaly_ids or any(_covers(entry["address"], s) for s in sources):
            if entry["address"] not in blocked:
                blocked.append(entry["address"])
    return blocked


@dataclass
class OccupancyChange:
    """A listener that appeared or went away, or a port whose owning process changed, at round end."""
    at: float
    round_id: int
    port: str
    kind: str            # 'new listener', 'listener gone', 'process change'
    detail: str


def occupancy_changes(rows: Iterable, scanned: list[tuple[int, float]]) -> tuple[list[tuple[float, int]], list[OccupancyChange]]:
    """Compare each scanned round's listeners with the previous scanned round's.

    rows: (round_id, end_time, value, protocol, pid, process) in round order (queries.occupancy);
    scanned: (round_id, end_time) of the rounds whose scanner ran, the first being the baseline.
    Returns ([(end_time, listeners)] per scanned round after the baseline, [OccupancyChange]).
    """
    by_round: dict[int, dict[tuple[int, str], set[str]]] = {}
    for row in rows:
        listeners = by_round.setdefault(row["round_id"], {})
        name = row["process"] or (f"pid {row['pid']}" if row["pid"] is not None else "unknown process")
        listeners.setdefault((row["value"], row["protocol"]), set()).add(name)
    counts: list[tuple[float, int]] = []
    changes: list[OccupancyChange] = []
    previous = None
    for round_id, end_time in scanned:
        current = by_round.get(round_id, {})
        if previous is not None:
            counts.append((end_time, len(current)))
            for key in sorted(set(current) - set(previous), key=lambda k: (k[1], k[0])):
                changes.append(OccupancyChange(end_time, round_id, port_label(*key, long=True), "new listener",
                                               ", ".join(sorted(current[key]))))
            for key in sorted(set(previous) - set(current), key=lambda k: (k[1], k[0])):
                changes.append(OccupancyChange(end_time, round_id, port_label(*key, long=True), "listener gone",
                                               ", ".join(sorted(previous[key]))))
            for key in sorted(set(previous) & set(current), key=lambda k: (k[1], k[0])):
                if previous[key] != current[key]:
                    changes.append(OccupancyChange(
                        end_time, round_id, port_label(*key, long=True), "process change",
                        f"{', '.join(sorted(previous[key]))} -> {', '.join(sorted(current[key]))}"))
        else:
            counts.append((end_time, len(current)))
        previous = current
    return counts, changes


# -- facts per figure, loaded from the store -------------------------------------------------------

@dataclass
class Traffic:
    """Per-round rows by interface (round_id, covered_from, end_time, seconds: the span the counts
    cover, interface, total_packets, unparsed_packets, drops: the rounds' XDP drop counter,
    attributed), the host-wide anomalies (port scans) and what they got blocked."""
    by_interface: dict[str, list]
    hostwide: list
    blocked: list[str]

    @property
    def total_drops(self) -> int:
        return sum(r["drops"] for rows in self.by_interface.values() for r in rows)


def rate_steps(rows, count) -> tuple[list[float], list[float]]:
    """A step line of per-second rates: each round is a flat segment over the span its counts cover
    (covered_from .. end_time), at ``count(row) / row["seconds"]``; segments that do not touch
    (a span nothing covered) are separated by a NaN so no line is drawn across the hole.
    Returns (times in epoch seconds, rates per second), for plot(..., drawstyle='default')."""
    times: list[float] = []
    values: list[float] = []
    for row in rows:
        rate = count(row) / row["seconds"]
        if times and row["covered_from"] > times[-1] + 1e-6:
            times.append(times[-1])
            values.append(float("nan"))
        times += [row["covered_from"], row["end_time"]]
        values += [rate, rate]
    return times, values


def load_traffic(conn, since: float | None, entries) -> Traffic | None:
    rows = rates.round_rates(conn, since)
    if not rows:
        return None
    hostwide = queries.hostwide_anomalies(conn, since)
    by_interface: dict[str, list] = {}
    for row in rows:
        by_interface.setdefault(row["interface"], []).append(row)
    return Traffic(by_interface, hostwide, blocked_for({a["id"] for a in hostwide}, anomaly_sources(hostwide), entries))


@dataclass
class PortFacts:
    """One port's series (round_id, covered_from, end_time, seconds, packets, bytes, syn: divide by
    seconds for rates), its anomalies with their spans, the blocked sources tied to them, its label
    and figure file name. The folded small ports ("other ports") are one PortFacts too."""
    protocol: str
    label: str
    file: str
    series: list
    anomalies: list
    blocked: list[str]
    other: bool = False

    @property
    def flagged(self) -> bool:
        return bool(self.anomalies)


OTHER_PORTS_FILE = "port_other.png"
MIN_PORT_SHARE = 0.01        # an unflagged port with less of the window's packets is folded into "other ports"


def load_port(conn, since: float | None, port, entries) -> PortFacts:
    if port["port_id"] is None:                 # the folded small ports (chart_ports)
        label = f"other ports ({port['ports']} {plural(port['ports'], 'port')}, {port['packets']} packets)"
        return PortFacts("other", label, OTHER_PORTS_FILE,
                         rates.port_rate_series(conn, port["port_ids"], since), [], [], other=True)
    anomalies = queries.port_anomalies(conn, port["port_id"], since)
    return PortFacts(port["protocol"], port_label(port["value"], port["protocol"], long=True),
                     figure_name_for_port(port["value"], port["protocol"]),
                     rates.port_rate_series(conn, [port["port_id"]], since), anomalies,
                     blocked_for({a["id"] for a in anomalies}, anomaly_sources(anomalies), entries))


def chart_ports(conn, since: float | None, top: int) -> list:
    """The ports that get a figure: the ``top`` most anomalous, then the ``top`` busiest not already
    in that carry at least MIN_PORT_SHARE of the window's port packets (the busiest ports are
    always charted, flagged or not); every other port with traffic is summed into one last entry
    {port_id: None, port_ids, ports, packets, value: None, protocol: 'other'} ("other ports")."""
    ports = [dict(p) for p in queries.most_anomalous_ports(conn, since, max(0, top))]
    seen = {p["port_id"] for p in ports}
    n_ports, all_packets = rates.port_totals(conn, since)
    for row in rates.busiest_ports(conn, since, max(0, top)):
        if row["port_id"] not in seen and row["packets"] >= MIN_PORT_SHARE * all_packets:
            ports.append(dict(row))
            seen.add(row["port_id"])
    rest = [r for r in rates.busiest_ports(conn, since, n_ports) if r["port_id"] not in seen]
    if rest and top > 0:
        ports.append({"port_id": None, "port_ids": [r["port_id"] for r in rest], "ports": len(rest),
                      "packets": sum(r["packets"] for r in rest), "value": None, "protocol": "other"})
    return ports


@dataclass
class ModelScores:
    """Model anomalies' scores, each evaluation's threshold, the model's error per judged round
    (``errors``: at, max_error, median_error, model_version, threshold) and ``end``: until when the
    last threshold holds (the last evaluation, anomaly or round)."""
    scores: list
    thresholds: list
    errors: list
    end: float | None


def load_model_scores(conn, since: float | None) -> ModelScores | None:
    scores = queries.model_scores(conn, since)
    thresholds = queries.evaluation_thresholds(conn, since)
    errors = queries.model_round_errors(conn, since)
    if not scores and not thresholds and not errors:
        return None
    end = None
    if thresholds or errors:
        end = max([r["at"] for r in thresholds] + [r["created_at"] for r in scores] + [r["at"] for r in errors]
                  + queries.round_times(conn, since)[-1:])
    return ModelScores(scores, thresholds, errors, end)


@dataclass
class ModelAnomaly:
    """A model anomaly as the contribution figure shows it."""
    id: int
    created_at: float
    score: float | None
    threshold: float | None
    port: str
    features: list[FeatureContribution] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    reasons: str | None = None        # the stored JSON, for the table of anomalies without features


def load_model_anomalies(conn, since: float | None, limit: int) -> list[ModelAnomaly]:
    """The most recent model anomalies, newest first."""
    out = []
    for row in queries.model_anomalies(conn, since, max(0, limit)):
        finding = finding_of(row)
        named = finding.addresses if finding is not None else []
        out.append(ModelAnomaly(row["id"], row["created_at"], row["score"], row["threshold"],
                                port_label(row["port"], row["protocol"], long=True), feature_contributions(finding),
                                named or ([row["source"]] if row["source"] else []), row["reasons"]))
    return out


@dataclass
class Occupancy:
    """Listening ports per scanned round in the window, and every change (see occupancy_changes)."""
    counts: list[tuple[float, int]]
    changes: list[OccupancyChange]


def load_occupancy(conn, since: float | None) -> Occupancy:
    counts, changes = occupancy_changes(queries.occupancy(conn, since), queries.scanned_round_ids(conn, since))
    counts = [(t, n) for t, n in counts if since is None or t >= since]   # the baseline round may precede it
    return Occupancy(counts, changes)


@dataclass
class Contents:
    """What the whole report covers: the overview counts, the most anomalous ports (port_id, value,
    protocol, ...), blocklist entries ever made (for naming blocked sources), the model anomalies
    that get a contribution figure, and the rows of the anomaly and blocklist tables."""
    overview: dict
    ports: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    model_anomalies: list[ModelAnomaly] = field(default_factory=list)
    recent_anomalies: list = field(default_factory=list)      # [(row, reason text)]
    blocklist_rows: list = field(default_factory=list)
    window_drops: dict = field(default_factory=dict)          # address (or GONE) -> drops in the window
    window_replies: dict = field(default_factory=dict)        # address -> answers it passed in the window

    @property
    def empty(self) -> bool:
        o = self.overview
        return o["rounds"] == 0 and o["anomalies"] == 0 and o["evaluations"] == 0 and o["blacklist_entries"] == 0


def load_contents(conn, since: float | None, top_ports: int, max_anomaly_figures: int, table_rows: int) -> Contents:
    """The report's contents; only the overview when the window holds nothing at all."""
    contents = Contents(queries.overview(conn, since))
    contents.window_drops = drops_by_address(conn, since)
    contents.window_replies = replies_by_address(conn, since)
    # one drop count everywhere: the rounds' XDP drop counter (rates.drop_total), split by address
    contents.overview["dropped_packets"] = rates.drop_total(conn, since)
    if contents.empty:
        return contents
    contents.ports = chart_ports(conn, since, top_ports)
    contents.entries = queries.blocked_addresses(conn)
    contents.model_anomalies = load_model_anomalies(conn, since, max_anomaly_figures)
    contents.recent_anomalies = [(row, reason_text(row)) for row in rates.table_anomalies(conn, since, table_rows)]
    contents.blocklist_rows = queries.blacklist_entries(conn, since)
    return contents
