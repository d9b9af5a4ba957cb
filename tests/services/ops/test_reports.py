"""The matplotlib report: figures exist, are valid PNGs, index.html links every one; the empty
database says "no data yet"; anomalies are read through the findings contract, in today's and the
earlier reasons JSON; the pure helpers."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from app.db.connection import connect
from app.errors import PortwatchError, UsageError
from app.services.evaluation.findings import Finding, Source
from app.services.ports import port_label
from app.services.ops.reports import facts, write_report
from app.services.ops.reports import drops
from app.services.ops.reports.drops import active_counts
from app.services.ops.reports.facts import OccupancyChange, occupancy_changes, parse_since
from tests.ops_helpers import ATTACKER, empty_database, fill_database

REPO = Path(__file__).resolve().parents[3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = {"traffic.png", "port_tcp_22.png", "port_tcp_80.png", "reconstruction_error.png",
            "contributions_1.png", "blocklist.png", "occupancy.png",
            "port_tcp_ephemeral.png", "port_udp_53.png"}          # the busiest ports, charted though not flagged


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.text = set(), set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.hrefs.add(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.srcs.add(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def links(index: Path) -> Links:
    parser = Links()
    parser.feed(index.read_text())
    return parser


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    try:
        from PIL import Image
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return image.size
    except ImportError:
        import matplotlib.image
        height, width = matplotlib.image.imread(path).shape[:2]
        return width, height


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    now = time.time()
    ids = fill_database(d / "ports.db", end=now - 60)
    return d / "ports.db", ids, now


def test_report_figures_are_valid_pngs_linked_from_the_index(filled, tmp_path):
    db, ids, now = filled
    seen = []
    index = write_report(db, tmp_path / "out", since="all", progress=lambda done, total, what: seen.append(done))
    out = index.parent
    assert index.name == "index.html"
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == EXPECTED
    for name in pngs:
        width, height = png_size(out / name)
        assert width >= 800 and height >= 250, f"{name} is {width}x{height}"
    page = links(index)
    assert pngs <= page.hrefs and pngs <= page.srcs
    text = " ".join(page.text)
    assert "No data yet" not in text
    assert ATTACKER in text and "198.18.0.9/32" in text            # tables name the source and the block
    assert "new listener" in text and "nginx -> apache2" in text  # occupancy changes
    manifest = json.loads((out / "report.json").read_text())
    assert set(manifest["figures"]) == pngs and manifest["overview"]["rounds"] == 180
    assert seen == sorted(seen) and seen[-1] == len(seen)
    assert not list(out.glob(".*.tmp"))


def test_report_window_and_stale_figures(filled, tmp_path):
    db, ids, now = filled
    out = tmp_path / "out"
    write_report(db, out, since="all")
    assert (out / "port_tcp_22.png").exists()
    # a window after every round and block: nothing to draw, the old figures go away, the page says so
    index = write_report(db, out, since=now + 6 * 3600, now=now)
    assert not list(out.glob("*.png"))
    assert "No data yet" in index.read_text()
    # the last 20 minutes: rounds but no anomaly raised in them: only the busiest ports, none flagged
    index = write_report(db, out, since="20m", now=now)
    names = {p.name for p in out.glob("*.png")}
    assert {"traffic.png", "blocklist.png", "occupancy.png"} <= names
    assert {n for n in names if n.startswith("port_")} == {"port_tcp_ephemeral.png", "port_tcp_80.png",
                                                            "port_tcp_22.png", "port_udp_53.png"}
    text = " ".join(links(index).text)
    assert "FLAGGED" not in text and "one of the busiest ports, not flagged" in text


def test_one_drop_total_everywhere_and_rates_per_second(tmp_path):
    """The drop total is the rounds' XDP counter: the overview, the traffic and blocklist figures'
    captions and titles, the blocklist table's total and report.json show the same number; the
    per-address rows (blacklist_drops) split it, and what they miss is one row of its own."""
    now = time.time()
    db = tmp_path / "ports.db"
    ids = fill_database(db, end=now - 60)
    conn = connect(db)
    with conn:       # 7 drops a round that no per-address row holds (an entry removed between rounds)
        conn.execute("UPDATE rounds SET dropped_packets = dropped_packets + 7")
        conn.execute("UPDATE blacklist SET drops = drops + 1000")
        per_address = conn.execute("SELECT SUM(drops) FROM blacklist_drops").fetchone()[0]
        expected = conn.execute("SELECT SUM(dropped_packets) FROM rounds").fetchone()[0]
        # rounds of different lengths: a 6 s round with 600 packets on tcp/80 is 100 packets per second
        last = ids["rounds"][-1]
        conn.execute("UPDATE rounds SET start_time = end_time - 6, counts_since = end_time - 6 WHERE id = ?", (last,))
        conn.execute("UPDATE port_stats SET packets = 600 WHERE round_id = ? AND port_id = ?", (last, ids["http"]))
    conn.close()
    index = write_report(db, tmp_path / "out", since="all")
    page = index.read_text()
    manifest = json.loads((tmp_path / "out" / "report.json").read_text())
    assert expected > per_address > 0 and manifest["drops"] == expected == manifest["overview"]["dropped_packets"]
    overview_row = page.split("<tbody>")[1].split("</tr>")[0]
    assert f"<td>{expected}</td>" in overview_row
    assert f"({expected} packets dropped in this window)" in page                  # the traffic caption
    assert f"{expected} packets dropped." in page                                  # the blocklist caption
    assert f"<tr><td>total</td><td></td><td></td><td></td><td></td><td>{expected}</td>" in page
    assert f"<td>{drops.GONE}</td><td>-</td><td>-</td><td>-</td><td>-</td><td>{expected - per_address}</td>" in page
    from app.db import report_rates
    from app.services.ops.reports.drops import load_blocklist
    from app.services.ops.reports.facts import load_port, load_traffic
    conn = connect(db, readonly=True)
    try:
        assert load_traffic(conn, None, []).total_drops == expected
        assert load_blocklist(conn, None, now).total_drops == expected
        http = next(r for r in report_rates.busiest_ports(conn, None, 10) if r["value"] == 80)
        series = load_port(conn, None, http, []).series
    finally:
        conn.close()
    assert series[-1]["packets"] / series[-1]["seconds"] == pytest.approx(100.0)
    assert series[-2]["packets"] / series[-2]["seconds"] == pytest.approx(series[-2]["packets"] / 60.0)


def test_the_anomaly_table_says_why(filled, tmp_path):
    db, _, _ = filled
    index = write_report(db, tmp_path, since="all")
    table = index.read_text().split("<h3>Recent anomalies</h3>")[1].split("</table>")[0]
    assert "<th>why</th>" in table
    assert f"{ATTACKER} (" in table and "pkts" in table                 # sources with packets
    assert "driven by " in table and " vs usual " in table              # the model's features


def test_top_ports_limits_the_series(filled, tmp_path):
    db, _, _ = filled
    write_report(db, tmp_path, since="all", top_ports=1, max_anomaly_figures=0)
    names = {p.name for p in tmp_path.glob("*.png")}
    assert "port_tcp_22.png" in names and "port_tcp_80.png" not in names     # tcp/22 is the most anomalous
    assert "port_tcp_ephemeral.png" in names                                  # ... and the busiest one
    assert not any(n.startswith("contributions_") for n in names)


def test_empty_database_says_no_data_yet(tmp_path):
    db = empty_database(tmp_path / "empty.db")
    index = write_report(db, tmp_path / "out")
    assert "No data yet" in index.read_text()
    assert not list((tmp_path / "out").glob("*.png"))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["figures"] == []


def test_missing_database_and_unwritable_output(tmp_path):
    with pytest.raises(PortwatchError, match="does not exist yet"):
        write_report(tmp_path / "absent.db", tmp_path / "out")
    blocker = tmp_path / "file"
    blocker.write_text("")
    db = empty_database(tmp_path / "e.db")
    with pytest.raises(PortwatchError, match="cannot write the report"):
        write_report(db, blocker / "out")


def test_parse_since():
    now = 1_700_000_000.0
    assert parse_since(None) is None and parse_since("all") is None
    assert parse_since("24h", now=now) == now - 86400
    assert parse_since("7d", now=now) == now - 7 * 86400
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("2w", now=now) == now - 14 * 86400
    assert parse_since(1234.5) == 1234.5
    assert parse_since("2024-05-01") == 1714521600.0                    # naive = UTC
    assert parse_since("2024-05-01T02:00:00+02:00") == 1714521600.0
    for bad in ("yesterday", "5x", "2024-13-01"):
        with pytest.raises(UsageError, match="--since"):
            parse_since(bad)


def _model_rows(db) -> dict[int, facts.ModelAnomaly]:
    conn = connect(db, readonly=True)
    try:
        return {a.id: a for a in facts.load_model_anomalies(conn, None, 10)}
    finally:
        conn.close()


def test_model_anomalies_read_through_the_findings_contract(tmp_path):
    """Rows written before the contract (sources as plain dicts) and rows written with
    Finding.to_json() read the same; reasons that are not JSON give a row without detail."""
    db = tmp_path / "ports.db"
    ids = fill_database(db, end=time.time() - 60, rounds=30)
    features = [{"feature": "syn", "observed": 0.95, "reconstructed": 0.05, "error": 0.81, "share": 0.61},
                {"feature": "packets", "observed": 0.9, "reconstructed": 0.2, "error": 0.49, "share": 0.3}]
    written = Finding("model", None, 22, "tcp", 1, 2, 0.5, 0.06, source=ATTACKER,
                      sources=[Source(ATTACKER, packets=9000, bytes=540000, share=0.97, evidence="two-way"),
                               Source("198.18.0.7", packets=10, share=0.01)],
                      details={"features": features, "model_version": 1})
    conn = connect(db)
    with conn:
        row = conn.execute("SELECT * FROM anomalies WHERE id = ?", (ids["anomalies"][0],)).fetchone()
        new_id = conn.execute(
            "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id,"
            " last_round_id, source, created_at) VALUES (?, ?, 'model', 0.5, 0.06, ?, ?, ?, ?, ?)",
            (row["evaluation_id"], row["port_id"], written.to_json(), row["first_round_id"], row["last_round_id"],
             ATTACKER, row["created_at"] + 1)).lastrowid
        unshared = Finding("model", None, 22, "tcp", 1, 2, 0.5, 0.06, details={"features": [{"feature": "syn"}]})
        bare_id = conn.execute(
            "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id,"
            " last_round_id, created_at) VALUES (?, ?, 'model', 0.5, 0.06, ?, 1, 2, ?)",
            (row["evaluation_id"], row["port_id"], unshared.to_json(), row["created_at"] + 2)).lastrowid
    conn.close()
    shown = _model_rows(db)
    old, new, odd = shown[ids["anomalies"][0]], shown[new_id], shown[ids["anomalies"][2]]
    assert [(f.name, f.contribution, f.observed, f.reconstructed) for f in old.features][:2] == [
        ("syn", 0.61, 0.95, 0.05), ("packets", 0.3, 0.9, 0.2)]
    assert old.sources == [ATTACKER] and old.port == "tcp/22 (ssh)"
    assert [(f.name, f.contribution) for f in new.features] == [("syn", 0.61), ("packets", 0.3)]
    assert new.sources == [ATTACKER, "198.18.0.7"] and new.port == "tcp/22 (ssh)"
    assert odd.features == [] and odd.sources == [] and odd.reasons == "not json"
    assert shown[bare_id].features == [] and shown[bare_id].reasons == unshared.to_json()   # no share: no guess


def test_occupancy_changes():
    rows = [{"round_id": r, "value": v, "protocol": "tcp", "pid": pid, "process": proc}
            for r, v, pid, proc in [(1, 22, 1, "sshd"), (1, 80, 2, "nginx"),
                                    (2, 22, 1, "sshd"), (2, 80, 3, "apache2"), (2, 8080, 4, "python3"),
                                    (4, 80, 3, "apache2")]]
    scanned = [(1, 60.0), (2, 120.0), (4, 240.0)]    # round 3's scanner failed: skipped, not "all gone"
    counts, changes = occupancy_changes(rows, scanned)
    assert counts == [(60.0, 2), (120.0, 3), (240.0, 1)]
    assert [(c.round_id, c.port, c.kind) for c in changes] == [
        (2, "tcp/8080 (http-alt)", "new listener"), (2, "tcp/80 (http)", "process change"),
        (4, "tcp/22 (ssh)", "listener gone"), (4, "tcp/8080 (http-alt)", "listener gone")]
    assert changes[1].detail == "nginx -> apache2"
    assert isinstance(changes[0], OccupancyChange)


def test_active_counts():
    entries = [{"created_at": 10, "removed_at": None, "expires_at": 50},
               {"created_at": 20, "removed_at": 30, "expires_at": None},
               {"created_at": 40, "removed_at": None, "expires_at": None}]
    assert active_counts(entries, [0, 10, 25, 30, 45, 50, 100]) == [0, 1, 2, 1, 2, 1, 1]


def test_port_labels_and_file_names():
    assert port_label(22, "tcp", long=True) == "tcp/22 (ssh)"
    assert port_label(-1, "udp", long=True) == "udp/ephemeral"
    assert port_label(8, "icmp", long=True) == "icmp/type 8"
    assert port_label(None, None, long=True) == "host-wide"
    assert port_label(22, "tcp") == "tcp/22" and port_label(-1, "udp") == "udp/ephemeral"
    assert port_label(8, "icmp") == "icmp/8" and port_label(None, None) == "host"
    assert facts.figure_name_for_port(-1, "tcp") == "port_tcp_ephemeral.png"
    assert facts.figure_name_for_port(53, "udp") == "port_udp_53.png"


def test_matplotlib_is_imported_only_when_drawing():
    code = ("import sys, app.services.ops.reports, app.cli; app.cli.build_parser(); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_reconstruction_figure_draws_the_error_per_round_against_each_versions_threshold(tmp_path, monkeypatch):
    """The figure's lines are the stored model_round_errors rows: the worst and median port per round,
    and one threshold step line per model version, from its first judged round on."""
    from app.db import evaluations as dbe
    from app.services.ops.reports import figures, model_figures
    db = tmp_path / "ports.db"
    ids = fill_database(db, end=time.time() - 60, rounds=60)
    rounds, (e1, e2) = ids["rounds"], ids["evaluations"]
    worst = [0.02 + 0.001 * (i % 7) for i in range(60)]
    worst[40] = 0.9                                                      # the spike model v2 flagged
    conn = connect(db)
    with conn:
        dbe.insert_round_errors(conn, e1, 1, 0.05, [(r, worst[i], worst[i] / 2, 3) for i, r in enumerate(rounds[:30])])
        dbe.insert_round_errors(conn, e2, 2, 0.08, [(r, worst[i], worst[i] / 2, 3)
                                                    for i, r in enumerate(rounds[30:], 30)])
        dbe.insert_round_errors(conn, e2, 2, float("inf"), [])           # nothing judged: nothing stored
    conn.close()
    conn = connect(db, readonly=True)
    model = facts.load_model_scores(conn, None)
    conn.close()
    assert [r["max_error"] for r in model.errors] == pytest.approx(worst)
    assert [r["model_version"] for r in model.errors] == [1] * 30 + [2] * 30

    drawn_figures = []
    monkeypatch.setattr(figures.Painter, "save", lambda self, fig, name: drawn_figures.append((name, fig)))
    drawn = model_figures.draw_reconstruction(figures.Painter(tmp_path), model)
    assert "60 judged rounds by 2 model versions" in drawn.caption
    (name, fig), = drawn_figures
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["error per round (worst port)"].get_ydata()) == pytest.approx(worst)
    assert list(lines["error per round (median port)"].get_ydata()) == pytest.approx([w / 2 for w in worst])
    v1, v2 = lines["threshold, model v1"], lines["threshold, model v2"]
    assert v1.get_drawstyle() == v2.get_drawstyle() == "steps-post"
    assert set(v1.get_ydata()) == {0.05} and set(v2.get_ydata()) == {0.08}
    assert len(v1.get_xdata()) == 31 and v1.get_xdata()[-1] == v2.get_xdata()[0]   # v1 holds until v2 begins

    monkeypatch.undo()
    index = write_report(db, tmp_path / "out", since="all")
    assert png_size(index.parent / "reconstruction_error.png")[0] > 0     # looked at: tests/ keeps no copy
    assert "60 judged rounds by 2 model versions" in index.read_text()
