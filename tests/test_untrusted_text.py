"""Untrusted text is inert: names from the network or from other users reach no terminal, page, alert or log
with a control character in them — and are stored as received.

A listener run as ``nobody`` names itself ``ESC]0;owned BEL ESC[2J`` (an OSC title and a CSI clear);
the real scanner reads it; findings, a CrowdSec block and a DNS name carry ESC, BEL, C1 CSI and DEL;
every surface is read back as bytes.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.db.connection import connect
from app.services import text
from app.services.collector.scanner import Scanner
from app.services.ops import alerts
from tests.helpers import REPO, add_evaluation, finding

EVIL = "\x1b]0;owned\x07\x1b[2J"            # 14 bytes: fits a process name (15)
EVIL_C1 = "x\x9b2Jy\x7fz"                  # C1 CSI and DEL
RAW = (b"\x1b", b"\x07", "\x9b".encode(), b"\x7f")


def assert_inert(data: bytes | str, where: str) -> None:
    data = data.encode() if isinstance(data, str) else data
    for raw in RAW:
        assert raw not in data, f"{where} holds a raw {raw!r}"


@pytest.fixture
def evil_listener():
    """A TCP listener on 127.0.0.1 run as nobody, its process name EVIL (prctl PR_SET_NAME)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as nobody")
    code = ("import ctypes, socket, sys, time\n"
            "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                             code, EVIL], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield proc.pid, port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def env(tmp_path) -> dict:
    return dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=str(tmp_path / "p.db"),
                PORTWATCH_STATE_DIR=str(tmp_path / "state"), PORTWATCH_RUN_DIR=str(tmp_path / "run"),
                PORTWATCH_PIN_ROOT=str(tmp_path / "no-pins"), PYTHONPATH=str(REPO))


def portwatch(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, env=env(tmp_path),
                          cwd=str(REPO), timeout=300)


def test_every_surface_prints_untrusted_names_inert(tmp_path, evil_listener):
    from app.db import rounds as rounds_db
    from app.db.occupancy import insert_occupancy
    from app.db.ports import PortIds
    from app.services.blocklist import blocklist
    from tests.helpers import make_settings
    pid, port = evil_listener
    [seen] = [l for l in Scanner().scan() if l.port == port and l.protocol == "tcp"]
    assert (seen.pid, seen.process, seen.user) == (pid, EVIL, "nobody")     # read as the process set it
    conn = connect(tmp_path / "p.db")
    now = time.time()
    with conn:
        round_id = rounds_db.insert_round(conn, {"start_time": now - 60, "end_time": now, "interface": "lo"})
        insert_occupancy(conn, round_id, now, [seen], PortIds(conn))
        conn.execute("INSERT INTO packets (timestamp, protocols, qry_name, round_id) VALUES (?, 'eth:ip:udp:dns', ?, ?)",
                     (now, EVIL_C1 + ".example", round_id))
    holders = [{"process": EVIL, "pid": pid, "user": EVIL_C1, "address": "127.0.0.1"}]
    [new] = add_evaluation(conn, [finding("new_listener", port=port, protocol="tcp", first_round_id=round_id,
                                          last_round_id=round_id, holders=holders, round_id=round_id)])
    s = make_settings(tmp_path)
    s.general.pin_root = str(tmp_path / "no-pins")
    blocklist.add_manual(conn, s, "198.18.0.9", reason=f"crowdsec {EVIL} {EVIL_C1}")
    conn.close()
    # stored as received
    raw = connect(tmp_path / "p.db", readonly=True)
    assert raw.execute("SELECT process FROM rounds_ports").fetchone()[0] == EVIL
    assert EVIL in raw.execute("SELECT reason FROM blacklist").fetchone()[0]
    raw.close()
    surfaces = {
        "anomalies list": ["anomalies", "list", "--since", "all"],
        "anomalies show": ["anomalies", "show", str(new.id)],
        "anomalies show --json": ["anomalies", "show", str(new.id), "--json"],
        "blacklist list": ["blacklist", "list"],
        "blacklist list --json": ["blacklist", "list", "--json"],
        "status": ["status"], "status --json": ["status", "--json"],
        "report": ["report", "--out", str(tmp_path / "report"), "--since", "all"],
        "doctor": ["doctor"],
    }
    for name, args in surfaces.items():
        out = portwatch(tmp_path, *args)
        assert_inert(out.stdout, f"{name} stdout")
        assert_inert(out.stderr, f"{name} stderr")
        if name in ("anomalies show", "anomalies list", "blacklist list"):
            assert "\\x1b]0;owned\\x07\\x1b[2J" in out.stdout.decode(), name     # shown, escaped
        if name.endswith("--json") and out.stdout.strip():
            json.loads(out.stdout)                                         # still valid JSON
    for page in ("index.html", "report.json"):
        assert_inert((tmp_path / "report" / page).read_bytes(), page)
    assert "\\x1b]0;owned\\x07\\x1b[2J" in (tmp_path / "report" / "index.html").read_text()
    json.loads((tmp_path / "report" / "report.json").read_text())


def test_alerts_and_logs_are_inert():
    from tests.helpers import finding as make
    f = make("new_listener", port=8080, summary=f"new listener on tcp/8080: {EVIL}")
    f.id = 7
    events = [alerts.anomaly_event(f), alerts.block_event("198.18.0.9", f"crowdsec/{EVIL_C1}: {EVIL}")]
    for e in events:
        assert_inert(e.summary, "alert summary (syslog line)")
        payload = text.json_dumps(alerts._payload(e, "host", time.time()), default=str)
        assert_inert(payload, "webhook body")
        assert json.loads(payload)["details"] is not None
    assert_inert(alerts._message(events, type("Cfg", (), {"mail_from": "", "mail_to": "root@localhost"})(),
                                 "host", time.time()).as_string(), "mail")
    record = logging.LogRecord("app", logging.WARNING, __file__, 1, "refused decision %s", (EVIL + EVIL_C1,), None)
    line = text.InertFormatter("%(message)s").format(record)
    assert_inert(line, "log line")
    assert line == "refused decision \\x1b]0;owned\\x07\\x1b[2Jx\\x9b2Jy\\x7fz"


def test_inert_escapes_c0_c1_and_del_and_keeps_the_rest():
    assert text.inert("a\x1b[31mb\x07\x9b\x7f\n\té") == "a\\x1b[31mb\\x07\\x9b\\x7f\\x0a\\x09é"
    assert text.inert_lines("one\ntwo\x1b") == "one\ntwo\\x1b"
    assert text.inert(None) == "" and text.inert(b"\xffok") == "\\udcffok"
    assert json.loads(text.json_dumps({"n": "\x7f\x9b"})) == {"n": "\x7f\x9b"}
