"""The matplotlib report: PNG figures plus an index.html that links them (the only importer of matplotlib).

``write_report(db_path, out_dir, since)`` reads the database read-only and writes into ``out_dir``:

  index.html            the page a person opens: summary, every figure, tables of anomalies,
                        blocklist entries and occupancy changes
  report.json           what was drawn (figure files, window, counts), for machines and for
                        removing the previous report's figures that are no longer drawn
  traffic.png           packets and drops per round, per interface
  port_<proto>_<port>.png   per-port series of the most anomalous ports, flagged rounds shaded,
                        blocked sources named
  reconstruction_error.png  model anomaly scores against the threshold over time
  contributions_<id>.png    per-feature contributions of one model anomaly
  blocklist.png         entries in force and packets dropped per round
  occupancy.png         listeners per round, new/gone listeners and process changes

Every time is UTC (like the database views). matplotlib is imported inside the functions that
draw, with the Agg backend: no display is needed and the collector never imports it. A database
without rounds yields a page that says "no data yet".
"""
from __future__ import annotations

import html
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from app import durations, permissions
from app.db import reports as queries
from app.db.connection import connect
from app.errors import PortwatchError, UsageError

log = logging.getLogger(__name__)

INDEX = "index.html"
MANIFEST = "report.json"
DPI = 100
_FIGURE_NAME = re.compile(r"^[a-z0-9_\-]+\.png$")
MAX_TABLE_ROWS = 50
ProgressFn = Callable[[int, int, str], None]


# -- inputs -------------------------------------------------------------------------------------

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


@dataclass
class FeatureContribution:
    """One feature of a model anomaly: its share of the reconstruction error and the two values."""
    name: str
    contribution: float
    observed: float | None = None
    reconstructed: float | None = None


@dataclass
class Reasons:
    """What ``anomalies.reasons`` says, whatever shape it was written in."""
    features: list[FeatureContribution] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    text: str = ""
    measure: str | None = None     # which key the contributions came from (see _MEASURES)


# per-feature keys, preferred first: an explicit contribution, the share of the window's error
# (app/services/evaluation.py writes "share" and "error"), the feature's own error
_MEASURES = ("contribution", "share", "error")
_MEASURE_LABELS = {"contribution": "contribution to the reconstruction error",
                   "share": "share of the reconstruction error (0-1)",
                   "error": "squared error of the feature (scaled units)",
                   "squared difference": "(observed - reconstructed)^2 (scaled units)"}


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None   # NaN -> None


def _address(item) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("address", "source", "addr", "ip", "src"):
            if isinstance(item.get(key), str):
                return item[key]
    return None


def parse_reasons(text: str | None) -> Reasons:
    """Read the reasons JSON defensively.

    Understood: ``{"features": [{"name", "observed", "reconstructed", "contribution"}, ...],
    "sources": ["198.18.0.9", {"address": ...}, ...]}``; ``features`` may also be a mapping
    ``{name: contribution}`` or ``{name: {...}}``; a top-level list is taken as the features; a
    feature without ``contribution`` uses ``share``, then ``error``, else (observed - reconstructed)^2;
    the name may be under ``name`` or ``feature``. Anything
    else is kept as text.
    """
    reasons = Reasons()
    if not text:
        return reasons
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        reasons.text = str(text)
        return reasons
    if isinstance(data, list):
        data = {"features": data}
    if not isinstance(data, dict):
        reasons.text = str(data)
        return reasons
    features = data.get("features") or data.get("contributions") or []
    if isinstance(features, dict):
        features = [dict(value, name=name) if isinstance(value, dict) else {"name": name, "contribution": value}
                    for name, value in features.items()]
    for index, item in enumerate(features if isinstance(features, list) else []):
        if not isinstance(item, dict):
            continue
        observed = _number(item.get("observed"))
        reconstructed = _number(item.get("reconstructed"))
        contribution, measure = None, None
        for key in _MEASURES:
            contribution = _number(item.get(key))
            if contribution is not None:
                measure = key
                break
        if contribution is None and observed is not None and reconstructed is not None:
            contribution, measure = (observed - reconstructed) ** 2, "squared difference"
        if contribution is None:
            continue
        reasons.measure = reasons.measure or measure
        name = str(item.get("name") or item.get("feature") or f"feature {index}")
        reasons.features.append(FeatureContribution(name, contribution, observed, reconstructed))
    sources = data.get("sources") or []
    if isinstance(sources, (str, dict)):
        sources = [sources]
    for item in sources if isinstance(sources, list) else []:
        address = _address(item)
        if address:
            reasons.sources.append(address)
    for key in ("summary", "reason", "text", "rule"):
        if isinstance(data.get(key), str):
            reasons.text = data[key]
            break
    return reasons


# -- pure helpers (tested without matplotlib) --------------------------------------------------------

def port_label(value: int | None, protocol: str | None) -> str:
    """'tcp/22 (ssh)', 'udp/ephemeral', 'icmp/type 8'."""
    if value is None:
        return "host-wide"
    protocol = protocol or "?"
    if value == -1:
        return f"{protocol}/ephemeral"
    if protocol.startswith("icmp"):
        return f"{protocol}/type {value}"
    label = f"{protocol}/{value}"
    if protocol in ("tcp", "udp"):
        try:
            label += f" ({socket.getservbyport(int(value), protocol)})"
        except (OSError, OverflowError):
            pass
    return label


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


def active_counts(entries: Iterable, times: list[float]) -> list[int]:
    """Blocklist entries in force at each time: created_at <= t < (removed_at or expires_at)."""
    spans = []
    for entry in entries:
        end = entry["removed_at"] if entry["removed_at"] is not None else entry["expires_at"]
        spans.append((entry["created_at"], end if end is not None else float("inf")))
    return [sum(1 for start, end in spans if start <= t < end) for t in times]


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
                changes.append(OccupancyChange(end_time, round_id, port_label(*key), "new listener",
                                               ", ".join(sorted(current[key]))))
            for key in sorted(set(previous) - set(current), key=lambda k: (k[1], k[0])):
                changes.append(OccupancyChange(end_time, round_id, port_label(*key), "listener gone",
                                               ", ".join(sorted(previous[key]))))
            for key in sorted(set(previous) & set(current), key=lambda k: (k[1], k[0])):
                if previous[key] != current[key]:
                    changes.append(OccupancyChange(
                        end_time, round_id, port_label(*key), "process change",
                        f"{', '.join(sorted(previous[key]))} -> {', '.join(sorted(current[key]))}"))
        else:
            counts.append((end_time, len(current)))
        previous = current
    return counts, changes


# -- drawing ---------------------------------------------------------------------------------------

@dataclass
class Drawn:
    """One figure written: file name, section, title and a one-line caption."""
    file: str
    section: str
    title: str
    caption: str


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else _utc(t).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Painter:
    """Creates figures with constrained layout and UTC time axes, saves them atomically."""

    def __init__(self, out_dir: Path):
        import matplotlib
        matplotlib.use("Agg", force=True)
        from matplotlib import dates as mdates
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
        self.out_dir = out_dir
        self.MaxNLocator = MaxNLocator
        self.Figure = Figure
        self.mdates = mdates

    def figure(self, rows: int = 1, cols: int = 1, height: float = 4.0, width: float = 11.0, **kw):
        fig = self.Figure(figsize=(width, height * rows), dpi=DPI, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, **kw)
        return fig, axes

    def time_axis(self, ax) -> None:
        locator = self.mdates.AutoDateLocator(tz=timezone.utc, minticks=3, maxticks=9)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(self.mdates.ConciseDateFormatter(locator, tz=timezone.utc))
        ax.set_xlabel("time (UTC)")
        ax.grid(True, alpha=0.3)

    def integer_axis(self, ax) -> None:
        """Counts of things: whole-number ticks, starting at zero."""
        ax.yaxis.set_major_locator(self.MaxNLocator(integer=True))
        top = ax.get_ylim()[1]
        ax.set_ylim(-0.05 * max(top, 1.0), max(top, 1.0) * 1.1)

    def save(self, fig, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fig.savefig(fh, format="png", dpi=DPI)
            permissions.secure(tmp)      # 0600, or 0640 for general.group: never world-readable
            os.replace(tmp, self.out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


_DETECTOR_COLOURS = {"model": "tab:red", "port_scan": "tab:purple", "syn_flood": "tab:orange",
                     "new_listener": "tab:green"}


def _detector_colour(detector: str) -> str:
    return _DETECTOR_COLOURS.get(detector, "tab:brown")


def _short_list(items: list[str], limit: int = 4) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} (+{len(items) - limit} more)"


def _shade_anomalies(ax, anomalies, with_labels: bool) -> None:
    """Shade each anomaly's flagged rounds (a dotted line at its time when the rounds are gone)."""
    shaded: set[str] = set()
    for a in anomalies:
        colour = _detector_colour(a["detector"])
        label = f"flagged: {a['detector']}" if with_labels and a["detector"] not in shaded else None
        shaded.add(a["detector"])
        if a["span_start"] is not None and a["span_end"] is not None:
            ax.axvspan(_utc(a["span_start"]), _utc(max(a["span_end"], a["span_start"] + 1)), color=colour,
                       alpha=0.2, label=label)
        else:   # the flagged rounds are gone (retention): mark when it was raised
            ax.axvline(_utc(a["created_at"]), color=colour, alpha=0.6, linestyle=":", label=label)


def _anomaly_sources(anomalies) -> list[str]:
    sources: list[str] = []
    for a in anomalies:
        if a["source"]:
            sources.append(a["source"])
        sources.extend(parse_reasons(a["reasons"]).sources)
    return sources


def _draw_traffic(p: _Painter, conn, since, entries) -> Drawn | None:
    rows = queries.round_totals(conn, since)
    if not rows:
        return None
    hostwide = queries.hostwide_anomalies(conn, since)
    fig, axes = p.figure(2, 1, height=3.0, sharex=True)
    by_if: dict[str, list] = {}
    for row in rows:
        by_if.setdefault(row["interface"], []).append(row)
    for interface, items in by_if.items():
        times = [_utc(r["end_time"]) for r in items]
        axes[0, 0].plot(times, [r["total_packets"] for r in items], drawstyle="steps-pre", label=f"{interface}: all packets")
        axes[0, 0].plot(times, [r["unparsed_packets"] for r in items], drawstyle="steps-pre", linestyle=":",
                        label=f"{interface}: unparsed (passed)")
        axes[1, 0].plot(times, [r["dropped_packets"] for r in items], drawstyle="steps-pre", color="tab:red",
                        label=f"{interface}: dropped by the blocklist")
    _shade_anomalies(axes[0, 0], hostwide, with_labels=True)
    _shade_anomalies(axes[1, 0], hostwide, with_labels=False)
    blocked = blocked_for({a["id"] for a in hostwide}, _anomaly_sources(hostwide), entries)
    axes[0, 0].set_ylabel("packets per round")
    title = "Traffic seen by XDP"
    if hostwide:
        title += (f"; {len(hostwide)} host-wide anomal{'y' if len(hostwide) == 1 else 'ies'} shaded"
                  + (f", blocked: {_short_list(blocked, 3)}" if blocked else ""))
    axes[0, 0].set_title(title)
    axes[1, 0].set_ylabel("packets per round")
    axes[1, 0].set_title("Packets dropped (blocked sources only)")
    for ax in axes[:, 0]:
        ax.legend(loc="upper left", fontsize="small")
        p.time_axis(ax)
    axes[0, 0].set_xlabel("")
    p.save(fig, "traffic.png")
    return Drawn("traffic.png", "overview", "Traffic per round",
                 "All packets the XDP program saw per round and the packets it dropped for blocked sources; "
                 "shaded: rounds flagged by host-wide detectors (port scans).")


def _draw_port(p: _Painter, conn, since, port, entries) -> Drawn | None:
    series = queries.port_series(conn, port["port_id"], since)
    anomalies = queries.port_anomalies(conn, port["port_id"], since)
    label = port_label(port["value"], port["protocol"])
    blocked = blocked_for({a["id"] for a in anomalies}, _anomaly_sources(anomalies), entries)
    fig, axes = p.figure(2, 1, height=2.8, sharex=True)
    ax_packets, ax_bytes = axes[0, 0], axes[1, 0]
    if series:
        times = [_utc(r["end_time"]) for r in series]
        ax_packets.plot(times, [r["packets"] for r in series], drawstyle="steps-pre", color="tab:blue", label="packets")
        if port["protocol"] == "tcp":
            ax_packets.plot(times, [r["syn"] for r in series], drawstyle="steps-pre", color="tab:orange",
                            linestyle="--", label="SYN (no ACK)")
        ax_bytes.plot(times, [r["bytes"] / 1000.0 for r in series], drawstyle="steps-pre", color="tab:green",
                      label="frame bytes")
    _shade_anomalies(ax_packets, anomalies, with_labels=True)
    _shade_anomalies(ax_bytes, anomalies, with_labels=False)
    title = f"{label}: {len(anomalies)} anomal{'y' if len(anomalies) == 1 else 'ies'}"
    subtitle = f"blocked sources: {_short_list(blocked)}" if blocked else "no source blocked for this port"
    fig.suptitle(f"{title}\n{subtitle}", fontsize="medium")
    ax_packets.set_ylabel("packets per round")
    ax_bytes.set_ylabel("kB per round")
    for ax in (ax_packets, ax_bytes):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small")
        p.time_axis(ax)
    ax_packets.set_xlabel("")
    name = figure_name_for_port(port["value"], port["protocol"])
    p.save(fig, name)
    return Drawn(name, "ports", label, f"{title}; {subtitle}. Shaded: the rounds each detector flagged.")


def _draw_reconstruction(p: _Painter, conn, since) -> Drawn | None:
    scores = queries.model_scores(conn, since)
    thresholds = queries.evaluation_thresholds(conn, since)
    windows = queries.evaluation_scores(conn, since)
    if not scores and not thresholds and not windows:
        return None
    fig, axes = p.figure(1, 1, height=4.2)
    ax = axes[0, 0]
    values: list[float] = []
    if windows:
        ax.plot([_utc(r["at"]) for r in windows], [r["score"] for r in windows], color="tab:gray", alpha=0.6,
                linewidth=0.8, label="window score")
        values += [r["score"] for r in windows if r["score"] is not None]
    if thresholds:
        # each threshold holds until the next evaluation; the last one until the end of the window
        last = max([r["at"] for r in thresholds] + [r["created_at"] for r in scores] + queries.round_times(conn, since)[-1:])
        steps = list(thresholds) + [{"at": last, "threshold": thresholds[-1]["threshold"]}]
        ax.plot([_utc(r["at"]) for r in steps], [r["threshold"] for r in steps], drawstyle="steps-post",
                color="black", linewidth=1.5, label="threshold (per evaluation)")
        values += [r["threshold"] for r in thresholds]
    if scores:
        ax.scatter([_utc(r["created_at"]) for r in scores], [r["score"] for r in scores], color="tab:red", s=24,
                   zorder=3, label="anomaly (score above threshold)")
        values += [r["score"] for r in scores]
        per_score_threshold = [r for r in scores if r["threshold"] is not None]
        if per_score_threshold and not thresholds:
            ax.scatter([_utc(r["created_at"]) for r in per_score_threshold],
                       [r["threshold"] for r in per_score_threshold], marker="_", s=200, color="black",
                       label="threshold at that anomaly")
            values += [r["threshold"] for r in per_score_threshold]
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel("reconstruction error (scaled units)")
    ax.set_title("Model: reconstruction error of flagged windows against the threshold")
    ax.legend(loc="upper left", fontsize="small")
    p.time_axis(ax)
    p.save(fig, "reconstruction_error.png")
    return Drawn("reconstruction_error.png", "model", "Reconstruction error against the threshold",
                 f"{len(scores)} model anomal{'y' if len(scores) == 1 else 'ies'}; the line is the threshold each "
                 "evaluation used.")


def _draw_contributions(p: _Painter, anomaly, reasons: Reasons, top: int = 12) -> Drawn | None:
    features = sorted(reasons.features, key=lambda f: abs(f.contribution), reverse=True)[:top]
    if not features:
        return None
    features.reverse()   # largest at the top of a horizontal bar chart
    names = [f.name for f in features]
    with_values = [f for f in features if f.observed is not None and f.reconstructed is not None]
    cols = 2 if with_values else 1
    fig, axes = p.figure(1, cols, height=max(3.0, 0.38 * len(features) + 1.6), width=11.0)
    ax = axes[0, 0]
    ax.barh(range(len(features)), [f.contribution for f in features], color="tab:red", label="contribution")
    ax.set_yticks(range(len(features)), names)
    ax.set_xlabel(_MEASURE_LABELS.get(reasons.measure or "contribution", "contribution"))
    ax.set_title("Per-feature contribution")
    ax.grid(True, axis="x", alpha=0.3)
    if with_values:
        ax2 = axes[0, 1]
        pos = range(len(features))
        height = 0.4
        ax2.barh([i + height / 2 for i in pos], [f.observed if f.observed is not None else 0 for f in features],
                 height=height, color="tab:blue", label="observed")
        ax2.barh([i - height / 2 for i in pos],
                 [f.reconstructed if f.reconstructed is not None else 0 for f in features],
                 height=height, color="tab:gray", label="reconstructed")
        ax2.set_yticks(list(pos), [""] * len(features))
        magnitudes = [abs(v) for f in features for v in (f.observed, f.reconstructed) if v]
        if magnitudes and max(magnitudes) / min(magnitudes) > 100:   # packets next to bytes: keep both visible
            ax2.set_xscale("symlog", linthresh=max(min(magnitudes), 1e-3))
        ax2.set_xlabel("value in the feature's own units" + (" (symlog scale)" if ax2.get_xscale() == "symlog" else ""))
        ax2.set_title("Observed vs reconstructed")
        ax2.legend(loc="lower right", fontsize="small")
        ax2.grid(True, axis="x", alpha=0.3)
    port = port_label(anomaly["value"], anomaly["protocol"])
    score = "-" if anomaly["score"] is None else f"{anomaly['score']:.4g}"
    threshold = "-" if anomaly["threshold"] is None else f"{anomaly['threshold']:.4g}"
    sources = _short_list(reasons.sources or ([anomaly["source"]] if anomaly["source"] else []), 3)
    fig.suptitle(f"Anomaly #{anomaly['id']} on {port} at {_fmt_time(anomaly['created_at'])}\n"
                 f"score {score} (threshold {threshold})" + (f"; sources: {sources}" if sources else ""),
                 fontsize="medium")
    name = f"contributions_{int(anomaly['id'])}.png"
    p.save(fig, name)
    return Drawn(name, "contributions", f"Anomaly #{anomaly['id']} on {port}",
                 f"The {len(features)} features that contributed most to anomaly #{anomaly['id']}'s reconstruction error.")


def _draw_blocklist(p: _Painter, conn, since, now: float) -> Drawn | None:
    entries = queries.blacklist_entries(conn, since)
    events = queries.blacklist_events(conn, since)
    drops = queries.blacklist_drops(conn, since)
    if not entries and not events and not drops:
        return None
    times = queries.round_times(conn, since)
    marks = sorted({t for e in entries for t in (e["created_at"], e["removed_at"], e["expires_at"])
                    if t is not None and (since is None or t >= since) and t <= now})
    times = sorted(set(times) | set(marks))
    fig, axes = p.figure(2, 1, height=3.0, sharex=True)
    ax_entries, ax_drops = axes[0, 0], axes[1, 0]
    if times:
        ax_entries.plot([_utc(t) for t in times], active_counts(entries, times), drawstyle="steps-post",
                        color="black", label="entries in force")
    kinds = {"block": ("^", "tab:red", "block"), "expire": ("v", "tab:gray", "expire"),
             "remove": ("v", "tab:blue", "remove"), "would-block": ("^", "tab:orange", "would block (dry run)")}
    for action, (marker, colour, label) in kinds.items():
        at = [_utc(e["at"]) for e in events if e["action"] == action]
        if at:
            ax_entries.scatter(at, [0] * len(at), marker=marker, color=colour, s=40, zorder=3, label=label,
                               clip_on=False)
    ax_entries.set_ylabel("blocklist entries")
    ax_entries.set_title("Blocklist entries in force, and block/expire/remove events")
    p.integer_axis(ax_entries)
    if drops:
        totals: dict[str, int] = {}
        for row in drops:
            totals[row["address"]] = totals.get(row["address"], 0) + row["drops"]
        top = sorted(totals, key=totals.get, reverse=True)[:5]
        round_ends = sorted({row["end_time"] for row in drops} | set(queries.round_times(conn, since)))
        index = {t: i for i, t in enumerate(round_ends)}
        stacks = {address: [0] * len(round_ends) for address in top}
        other = [0] * len(round_ends)
        for row in drops:
            target = stacks.get(row["address"], other)
            target[index[row["end_time"]]] += row["drops"]
        labels = [f"{a} ({totals[a]} total)" for a in top]
        series = [stacks[a] for a in top]
        if any(other):
            labels.append("other addresses")
            series.append(other)
        ax_drops.stackplot([_utc(t) for t in round_ends], *series, labels=labels, step="mid", alpha=0.8)
        ax_drops.legend(loc="upper left", fontsize="small")
    else:
        ax_drops.text(0.5, 0.5, "no packets dropped in this window", transform=ax_drops.transAxes,
                      ha="center", va="center", color="gray")
    ax_drops.set_ylabel("packets dropped per round")
    ax_drops.set_title("Packets dropped per round, by blocked address")
    if ax_entries.get_legend_handles_labels()[0]:
        ax_entries.legend(loc="upper left", fontsize="small")
    for ax in (ax_entries, ax_drops):
        p.time_axis(ax)
    ax_entries.set_xlabel("")
    p.save(fig, "blocklist.png")
    total_drops = sum(row["drops"] for row in drops)
    return Drawn("blocklist.png", "blocklist", "Blocklist activity",
                 f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in force in this window; "
                 f"{total_drops} packets dropped.")


def _draw_occupancy(p: _Painter, counts, changes: list[OccupancyChange]) -> Drawn | None:
    if not counts:
        return None
    fig, axes = p.figure(2, 1, height=3.0, sharex=True)
    ax_count, ax_events = axes[0, 0], axes[1, 0]
    ax_count.plot([_utc(t) for t, _ in counts], [n for _, n in counts], drawstyle="steps-post", color="black",
                  label="listening ports")
    ax_count.set_ylabel("listening ports")
    p.integer_axis(ax_count)
    ax_count.set_title("Occupancy: local ports with a listener")
    ax_count.legend(loc="upper left", fontsize="small")
    # the 20 ports with the most recent changes, one row each
    recent = changes[-400:]
    ports: list[str] = []
    for change in reversed(recent):
        if change.port not in ports:
            ports.append(change.port)
        if len(ports) == 20:
            break
    rows = {port: i for i, port in enumerate(sorted(ports))}
    styles = {"new listener": ("^", "tab:green"), "listener gone": ("v", "tab:gray"),
              "process change": ("o", "tab:orange")}
    for kind, (marker, colour) in styles.items():
        picked = [c for c in recent if c.kind == kind and c.port in rows]
        if picked:
            ax_events.scatter([_utc(c.at) for c in picked], [rows[c.port] for c in picked], marker=marker,
                              color=colour, s=40, label=kind, zorder=3)
    if rows:
        ax_events.set_yticks(range(len(rows)), list(rows))
        ax_events.set_ylim(-0.7, len(rows) - 0.3)
        ax_events.legend(loc="upper left", fontsize="small")
    else:
        ax_events.set_yticks([])
        ax_events.text(0.5, 0.5, "no listener appeared, went away or changed process", transform=ax_events.transAxes,
                       ha="center", va="center", color="gray")
    ax_events.set_title("New listeners, listeners gone and process changes")
    for ax in (ax_count, ax_events):
        p.time_axis(ax)
    ax_count.set_xlabel("")
    p.save(fig, "occupancy.png")
    kinds = {}
    for change in changes:
        kinds[change.kind] = kinds.get(change.kind, 0) + 1
    summary = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in sorted(kinds.items())) or "no changes"
    return Drawn("occupancy.png", "occupancy", "Occupancy changes", f"{summary}.")


# -- the page -------------------------------------------------------------------------------------

_SECTIONS = [
    ("overview", "Overview", "No rounds in this window."),
    ("ports", "Most anomalous ports", "No anomaly on any port in this window."),
    ("model", "Reconstruction error", "No model evaluation with a threshold in this window (the model may be warming up)."),
    ("contributions", "Per-feature contributions of model anomalies", "No model anomaly with per-feature detail in this window."),
    ("blocklist", "Blocklist activity", "No blocklist entry, event or drop in this window."),
    ("occupancy", "Occupancy changes", "No scanner data in this window."),
]

_CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4}.empty{color:#777;font-style:italic}.nodata{font-size:1.3em;color:#a60}"""


def _table(headers: list[str], rows: list[list], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number_text(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _render_index(title: str, window: str, overview: dict | None, drawn: list[Drawn], tables: dict[str, str],
                  generated: float) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {html.escape(_fmt_time(generated))}; window: {html.escape(window)}. "
             "Times are UTC. Per-round values are what happened in that round.</p>"]
    if not overview or overview["rounds"] == 0 and overview["anomalies"] == 0 and overview["evaluations"] == 0:
        parts.append('<p class="nodata">No data yet: no rounds were collected in this window. Run the collector '
                     "(python -m app collect) or widen the window (--since all).</p>")
    if overview:
        parts.append(_table(["rounds", "first", "last", "interfaces", "packets", "dropped", "evaluations",
                             "anomalies", "blocklist entries"],
                            [[overview["rounds"], _fmt_time(overview["first_time"]), _fmt_time(overview["last_time"]),
                              ", ".join(overview["interfaces"]) or "-", overview["packets"],
                              overview["dropped_packets"], overview["evaluations"], overview["anomalies"],
                              overview["blacklist_entries"]]], ""))
    for key, heading, empty in _SECTIONS:
        parts.append(f'<h2 id="{key}">{html.escape(heading)}</h2>')
        figures = [d for d in drawn if d.section == key]
        if not figures and key not in tables:
            parts.append(f'<p class="empty">{html.escape(empty)}</p>')
        for d in figures:
            src = html.escape(d.file, quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(d.title, quote=True)}"></a>'
                         f"<figcaption>{html.escape(d.caption)}</figcaption></figure>")
        if key in tables:
            parts.append(tables[key])
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        permissions.secure(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _previous_figures(out_dir: Path) -> set[str]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
        return {f for f in data.get("figures", []) if isinstance(f, str) and _FIGURE_NAME.match(f)}
    except (OSError, ValueError, AttributeError):
        return set()


def write_report(db_path: str | os.PathLike, out_dir: str | os.PathLike, since: str | float | None = None, *,
                 top_ports: int = 6, max_anomaly_figures: int = 12, progress: ProgressFn | None = None,
                 now: float | None = None) -> Path:
    """Write the report for the rounds since ``since`` into ``out_dir``; return the index.html path.

    since: epoch seconds, a string for :func:`parse_since` (``24h``, ``7d``, ISO time, ``all``), or
    None for the whole database. top_ports: how many of the most anomalous ports get a series
    figure; max_anomaly_figures: how many of the most recent model anomalies get a contribution
    figure. progress(done, total, what) is called before each figure (for a terminal).
    Raises DatabaseError (missing/corrupt database) or PortwatchError (out_dir not writable).
    """
    now = time.time() if now is None else now
    since_ts = parse_since(since, now=now)
    out = Path(out_dir)
    try:
        permissions.make_dir(out)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe.", delete=True)
        probe.close()
    except OSError as exc:
        raise PortwatchError(f"cannot write the report to {out}: {exc.strerror or exc}; choose another --out") from None
    started = time.monotonic()
    conn = connect(db_path, readonly=True)
    try:
        drawn, tables, overview = _build(conn, out, since_ts, top_ports, max_anomaly_figures, progress, now)
    finally:
        conn.close()
    previous = _previous_figures(out)
    window = "everything in the database" if since_ts is None else f"since {_fmt_time(since_ts)}"
    index = out / INDEX
    _write_text(index, _render_index("portwatch report", window, overview, drawn, tables, now))
    figures = [d.file for d in drawn]
    _write_text(out / MANIFEST, json.dumps({
        "generated_at": now, "since": since_ts, "database": str(db_path), "figures": figures,
        "sections": {d.file: d.section for d in drawn}, "overview": overview,
        "seconds": round(time.monotonic() - started, 3)}, indent=2, default=str) + "\n")
    for stale in previous - set(figures):
        (out / stale).unlink(missing_ok=True)
    log.info("report with %d figures written to %s in %.1f s", len(figures), index, time.monotonic() - started)
    return index


def _build(conn, out: Path, since: float | None, top_ports: int, max_anomaly_figures: int,
           progress: ProgressFn | None, now: float) -> tuple[list[Drawn], dict[str, str], dict]:
    overview = queries.overview(conn, since)
    tables: dict[str, str] = {}
    if overview["rounds"] == 0 and overview["anomalies"] == 0 and overview["evaluations"] == 0 \
            and overview["blacklist_entries"] == 0:
        return [], tables, overview
    painter = _Painter(out)
    ports = queries.most_anomalous_ports(conn, since, max(0, top_ports))
    model_rows = queries.model_anomalies(conn, since, max(0, max_anomaly_figures))
    entries = queries.blocked_addresses(conn)
    steps: list[tuple[str, Callable[[], list[Drawn | None]]]] = [
        ("traffic", lambda: [_draw_traffic(painter, conn, since, entries)])]
    for port in ports:
        steps.append((f"port {port_label(port['value'], port['protocol'])}",
                      lambda port=port: [_draw_port(painter, conn, since, port, entries)]))
    steps.append(("reconstruction error", lambda: [_draw_reconstruction(painter, conn, since)]))
    for row in model_rows:
        steps.append((f"contributions of anomaly #{row['id']}",
                      lambda row=row: [_draw_contributions(painter, row, parse_reasons(row["reasons"]))]))
    steps.append(("blocklist", lambda: [_draw_blocklist(painter, conn, since, now)]))
    occupancy: dict = {}

    def occupancy_step():
        counts, changes = occupancy_changes(queries.occupancy(conn, since), queries.scanned_round_ids(conn, since))
        counts = [(t, n) for t, n in counts if since is None or t >= since]   # the baseline round may precede it
        occupancy["changes"] = changes
        return [_draw_occupancy(painter, counts, changes)]
    steps.append(("occupancy", occupancy_step))

    drawn: list[Drawn] = []
    for i, (what, step) in enumerate(steps):
        if progress:
            progress(i + 1, len(steps), what)
        drawn.extend(d for d in step() if d is not None)

    anomalies = queries.recent_anomalies(conn, since, MAX_TABLE_ROWS)
    if anomalies:
        tables["ports"] = "<h3>Recent anomalies</h3>" + _table(
            ["id", "time", "detector", "port", "score", "threshold", "source"],
            [[a["id"], _fmt_time(a["created_at"]), a["detector"], port_label(a["value"], a["protocol"]),
              _number_text(a["score"]), _number_text(a["threshold"]), a["source"] or "-"] for a in anomalies], "")
    without = [r for r in model_rows if not parse_reasons(r["reasons"]).features]
    if without:
        tables["contributions"] = "<p>Model anomalies without per-feature detail:</p>" + _table(
            ["anomaly", "port", "reasons"],
            [[r["id"], port_label(r["value"], r["protocol"]), (r["reasons"] or "-")[:200]] for r in without], "")
    block_rows = queries.blacklist_entries(conn, since)
    if block_rows:
        tables["blocklist"] = _table(
            ["address", "status", "origin", "created", "expires", "drops", "reason"],
            [[b["address"], b["status"], b["origin"], _fmt_time(b["created_at"]), _fmt_time(b["expires_at"]),
              b["drops"], b["reason"]] for b in block_rows[-MAX_TABLE_ROWS:]], "")
    changes = occupancy.get("changes") or []
    if changes:
        tables["occupancy"] = _table(["time", "port", "change", "process"],
                                     [[_fmt_time(c.at), c.port, c.kind, c.detail]
                                      for c in changes[-MAX_TABLE_ROWS:][::-1]], "")
    return drawn, tables, overview
