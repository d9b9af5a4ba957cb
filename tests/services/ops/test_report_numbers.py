"""The report's numbers against a store whose truth is known: a gap between two collector runs
(the first round after it covers the gap: its rate is over counts_since .. end_time), drops of an
entry removed between rounds (in the rounds' XDP counter and the ledger, never in a per-round row),
four 4-packet ports (folded into "other ports"), five listeners that went away (plural forms)."""
from __future__ import annotations

import json
import math
import time

import pytest

from app.cli import main
from app.db.connection import connect
from app.services.ops.reports import figures, write_report

IFACE = "pwgap0"
RATE = 5.0                      # packets per second on tcp/80, before, during and after the gap
ROUND = 10.0                    # first run: 10 s rounds
GAP = 80.0                      # nothing collected for 80 s
SHORT = 2.0                     # the second run's first round is 2 s long but covers the gap too
DROPS = 246                     # dropped for an entry removed before the next round read the map


def _port(conn, value, protocol="tcp"):
    return conn.execute("INSERT INTO ports (value, protocol) VALUES (?, ?)", (value, protocol)).lastrowid


def _round(conn, start, end, counts_since, packets, dropped=0):
    return conn.execute(
        "INSERT INTO rounds (start_time, end_time, counts_since, interface, xdp_mode, total_packets, total_bytes,"
        " parsed_packets, unparsed_packets, dropped_packets, scanner_status) VALUES (?, ?, ?, ?, 'generic', ?, ?, ?,"
        " 0, ?, 'ok')", (start, end, counts_since, IFACE, packets, packets * 100, packets, dropped)).lastrowid


def gap_store(path, end: float) -> dict:
    """Run 1: three 10 s rounds; 80 s of nothing; run 2: a 2 s round whose counts cover the gap, then
    a 10 s round. tcp/80 carries RATE packets/s throughout; four ports carry 4 packets each once;
    198.18.1.9 was blocked, dropped DROPS packets and was removed before run 2's first round."""
    conn = connect(path)
    t0 = end - (3 * ROUND + GAP + SHORT + ROUND)
    with conn:
        http = _port(conn, 80)
        small = [_port(conn, p) for p in (5001, 5002, 5003, 5004)]
        listeners = [_port(conn, p) for p in (7001, 7002, 7003, 7004, 7005)]
        spans = [(t0, t0 + ROUND, None), (t0 + ROUND, t0 + 2 * ROUND, t0 + ROUND),
                 (t0 + 2 * ROUND, t0 + 3 * ROUND, t0 + 2 * ROUND)]
        gap_end = t0 + 3 * ROUND + GAP
        spans += [(gap_end, gap_end + SHORT, t0 + 3 * ROUND), (gap_end + SHORT, gap_end + SHORT + ROUND, gap_end + SHORT)]
        ids = []
        for i, (start, stop, since) in enumerate(spans):
            covered = stop - (since if since is not None else start)
            packets = round(RATE * covered)
            rid = _round(conn, start, stop, since, packets, dropped=DROPS if i == 3 else 0)
            ids.append(rid)
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes) VALUES (?, ?, ?, ?, 0)",
                         (rid, http, packets, packets * 100))
            if i == 1:
                for port_id in small:
                    conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes) VALUES (?, ?, 4, 400, 0)",
                                 (rid, port_id))
            for port_id in (listeners if i < 2 else []):
                conn.execute("INSERT INTO rounds_ports (round_id, port_id, timestamp, pid, process, address, family,"
                             " state) VALUES (?, ?, ?, 100, 'svc', '0.0.0.0', 'ipv4', 'LISTEN')", (rid, port_id, stop))
        conn.execute("INSERT INTO blacklist (address, reason, origin, created_at, expires_at, status, drops, removed_at)"
                     " VALUES ('198.18.1.9/32', 'manual test', 'manual', ?, ?, 'removed', ?, ?)",
                     (t0 + 5, t0 + 3600, DROPS, t0 + 3 * ROUND + 10))
    conn.close()
    return {"rounds": ids, "gap_round": ids[3]}


@pytest.fixture
def store(tmp_path):
    now = time.time()
    db = tmp_path / "gap.db"
    return db, gap_store(db, now - 30), now


def _drawn_lines(monkeypatch) -> dict:
    """Every line the report draws, by figure file and label: (x as epoch seconds, y)."""
    drawn: dict = {}
    original = figures.Painter.save

    def save(self, fig, name):
        for ax in fig.axes:
            for line in ax.get_lines():
                xs = [x.timestamp() for x in line.get_xdata()]
                drawn.setdefault(name, {})[line.get_label()] = (xs, list(line.get_ydata()))
        return original(self, fig, name)
    monkeypatch.setattr(figures.Painter, "save", save)
    return drawn


def test_rates_are_over_the_span_the_counts_cover(store, tmp_path, monkeypatch):
    db, ids, now = store
    drawn = _drawn_lines(monkeypatch)
    write_report(db, tmp_path / "out", since="all", now=now)
    xs, ys = drawn["traffic.png"][f"{IFACE}: all packets"]
    rates = [y for y in ys if not math.isnan(y)]
    # the round after the gap holds 82 s of packets in a 2 s round: 5/s, not 205/s
    assert max(rates) == pytest.approx(RATE) and min(rates) == pytest.approx(RATE)
    _, port_ys = drawn["port_tcp_80.png"]["packets"]
    assert max(y for y in port_ys if not math.isnan(y)) == pytest.approx(RATE)
    # the gap round's segment starts where the counts start (the end of run 1), not at its own start
    segment_starts = xs[0::2]
    assert any(abs(x - (now - 30 - (SHORT + ROUND + GAP))) < 1e-3 for x in segment_starts)


def test_one_drop_total_from_the_rounds_counter_everywhere(store, tmp_path, capsys):
    db, ids, now = store
    conn = connect(db, readonly=True)
    ledger = conn.execute("SELECT SUM(drops) FROM blacklist").fetchone()[0]
    rounds_total = conn.execute("SELECT SUM(dropped_packets) FROM rounds").fetchone()[0]
    per_round_rows = conn.execute("SELECT COUNT(*) FROM blacklist_drops").fetchone()[0]
    conn.close()
    assert ledger == rounds_total == DROPS and per_round_rows == 0       # the store as a removal leaves it
    index = write_report(db, tmp_path / "out", since="all", now=now)
    page = index.read_text()
    manifest = json.loads((tmp_path / "out" / "report.json").read_text())
    assert manifest["drops"] == manifest["overview"]["dropped_packets"] == DROPS
    assert f"({DROPS} packets dropped in this window)" in page                  # the traffic caption
    assert f"{DROPS} packets dropped." in page                                  # the blocklist caption
    assert f"<tr><td>total</td><td></td><td></td><td></td><td></td><td>{DROPS}</td>" in page
    assert main(["--db", str(db), "blacklist", "list", "--all"]) == 0
    assert f"{DROPS} packets dropped by the blocklist" in capsys.readouterr().out
    assert main(["--db", str(db), "blacklist", "list"]) == 0                    # nothing active: still said
    assert f"the blocklist is empty; {DROPS} packets dropped" in capsys.readouterr().out


def test_small_ports_fold_into_other_and_plurals(store, tmp_path):
    db, ids, now = store
    index = write_report(db, tmp_path / "out", since="all", now=now)
    names = {p.name for p in (tmp_path / "out").glob("port_*.png")}
    assert names == {"port_tcp_80.png", "port_other.png"}
    page = index.read_text()
    assert "other ports (4 ports, 16 packets)" in page
    assert "5 listeners gone" in page and "listener gones" not in page


def test_blacklist_list_names_egress_drops_apart(store, capsys):
    """Drops of blocked destinations (TC egress) are said beside the XDP total, never added into it."""
    db, ids, now = store
    conn = connect(db)
    with conn:
        conn.execute("UPDATE rounds SET egress_dropped_packets = 12 WHERE id = ?", (ids["rounds"][-1],))
    conn.close()
    assert main(["--db", str(db), "blacklist", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{DROPS} packets dropped by the blocklist" in out
    assert "; 12 packets to blocked destinations dropped in TC egress" in out


@pytest.mark.kernel
def test_a_real_block_removed_between_rounds_is_counted_everywhere(lab, tmp_path):
    """Block a lab source, let it send 246 datagrams, unblock it, close the next round: the drops reach
    the rounds' counter and the ledger but no per-round row (the entry left the map before the round
    read it). The report, report.json and `blacklist list` all say 246."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=str(repo), PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=str(tmp_path / "p.db"),
               PORTWATCH_STATE_DIR=str(tmp_path / "state"), PORTWATCH_RUN_DIR=str(tmp_path / "run"))

    def app(*args):
        out = subprocess.run([sys.executable, "-m", "app", *args], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr
        return out.stdout
    app("collect", "--interface", lab.interface, "--round-seconds", "0.5", "--no-sniffer", "--no-scanner")
    src = lab.host_v4(0)
    app("blacklist", "add", src, "--ttl", "1h")
    assert lab.send("--src", src, "--dst", lab.root_v4, "--ports", "7500", "--count", "246").strip() == "246"
    app("blacklist", "remove", src)
    app("collect", "--interface", lab.interface, "--round-seconds", "0.5", "--no-sniffer", "--no-scanner")
    conn = connect(tmp_path / "p.db", readonly=True)
    counts = [conn.execute(q).fetchone()[0] for q in ("SELECT SUM(dropped_packets) FROM rounds",
                                                      "SELECT SUM(drops) FROM blacklist",
                                                      "SELECT COALESCE(SUM(drops), 0) FROM blacklist_drops")]
    conn.close()
    assert counts == [DROPS, DROPS, 0]
    report = json.loads(app("report", "--out", str(tmp_path / "r"), "--since", "all", "--json"))
    assert report["drops"] == report["overview"]["dropped_packets"] == DROPS
    assert app("blacklist", "list", "--all").splitlines()[-1].startswith(f"{DROPS} packets dropped by the blocklist")
