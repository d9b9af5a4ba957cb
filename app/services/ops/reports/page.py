"""The report's page and its assembly: :func:`write_report` reads the facts (facts.py), draws the
figures (figures.py, model_figures.py) and writes index.html and report.json into a directory.
Every time is UTC (like the database views); a database without rounds yields a page that says
"no data yet". Called by the `report` command and the hourly job (app/services/jobs.py).
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from app import permissions
from app.db import evaluations as dbe
from app.db.connection import connect
from app.errors import PortwatchError
from app.services.evaluation.model_versions import threshold_history
from app.services.files import atomic_write
from app.services.ports import port_label
from app.services.ops.reports import drops, facts, figures, model_figures, outbound
from app.services.ops.reports.facts import fmt_time
from app.services.ops.reports.figures import Drawn
from app.services.text import inert, json_dumps

log = logging.getLogger(__name__)

INDEX = "index.html"
MANIFEST = "report.json"
_FIGURE_NAME = re.compile(r"^[a-z0-9_\-]+\.png$")
MAX_TABLE_ROWS = 50
ProgressFn = Callable[[int, int, str], None]


# -- the page -------------------------------------------------------------------------------------

_SECTIONS = [
    ("overview", "Overview", "No rounds in this window."),
    ("ports", "Ports: the most anomalous (red) and the busiest", "No traffic on any port in this window."),
    ("model", "Reconstruction error", "No model evaluation with a threshold in this window (the model may be warming up)."),
    ("contributions", "Per-feature contributions of model anomalies", "No model anomaly with per-feature detail in this window."),
    ("blocklist", "Blocklist activity", "No blocklist entry, event or drop in this window."),
    ("occupancy", "Occupancy changes", "No scanner data in this window."),
    outbound.SECTION,
]

_CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.wide{overflow-x:auto}td:last-child{min-width:12em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4}td:not(:last-child){white-space:nowrap}.empty{color:#777;font-style:italic}.nodata{font-size:1.3em;color:#a60}
@media (max-width:600px){body{margin:.5em auto;padding:0 .6em}h1{font-size:1.3em}figure{margin:.6em 0}}"""


def _h(value, quote: bool = True) -> str:
    """HTML text of ``value``: control characters escaped (text.inert), then HTML's own specials."""
    return html.escape(inert(str(value)), quote=quote)


def _table(headers: list[str], rows: list[list], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_h(empty)}</p>'
    head = "".join(f"<th>{_h(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_h(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _number_text(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _render_index(title: str, window: str, overview: dict | None, drawn: list[Drawn], tables: dict[str, str],
                  generated: float) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_h(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_h(title)}</h1>",
             f"<p>Generated {_h(fmt_time(generated))}; window: {_h(window)}. "
             "Times are UTC. Traffic is shown per second of the span each round's counts cover (a round after a "
             "gap between collector runs covers the gap); every drop count is the rounds' XDP drop counter.</p>"]
    if not overview or overview["rounds"] == 0 and overview["anomalies"] == 0 and overview["evaluations"] == 0:
        parts.append('<p class="nodata">No data yet: no rounds were collected in this window. Run the collector '
                     "(python -m app collect) or widen the window (--since all).</p>")
    if overview:
        parts.append(_table(["rounds", "first", "last", "interfaces", "packets", "dropped (blocklist)", "evaluations",
                             "anomalies", "blocklist entries"],
                            [[overview["rounds"], fmt_time(overview["first_time"]), fmt_time(overview["last_time"]),
                              ", ".join(overview["interfaces"]) or "-", overview["packets"],
                              overview["dropped_packets"], overview["evaluations"], overview["anomalies"],
                              overview["blacklist_entries"]]], ""))
    for key, heading, empty in _SECTIONS:
        parts.append(f'<h2 id="{key}">{_h(heading)}</h2>')
        shown = [d for d in drawn if d.section == key]
        if not shown and key not in tables:
            parts.append(f'<p class="empty">{_h(empty)}</p>')
        for d in shown:
            src = _h(d.file, quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{_h(d.title, quote=True)}"></a>'
                         f"<figcaption>{_h(d.caption)}</figcaption></figure>")
        if key in tables:
            parts.append(tables[key])
    parts.append("</body></html>\n")
    return "\n".join(parts)


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

    Files written:

      index.html            the page a person opens: summary, every figure, tables of anomalies,
                            blocklist entries and occupancy changes
      report.json           what was drawn (figure files, window, counts), for machines and for
                            removing the previous report's figures that are no longer drawn
      traffic.png           packets, unparsed packets and drops per second, per interface
      port_<proto>_<port>.png   per-port rates of the most anomalous ports (flagged: red title,
                            flagged rounds shaded, blocked sources named) and of the busiest ports
      reconstruction_error.png  the model's error per judged round against each model version's threshold
      contributions_<id>.png    per-feature contributions of one model anomaly
      blocklist.png         entries in force and packets dropped per round
      occupancy.png         listeners per round, new/gone listeners and process changes
      (no figure)           what leaves the host: top destinations by bytes out, outbound findings explained

    Rates are per second of the span each round's counts cover (``counts_since`` .. ``end_time``: a
    round after a gap between collector runs holds the gap's packets). Every drop figure (overview,
    traffic, blocklist figure, blocklist table, report.json ``drops``) is the rounds' XDP drop counter
    (app/db/report_rates.drop_total, also under ``blacklist list``), split by address where the
    per-round rows allow, so they agree.
    """
    now = time.time() if now is None else now
    since_ts = facts.parse_since(since, now=now)
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
    window = "everything in the database" if since_ts is None else f"since {fmt_time(since_ts)}"
    index = out / INDEX
    atomic_write(index, _render_index("portwatch report", window, overview, drawn, tables, now),
                 mode=permissions.file_mode())
    files = [d.file for d in drawn]
    atomic_write(out / MANIFEST, json_dumps({
        "generated_at": now, "since": since_ts, "database": str(db_path), "figures": files,
        "sections": {d.file: d.section for d in drawn}, "overview": overview,
        "drops": (overview or {}).get("dropped_packets", 0),
        "seconds": round(time.monotonic() - started, 3)}, indent=2, default=str) + "\n",
                 mode=permissions.file_mode())
    for stale in previous - set(files):
        (out / stale).unlink(missing_ok=True)
    log.info("report with %d figures written to %s in %.1f s", len(files), index, time.monotonic() - started)
    return index


def _blocklist_table(contents: facts.Contents) -> str:
    """Entries with the window's drops each, the drops of entries no longer listed (and drops.GONE),
    and the one total: the rounds' XDP drop counter (the same number as the overview and figures)."""
    window, replies = contents.window_drops, contents.window_replies
    shown = contents.blocklist_rows[-MAX_TABLE_ROWS:]
    rows = [[b["address"], b["status"], b["origin"], fmt_time(b["created_at"]), fmt_time(b["expires_at"]),
             window.get(b["address"], 0), replies.get(b["address"], 0), b["reason"]] for b in shown]
    listed = {b["address"] for b in shown}
    rows += [[address, "-", "-", "-", "-", window.get(address, 0), replies.get(address, 0),
              "removed or expired after the round's last read" if address == drops.GONE else "(entry no longer listed)"]
             for address in sorted(set(window) | set(replies)) if address not in listed]
    rows.append(["total", "", "", "", "", contents.overview["dropped_packets"], sum(replies.values()),
                 "the rounds' XDP drop counter"])
    return _table(["address", "status", "origin", "created", "expires", "drops in window", "passed as replies",
                   "reason"], rows, "")


def _build(conn, out: Path, since: float | None, top_ports: int, max_anomaly_figures: int,
           progress: ProgressFn | None, now: float) -> tuple[list[Drawn], dict[str, str], dict]:
    contents = facts.load_contents(conn, since, top_ports, max_anomaly_figures, MAX_TABLE_ROWS)
    tables: dict[str, str] = {}
    if contents.empty:
        return [], tables, contents.overview
    painter = figures.Painter(out)
    entries = contents.entries
    steps: list[tuple[str, Callable[[], Drawn | None]]] = [
        ("traffic", lambda: figures.draw_traffic(painter, facts.load_traffic(conn, since, entries)))]
    for port in contents.ports:
        what = "other ports" if port["port_id"] is None else port_label(port["value"], port["protocol"], long=True)
        steps.append((f"port {what}",
                      lambda port=port: figures.draw_port(painter, facts.load_port(conn, since, port, entries))))
    steps.append(("reconstruction error",
                  lambda: model_figures.draw_reconstruction(painter, facts.load_model_scores(conn, since))))
    for anomaly in contents.model_anomalies:
        steps.append((f"contributions of anomaly #{anomaly.id}",
                      lambda anomaly=anomaly: model_figures.draw_contributions(painter, anomaly)))
    steps.append(("blocklist", lambda: figures.draw_blocklist(painter, drops.load_blocklist(conn, since, now))))
    occupancy = facts.load_occupancy(conn, since)
    steps.append(("occupancy", lambda: figures.draw_occupancy(painter, occupancy)))

    drawn: list[Drawn] = []
    for i, (what, step) in enumerate(steps):
        if progress:
            progress(i + 1, len(steps), what)
        figure = step()
        if figure is not None:
            drawn.append(figure)

    if contents.recent_anomalies:
        tables["ports"] = "<h3>Recent anomalies</h3>" + _table(
            ["id", "time", "detector", "port", "score", "threshold", "source", "why"],
            [[a["id"], fmt_time(a["created_at"]), a["detector"], port_label(a["port"], a["protocol"], long=True),
              _number_text(a["score"]), _number_text(a["threshold"]), a["source"] or "-", why]
             for a, why in contents.recent_anomalies], "")
    history = [threshold_history(r) for r in dbe.models(conn)][:MAX_TABLE_ROWS]
    if history:     # the threshold history: each refit's threshold, its bounded move and the held-out pool
        tables["model"] = "<h3>Threshold history</h3>" + _table(
            ["model", "created", "threshold", "change", "held-out pool"],
            [[f"v{h['version']}", fmt_time(h["created_at"]), _number_text(h["threshold"]), h["change"], h["pool"]]
             for h in history], "")
    without = [a for a in contents.model_anomalies if not a.features]
    if without:
        tables["contributions"] = "<p>Model anomalies without per-feature detail:</p>" + _table(
            ["anomaly", "port", "reasons"], [[a.id, a.port, (a.reasons or "-")[:200]] for a in without], "")
    if contents.blocklist_rows or contents.window_drops or contents.window_replies:
        tables["blocklist"] = _blocklist_table(contents)
    if occupancy.changes:
        tables["occupancy"] = _table(["time", "port", "change", "process"],
                                     [[fmt_time(c.at), c.port, c.kind, c.detail]
                                      for c in occupancy.changes[-MAX_TABLE_ROWS:][::-1]], "")
    leaving = outbound.load(conn, since, MAX_TABLE_ROWS)
    if not leaving.empty:
        tables[outbound.SECTION[0]] = outbound.section_html(leaving, _table)
    return drawn, tables, contents.overview
