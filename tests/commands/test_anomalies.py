"""`python -m app anomalies list|show` and `allow add|remove|list` on a store built by real rounds in a
netns lab: an nmap scan that goes on over two evaluations is ONE finding that grows; a later UDP flood
from the same source to a port nothing listens on raises its own finding; a new listener names its
process; a simulated detector (blocklist.simulate) records would-block; the syslog alert carries the
finding's id and summary; `allow add` lifts the block. Bad input: one sentence, exit 2, db unchanged."""
from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app import config
from app.cli import main
from app.threads.collection import run_collection
from tests.helpers import pin_root, send_udp  # noqa: F401

LISTEN = r"""
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
time.sleep(float(sys.argv[3]))
"""


def db_bytes(db: Path) -> bytes:
    """The database's bytes (the main file after a checkpoint, plus any WAL)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def nmap(lab, src: str, ports: str) -> None:
    lab.run("nmap", "-sS", "-Pn", "-n", "--max-retries", "0", "-S", src, "-e", lab.peer_interface,
            "-p", ports, lab.root_v4, timeout=60)


@pytest.fixture
def store(lab, tmp_path, pin_root, monkeypatch, capsys):  # noqa: F811
    """Four real rounds and three evaluations; yields (settings, run(*argv) -> (code, out, err), facts)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(3)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'db = "{tmp_path / "ports.db"}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'run_dir = "{tmp_path / "run"}"\npin_root = "{pin_root}"\n'
                   '[scanner]\nenabled = true\n[sniffer]\nenabled = false\n'
                   '[evaluator]\nreport_after = false\n'
                   '[blocklist]\nsimulate = ["port_scan"]\n'
                   f'[alerts]\nsyslog = true\nsyslog_address = "udp://127.0.0.1:{receiver.getsockname()[1]}"\n')
    monkeypatch.setenv("PORTWATCH_CONFIG", str(cfg))
    settings = config.load(str(cfg))

    def run(*argv):
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    scanner = lab.host_v4(2)
    listener = None
    try:
        run_collection(settings, lab.interface, 0.5, 1)                         # round 1: the baseline
        listener = subprocess.Popen([sys.executable, "-c", LISTEN, lab.root_v4, "6391", "120"],
                                    stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "ready"
        nmap(lab, scanner, "2000-2039")
        run_collection(settings, lab.interface, 0.5, 1)                         # round 2: scan + new listener
        assert run("evaluate")[0] == 0
        alerts = []
        while True:
            try:
                alerts.append(receiver.recv(4096).decode())
            except socket.timeout:
                break
        nmap(lab, scanner, "2040-2079")
        run_collection(settings, lab.interface, 0.5, 1)                         # round 3: the scan goes on
        assert run("evaluate")[0] == 0
        sent = send_udp(lab, scanner, lab.root_v4, 6393, 500)
        run_collection(settings, lab.interface, 0.5, 1)                         # round 4: a flood, no scan
        assert run("evaluate")[0] == 0
        facts = {"scanner": scanner, "sent": sent, "alerts": alerts,
                 "process": psutil.Process(listener.pid).name(), "pid": listener.pid}
        yield settings, run, facts
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        receiver.close()


@pytest.mark.kernel
def test_anomalies_list_and_show_explain_the_lab(store):
    settings, run, facts = store
    scanner = facts["scanner"]
    code, out, err = run("anomalies", "list", "--json")
    assert code == 0, err
    items = json.loads(out)
    scans = [i for i in items if i["detector"] == "port_scan"]
    assert len(scans) == 1, scans                          # one nmap scan over two evaluations: one finding
    scan = scans[0]
    assert scan["source"] == scanner and scan["rounds"] == [2, 3] and scan["updated_at"] is not None
    assert scan["summary"].startswith(f"port scan from {scanner} (")
    assert "tcp 2000-2079 (80)" in scan["summary"]
    # the later UDP flood from the same source is its own finding, not filed under the scan
    flood = [i for i in items if i["detector"] == "unlistened_port" and i["port"] == 6393]
    assert len(flood) == 1 and flood[0]["source"] == scanner and flood[0]["rounds"] == [4, 4]
    assert flood[0]["summary"].startswith(f"traffic to udp/6393, where nothing listens: {facts['sent']:,} packets")
    listener = [i for i in items if i["detector"] == "new_listener" and i["port"] == 6391]
    assert len(listener) == 1 and facts["process"] in listener[0]["summary"]

    # the text table: one line per finding, newest first, the same summaries
    code, out, _ = run("anomalies", "list")
    waiting = [line for line in out.splitlines() if ": warming up, " in line]   # the header: no baseline yet
    lines = out.splitlines()[len(waiting):]
    assert waiting[0].startswith("exfiltration: warming up, ") and waiting[0].endswith(" of 30 rounds")
    assert code == 0 and lines[0].split() == ["ID", "WHEN", "DETECTOR", "PORT", "SUMMARY"]
    assert [int(line.split()[0]) for line in lines[1:]] == [i["id"] for i in items]
    assert any(line.endswith(scan["summary"]) for line in lines)
    code, out, _ = run("anomalies", "list", "--detector", "port_scan", "--since", "1h")
    assert code == 0 and len(out.splitlines()) == 2

    # show: when, sources with evidence class, compact port ranges, what was done
    code, out, err = run("anomalies", "show", str(scan["id"]))
    assert code == 0, err
    assert out.startswith(f"anomaly {scan['id']}: {scan['summary']}\n")
    assert "  when       rounds 2-3, " in out and " UTC to " in out
    assert "  ports      tcp 2000-2079 (80)\n" in out
    assert f"             {scanner}" in out and "one-way" in out
    assert f"would block (dry run) {scanner}/32 until " in out
    assert "alerted on syslog at " in out
    code, out, _ = run("anomalies", "show", str(scan["id"]), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["ports"] == {"tcp": "2000-2079"} and shown["details"]["evaluations"] == 2
    assert shown["details"]["flagged_rounds"] == 2 and shown["blocks"][0]["status"] == "dry-run"
    assert shown["sources"][0]["address"] == scanner and shown["sources"][0]["evidence"] == "one-way"
    # the port and its process, from occupancy
    code, out, _ = run("anomalies", "show", str(listener[0]["id"]))
    assert code == 0 and f"  port       udp/6391: {facts['process']} (pid {facts['pid']}" in out
    code, out, _ = run("anomalies", "show", str(flood[0]["id"]))
    assert code == 0 and "  port       udp/6393: nothing listening (occupancy)" in out
    assert f"{facts['sent']:>9,}" in out and "100.0%" in out

    # the syslog alert of the first evaluation carried the finding's id and the same summary line
    first_scan = [a for a in facts["alerts"] if f"anomaly {scan['id']}: port scan from {scanner}" in a]
    assert first_scan and "tcp 2000-2039 (40)" in first_scan[0]

    # blacklist list links the (simulated) block to its finding
    code, out, _ = run("blacklist", "list")
    row = next(line for line in out.splitlines() if line.startswith(f"{scanner}/32"))
    assert code == 0 and " dry-run " in row and f"anomaly {scan['id']}" in row and row.endswith(scan["summary"])
    assert out.splitlines()[-1].startswith("explain a finding: python -m app anomalies show ID")


@pytest.mark.kernel
def test_allow_lifts_the_block_and_bad_input_changes_nothing(store):
    settings, run, facts = store
    scanner = facts["scanner"]
    db = Path(settings.general.db)
    before = db_bytes(db)
    for argv, says in [
        (("anomalies", "show", "999"), "there is no finding 999"),
        (("anomalies", "show", "abc"), "'abc' is not a finding id"),
        (("anomalies", "list", "--since", "yesterday"), "--since 'yesterday' is neither"),
        (("anomalies", "list", "--detector", "nope"), "no finding has detector 'nope'"),
        (("allow", "add", "fe80::1%eth0"), "carries a zone"),
        (("allow", "add", "198.18.0.5/24"), "has host bits set"),
        (("allow", "add", "not-an-address"), "is not an IPv4 or IPv6 address"),
        (("allow", "remove", "198.18.9.9"), "198.18.9.9/32 is not on the allowlist"),
    ]:
        code, out, err = run(*argv)
        assert code == 2 and out == "", (argv, out, err)
        assert err.startswith("portwatch: error: ") and says in err and err.count("\n") == 1, (argv, err)
    assert db_bytes(db) == before

    code, out, _ = run("allow", "list")
    assert code == 0 and out.strip() == "the allowlist is empty"
    code, out, err = run("allow", "add", scanner, "--reason", "our pentest box")
    assert code == 0, err
    assert out.startswith(f"allowlisted {scanner}/32; lifted its block on {scanner}/32")
    code, out, _ = run("allow", "list", "--json")
    assert [(i["address"], i["origin"], i["reason"]) for i in json.loads(out)] == [
        (f"{scanner}/32", "database", "our pentest box")]
    code, out, _ = run("blacklist", "list", "--all", "--json")
    entry = next(i for i in json.loads(out) if i["address"] == f"{scanner}/32")
    assert entry["status"] == "removed"
    # an automatic decision now refuses it: the database allowlist is honoured by the interlocks
    from app.db.connection import connect
    from app.services.blocklist import decisions
    conn = connect(db)
    try:
        protection = decisions.Protection.gather(settings, conn)
        assert protection.refusal(decisions.normalise(__import__("ipaddress").ip_network(scanner))) == \
            f"overlaps {scanner}/32 (allowlisted (python -m app allow))"
    finally:
        conn.close()
    code, out, _ = run("allow", "remove", scanner)
    assert code == 0 and out.strip() == f"removed {scanner}/32 from the allowlist"
    code, out, _ = run("allow", "list")
    assert out.strip() == "the allowlist is empty"


def test_without_a_database_or_with_a_corrupt_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PORTWATCH_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text(f'state_dir = "{tmp_path / "state"}"\npin_root = "{tmp_path / "no-pins"}"\n')
    db = tmp_path / "ports.db"
    assert main(["anomalies", "list", "--db", str(db)]) == 4
    assert "does not exist yet" in capsys.readouterr().err and not db.exists()
    assert main(["allow", "list", "--db", str(db)]) == 0
    assert capsys.readouterr().out.strip() == "the allowlist is empty" and not db.exists()
    db.write_bytes(b"this is not a database" * 200)
    for argv in (["anomalies", "list"], ["anomalies", "show", "1"], ["allow", "list"], ["allow", "add", "198.18.0.9"]):
        assert main([*argv, "--db", str(db)]) == 4, argv
        err = capsys.readouterr().err
        assert err.startswith("portwatch: error: database ") and err.count("\n") == 1, err
    assert db.read_bytes() == b"this is not a database" * 200


def test_show_a_model_finding_gives_its_features_in_units(tmp_path, monkeypatch, capsys):
    """A model finding as the evaluation stores it (no TensorFlow here): show prints the features that
    drove it, observed against usual (the reconstruction) in their units, and the block it caused."""
    from app.db.connection import connect
    from app.services.blocklist import decisions
    from app.services.evaluation.explain import fill_summaries
    from app.services.evaluation.findings import Finding, Source
    from tests.helpers import add_evaluation, blocklist_settings
    s = blocklist_settings(tmp_path, model_block_factor=2.0, model_needs_corroboration=False)   # blocks on its own here
    monkeypatch.setenv("PORTWATCH_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PORTWATCH_PIN_ROOT", s.general.pin_root)
    conn = connect(s.general.db)
    features = [{"feature": "packets", "observed": 600.0, "reconstructed": 41.5, "error": 0.8, "share": 0.7},
                {"feature": "mean_payload", "observed": 1200.0, "reconstructed": 40.0, "error": 0.2, "share": 0.2}]
    f = Finding("model", None, 5302, "udp", 1, 1, 0.9, 0.1, source="198.18.0.9",
                sources=[Source("198.18.0.9", packets=590, bytes=700_000, share=0.983)],
                details={"features": features, "packets": 600})
    fill_summaries(conn, [f])
    [f] = add_evaluation(conn, [f])
    [d] = decisions.decide(conn, s, [f], protection=decisions.Protection())
    assert d.action == "block"
    conn.close()
    assert main(["anomalies", "show", str(f.id), "--db", s.general.db]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"anomaly {f.id}: unusual traffic on udp/5302: packets 600 vs usual 41.5, mean_payload "
                          "1,200 vs usual 40 (error 9.0x the threshold), from 198.18.0.9 (98%, one-way), round 1\n")
    assert "  features   FEATURE            OBSERVED      USUAL  UNIT                  SHARE OF ERROR\n" in out
    assert "             packets                 600       41.5  packets/round         70%\n" in out
    assert "             mean_payload          1,200         40  bytes/packet          20%\n" in out
    assert "  done       blocked (active) 198.18.0.9/32 until " in out
    assert main(["anomalies", "list", "--since", "all", "--db", s.general.db]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if ": warming up, " not in line]   # header lines
    assert listed[1].endswith("unusual traffic on udp/5302: packets 600 vs usual 41.5, "
                                                            "mean_payload 1,200 vs usual 40 (error 9.0x the threshold), "
                                                            "from 198.18.0.9 (98%, one-way), round 1")
