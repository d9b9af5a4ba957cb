"""The report's figures: matplotlib, the Agg backend, one PNG per figure (the only matplotlib importer).

Each ``draw_*`` takes a painter and the facts it shows (:mod:`app.services.ops.reports.facts`), writes
its PNG atomically into the painter's directory and returns a :class:`Drawn` (or None when there
is nothing to draw); the model's figures are model_figures.py. matplotlib is imported when the painter
is made, never at module import: the collector and the CLI parser never load it. Every time axis is UTC.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from app import permissions
from app.services.files import atomic_writer
from app.services.ops.reports.drops import Blocklist
from app.services.ops.reports.facts import MIN_PORT_SHARE, Occupancy, PortFacts, Traffic, rate_steps
from app.services.text import counted

DPI = 100


@dataclass
class Drawn:
    """One figure written: file name, section, title and a one-line caption."""
    file: str
    section: str
    title: str
    caption: str


_LAST_SECOND = 253402300799.0          # 9999-12-31 23:59:59 UTC: the calendar's end


def _utc(t: float) -> datetime:
    """A time axis value; a stored time no calendar holds is drawn at the nearest end, never raised."""
    return datetime.fromtimestamp(min(max(float(t), 0.0), _LAST_SECOND), tz=timezone.utc)


class Painter:
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

    def rate_axis(self, ax) -> None:
        """Rates: from zero, with headroom above the highest value so the legend never hides the data."""
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.35 if top > 0 else 1.0)

    def save(self, fig, name: str) -> None:
        with atomic_writer(self.out_dir / name, mode=permissions.file_mode(), binary=True) as fh:
            fig.savefig(fh, format="png", dpi=DPI)


_DETECTOR_COLOURS = {"model": "tab:red", "port_scan": "tab:purple", "syn_flood": "tab:orange",
                     "new_listener": "tab:green"}


def _detector_colour(detector: str) -> str:
    return _DETECTOR_COLOURS.get(detector, "tab:brown")


def _short_list(items: list[str], limit: int = 4) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} (+{len(items) - limit} more)"


def _plot_rate(ax, rows, count, **style) -> None:
    """Counts per second of the span each round covers, one flat segment per round (facts.rate_steps)."""
    times, values = rate_steps(rows, count)
    ax.plot([_utc(t) for t in times], values, **style)


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


def draw_traffic(p: Painter, traffic: Traffic | None) -> Drawn | None:
    if traffic is None:
        return None
    hostwide, blocked = traffic.hostwide, traffic.blocked
    fig, axes = p.figure(2, 1, height=3.0, sharex=True)
    for interface, items in traffic.by_interface.items():
        _plot_rate(axes[0, 0], items, lambda r: r["total_packets"], label=f"{interface}: all packets")
        _plot_rate(axes[0, 0], items, lambda r: r["unparsed_packets"], linestyle=":",
                   label=f"{interface}: unparsed (passed)")
        _plot_rate(axes[1, 0], items, lambda r: r["drops"], color="tab:red",
                   label=f"{interface}: dropped by the blocklist")
    _shade_anomalies(axes[0, 0], hostwide, with_labels=True)
    _shade_anomalies(axes[1, 0], hostwide, with_labels=False)
    axes[0, 0].set_ylabel("packets per second")
    title = "Traffic seen by XDP"
    if hostwide:
        title += (f"; {counted(len(hostwide), 'host-wide anomaly', 'host-wide anomalies')} shaded"
                  + (f", blocked: {_short_list(blocked, 3)}" if blocked else ""))
    axes[0, 0].set_title(title)
    total = traffic.total_drops
    axes[1, 0].set_ylabel("packets per second")
    axes[1, 0].set_title(f"Packets dropped for blocked sources: {total} in this window")
    for ax in axes[:, 0]:
        p.rate_axis(ax)
        ax.legend(loc="upper left", fontsize="small", ncols=3)
        p.time_axis(ax)
    axes[0, 0].set_xlabel("")
    p.save(fig, "traffic.png")
    return Drawn("traffic.png", "overview", "Traffic per second",
                 "All packets the XDP program saw and the packets it dropped for blocked sources, per second "
                 f"of the span each round's counts cover ({counted(total, 'packet')} dropped in this window); "
                 "shaded: rounds flagged by host-wide detectors (port scans).")


def draw_port(p: Painter, port: PortFacts) -> Drawn:
    series, anomalies, label, blocked = port.series, port.anomalies, port.label, port.blocked
    fig, axes = p.figure(2, 1, height=2.8, sharex=True)
    ax_packets, ax_bytes = axes[0, 0], axes[1, 0]
    if series:
        _plot_rate(ax_packets, series, lambda r: r["packets"], color="tab:blue", label="packets")
        if port.protocol == "tcp":
            _plot_rate(ax_packets, series, lambda r: r["syn"], color="tab:orange", linestyle="--",
                       label="SYN (no ACK)")
        _plot_rate(ax_bytes, series, lambda r: r["bytes"] / 1000.0, color="tab:green", label="frame bytes")
    _shade_anomalies(ax_packets, anomalies, with_labels=True)
    _shade_anomalies(ax_bytes, anomalies, with_labels=False)
    packets = sum(r["packets"] for r in series)
    if port.flagged:
        title = f"{label}: FLAGGED, {counted(len(anomalies), 'anomaly')}"
        subtitle = f"blocked sources: {_short_list(blocked)}" if blocked else "no source blocked for this port"
    elif port.other:
        title = f"{label}: each below {MIN_PORT_SHARE:.0%} of the packets, summed"
        subtitle = f"{counted(packets, 'packet')} in this window"
    else:
        title = f"{label}: one of the busiest ports, not flagged"
        subtitle = f"{counted(packets, 'packet')} in this window"
    fig.suptitle(f"{title}\n{subtitle}", fontsize="medium", color="tab:red" if port.flagged else "black",
                 fontweight="bold" if port.flagged else "normal")
    if port.flagged:
        for spine in ax_packets.spines.values():
            spine.set_edgecolor("tab:red")
            spine.set_linewidth(1.5)
    ax_packets.set_ylabel("packets per second")
    ax_bytes.set_ylabel("kB per second")
    for ax in (ax_packets, ax_bytes):
        p.rate_axis(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small", ncols=3)
        p.time_axis(ax)
    ax_packets.set_xlabel("")
    name = port.file
    p.save(fig, name)
    shade = " Shaded: the rounds each detector flagged." if port.flagged else ""
    return Drawn(name, "ports", label, f"{title}; {subtitle}.{shade}")


def draw_blocklist(p: Painter, blocklist: Blocklist | None) -> Drawn | None:
    if blocklist is None:
        return None
    entries, events, times = blocklist.entries, blocklist.events, blocklist.times
    fig, axes = p.figure(2, 1, height=3.0, sharex=True)
    ax_entries, ax_drops = axes[0, 0], axes[1, 0]
    if times:
        ax_entries.plot([_utc(t) for t in times], blocklist.in_force, drawstyle="steps-post",
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
    if blocklist.drop_series:
        ax_drops.stackplot([_utc(t) for t in blocklist.round_ends], *blocklist.drop_series,
                           labels=blocklist.drop_labels, step="pre", alpha=0.8)
        p.rate_axis(ax_drops)
        ax_drops.legend(loc="upper left", fontsize="small", ncols=2)
    else:
        ax_drops.text(0.5, 0.5, "no packets dropped in this window", transform=ax_drops.transAxes,
                      ha="center", va="center", color="gray")
    ax_drops.set_ylabel("packets dropped per second")
    ax_drops.set_title(f"Packets dropped per second, by blocked address ({blocklist.total_drops} in this window)")
    if ax_entries.get_legend_handles_labels()[0]:
        ax_entries.legend(loc="upper left", fontsize="small")
    for ax in (ax_entries, ax_drops):
        p.time_axis(ax)
    ax_entries.set_xlabel("")
    p.save(fig, "blocklist.png")
    total_drops = blocklist.total_drops
    return Drawn("blocklist.png", "blocklist", "Blocklist activity",
                 f"{counted(len(entries), 'entry')} in force in this window; "
                 f"{counted(total_drops, 'packet')} dropped.")


def draw_occupancy(p: Painter, occupancy: Occupancy) -> Drawn | None:
    counts, changes = occupancy.counts, occupancy.changes
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
    summary = ", ".join(counted(n, k) for k, n in sorted(kinds.items())) or "no changes"
    return Drawn("occupancy.png", "occupancy", "Occupancy changes", f"{summary}.")


