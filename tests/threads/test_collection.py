"""The collector against the real XDP program, in network namespaces (root + kernel).

XDP sits on the root-namespace end of a veth pair (lab.interface); traffic comes from the peer
namespace. Every assertion is an exact packet count read back from a real SQLite file.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import collect, make_settings

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def db(settings):
    import sqlite3
    return sqlite3.connect(settings.general.db)


def port_packets(conn, port, protocol):
    return conn.execute("SELECT COALESCE(SUM(ps.packets), 0) FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                        "WHERE p.value = ? AND p.protocol = ?", (port, protocol)).fetchone()[0]


def per_round_port(conn, port, protocol):
    return conn.execute("SELECT ps.round_id, ps.packets FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                        "WHERE p.value = ? AND p.protocol = ? ORDER BY ps.round_id", (port, protocol)).fetchall()


def source_packets(conn, address):
    return conn.execute("SELECT COALESCE(SUM(packets), 0) FROM source_stats WHERE address = ?", (address,)).fetchone()[0]


def global_sum(conn, name):
    return conn.execute("SELECT COALESCE(SUM(value), 0) FROM global_stats WHERE name = ?", (name,)).fetchone()[0]


def test_exact_counts_across_round_boundaries(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)                                   # load + a first (idle) round
    sent = {}
    batches = [  # (kind, src, dst, ports, count)
        ("udp", lab.host_v4(0), lab.root_v4, [5001, 5002], 30),
        ("udp", lab.host_v4(1), lab.root_v4, [5001], 20),
        ("udp", lab.host_v6(0), lab.root_v6, [5003], 25),
        ("syn", lab.host_v4(2), lab.root_v4, [8080, 8081, 8082], 4),
        ("syn", lab.host_v6(1), lab.root_v6, [8443], 7),
    ]
    for rnd in range(3):                              # three rounds, traffic in each
        for kind, src, dst, ports, count in batches:
            args = ["--kind", kind, "--src", src, "--dst", dst, "--ports", ",".join(map(str, ports)),
                    "--count", str(count + rnd)]
            if kind != "udp":
                args += ["--iface", lab.peer_interface]
            out = int(lab.send(*args).strip())
            assert out == (count + rnd) * len(ports)
            for p in ports:
                proto = "udp" if kind == "udp" else "tcp"
                sent[(p, proto)] = sent.get((p, proto), 0) + count + rnd
                sent[src] = sent.get(src, 0) + count + rnd
        collect(s, lab)
    conn = db(s)
    for (port, proto) in [k for k in sent if isinstance(k, tuple)]:
        assert port_packets(conn, port, proto) == sent[(port, proto)], (port, proto)
        rows = per_round_port(conn, port, proto)
        assert len(rows) == 3, rows                    # one row per round that had its traffic
    for src in [k for k in sent if isinstance(k, str)]:
        assert source_packets(conn, src) == sent[src], src
    # SYN counters: every TCP packet sent was a SYN
    syn = conn.execute("SELECT SUM(ps.syn) FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                       "WHERE p.protocol = 'tcp' AND p.value IN (8080, 8081, 8082, 8443)").fetchone()[0]
    assert syn == sum(v for k, v in sent.items() if isinstance(k, tuple) and k[1] == "tcp")
    # distinct ports: host 2 reached 3 TCP ports in every round
    dp = conn.execute("SELECT distinct_ports FROM source_stats WHERE address = ?", (lab.host_v4(2),)).fetchall()
    assert [r[0] for r in dp] == [3, 3, 3]
    # payload extremes: UDP payload is 32 bytes (the sender's default)
    mm = conn.execute("SELECT DISTINCT min_payload, max_payload FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                      "WHERE p.value = 5001 AND p.protocol = 'udp'").fetchall()
    assert mm == [(32, 32)]
    # nothing dropped, the XDP mode was recorded, and every counted frame is accounted for
    assert global_sum(conn, "dropped") == 0
    assert {r[0] for r in conn.execute("SELECT xdp_mode FROM rounds")} == {"generic (auto: veth)"}   # auto: veth -> generic
    assert global_sum(conn, "total") == global_sum(conn, "parsed") + global_sum(conn, "unparsed") + global_sum(conn, "non_ip")
    # flows: the top flows include the UDP flow from host 0 to 5001 with its exact count
    flow = conn.execute("SELECT SUM(packets) FROM flows WHERE src_address = ? AND dst_port = 5001 AND protocol = 'udp'",
                        (lab.host_v4(0),)).fetchone()[0]
    assert flow == sent[(5001, "udp")] - sum(20 + r for r in range(3))


def test_malformed_frames_pass_and_count_as_unparsed(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    # watch what the stack receives after XDP: an AF_PACKET socket sees only passed frames
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniff.bind((lab.interface, 0))
    sniff.settimeout(0.2)
    kinds = {"bad-ihl": 5, "truncated-tcp": 4, "truncated-ip": 3}
    for kind, n in kinds.items():
        assert int(lab.send("--kind", kind, "--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "7001",
                            "--count", str(n), "--iface", lab.peer_interface)) == n
    frag = int(lab.send("--kind", "fragment", "--src", lab.host_v4(1), "--dst", lab.root_v4, "--ports", "7002",
                        "--count", "6", "--iface", lab.peer_interface))
    vlan = int(lab.send("--kind", "vlan", "--src", lab.host_v4(2), "--dst", lab.root_v4, "--ports", "7003",
                        "--count", "5", "--iface", lab.peer_interface))
    qinq = int(lab.send("--kind", "qinq", "--src", lab.host_v4(2), "--dst", lab.root_v4, "--ports", "7004",
                        "--count", "3", "--iface", lab.peer_interface))
    ext = int(lab.send("--kind", "ipv6-ext", "--src", lab.host_v6(0), "--dst", lab.root_v6, "--ports", "7005",
                       "--count", "4", "--iface", lab.peer_interface))
    seen = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            frame, addr = sniff.recvfrom(65535)
        except socket.timeout:
            break
        if addr[2] != socket.PACKET_OUTGOING:
            seen += 1
    sniff.close()
    collect(s, lab)
    conn = db(s)
    malformed = sum(kinds.values())
    assert global_sum(conn, "unparsed") == malformed
    assert global_sum(conn, "dropped") == 0
    assert global_sum(conn, "fragments") == frag
    assert global_sum(conn, "vlan") == vlan + qinq
    # a non-first fragment counts under its protocol with port 0
    assert port_packets(conn, 0, "udp") == frag
    assert port_packets(conn, 7003, "udp") == vlan
    assert port_packets(conn, 7004, "udp") == qinq
    assert port_packets(conn, 7005, "udp") == ext
    # every frame we sent reached the stack after XDP (AF_PACKET sees passed frames only)
    assert seen >= malformed + frag + vlan + qinq + ext


def test_second_run_does_not_compile(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    conn = db(s)
    assert conn.execute("SELECT COUNT(*), MIN(reason) FROM xdp_loads").fetchone() == (1, "first-load")
    code = ("import sys; from app.cli import main; rc = main(['collect', '--interface', %r, '--round-seconds', '0.2', "
            "'--no-sniffer', '--no-scanner', '--db', %r]); print('BCC', 'bcc' in sys.modules); sys.exit(rc)"
            % (lab.interface, s.general.db))
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"), PORTWATCH_STATE_DIR=s.general.state_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "BCC False" in out.stdout                  # the process never imported BCC
    assert conn.execute("SELECT COUNT(*) FROM xdp_loads").fetchone()[0] == 1   # no second compile
    assert [r[0] for r in conn.execute("SELECT compiled FROM rounds ORDER BY id")] == [1, 0]


def test_sigkill_mid_round_loses_nothing(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"), PORTWATCH_STATE_DIR=s.general.state_dir,
               PORTWATCH_RUN_DIR=s.general.run_dir)
    proc = subprocess.Popen([sys.executable, str(REPO / "app" / "port_collector.py"), "--interface", lab.interface,
                             "--round-seconds", "30", "--no-sniffer", "--no-scanner", "--db", s.general.db],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        n = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6001", "--count", "77"))
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    m = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6001", "--count", "5"))
    collect(s, lab)                                   # the lock died with the process: no overlap error
    conn = db(s)
    assert port_packets(conn, 6001, "udp") == n + m
    assert conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2   # the killed round never landed


def test_overlapping_run_is_refused(lab, tmp_path):
    from app.errors import LockedError
    s = make_settings(tmp_path)
    collect(s, lab)
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"), PORTWATCH_STATE_DIR=s.general.state_dir,
               PORTWATCH_RUN_DIR=s.general.run_dir)
    proc = subprocess.Popen([sys.executable, "-m", "app", "collect", "--interface", lab.interface,
                             "--round-seconds", "5", "--no-sniffer", "--no-scanner", "--db", s.general.db],
                            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        with pytest.raises(LockedError):
            collect(s, lab)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_reload_keeps_counts(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    n1 = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6100", "--count", "11"))
    collect(s, lab)
    n2 = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6100", "--count", "13"))
    # a new build of the program (same map layout): reloaded with the pinned maps kept
    s.collector.extra_cflags = "-DPW_BUILD_REVISION=2"
    collect(s, lab)
    n3 = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6100", "--count", "17"))
    # a new map size: the maps must be recreated; a last round closes the old ones after the swap
    s.collector.flow_map_size = 4096
    collect(s, lab)
    n4 = int(lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", "6100", "--count", "19"))
    collect(s, lab)
    conn = db(s)
    assert port_packets(conn, 6100, "udp") == n1 + n2 + n3 + n4
    reasons = [r[0] for r in conn.execute("SELECT reason FROM xdp_loads ORDER BY id")]
    assert reasons == ["first-load", "source-changed", "maps-recreated"]
    ids = [r[0] for r in conn.execute("SELECT DISTINCT program_id FROM rounds ORDER BY id")]
    assert len(ids) == 3
    assert conn.execute("SELECT COUNT(*) FROM rounds WHERE note = 'last counts of the replaced maps'").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM rounds WHERE baseline = 1").fetchone()[0] == 0


def test_missing_interface_is_one_sentence(tmp_path):
    env = dict(os.environ, PORTWATCH_CONFIG="/dev/null")
    out = subprocess.run([sys.executable, "-m", "app", "collect", "--interface", "pwnosuch0", "--db",
                          str(tmp_path / "x.db")], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert out.returncode == 2
    assert out.stderr.strip() == "portwatch: error: interface pwnosuch0 does not exist: pick one from `ip link`"
    assert not (tmp_path / "x.db").exists()              # refused before any file was made


def test_down_detaches_and_unpins(lab, tmp_path):
    s = make_settings(tmp_path)
    collect(s, lab)
    pins = Path(s.general.pin_root) / lab.interface
    assert (pins / "prog").exists() and (pins / "port_stats").exists()
    from app.services.kernel import xdp
    assert xdp.describe(lab.interface, s.general.pin_root)["ours"]
    from app.services.collector import teardown
    done = teardown.down(s, lab.interface)
    assert any("detached" in d for d in done)
    assert not pins.exists()
    assert xdp.attached_program(lab.interface) is None


def test_round_with_scanner_and_sniffer_threads(lab, tmp_path):
    """A full round: occupancy with the listener's pid, sniffed packets, ephemeral folding that
    spares a port somebody listens on."""
    from app.services.ports import ephemeral_range
    low, high = ephemeral_range()
    listened, unlistened = low + 101, low + 202
    s = make_settings(tmp_path)
    s.scanner.enabled = True
    s.sniffer.enabled = True
    collect(s, lab)                                     # load (no threads)
    server = subprocess.Popen([sys.executable, "-c", (
        "import socket, time; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('%s', %d)); "
        "print('ready', flush=True); time.sleep(30)") % (lab.root_v4, listened)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        import threading
        from app.threads.collection import run_collection
        result = {}
        t = threading.Thread(target=lambda: result.update(r=run_collection(s, lab.interface, 4, 1)))
        t.start()
        time.sleep(2.0)                                 # the sniffer window is live by now
        lab.send("--src", lab.host_v4(0), "--dst", lab.root_v4, "--ports", f"{listened},{unlistened}", "--count", "9")
        t.join(timeout=60)
    finally:
        server.kill()
        server.wait()
    summary = result["r"][0]
    conn = db(s)
    row = conn.execute("SELECT scanner_status, sniffer_status, sniffer_packets FROM rounds WHERE id = ?",
                       (summary.round_id,)).fetchone()
    assert row[0] == "ok" and row[1] == "ok" and row[2] >= 18
    occ = conn.execute("SELECT rp.pid, rp.process FROM rounds_ports rp JOIN ports p ON p.id = rp.port_id "
                       "WHERE rp.round_id = ? AND p.value = ? AND p.protocol = 'udp'",
                       (summary.round_id, listened)).fetchone()
    assert occ is not None and occ[0] == server.pid
    assert port_packets(conn, listened, "udp") == 9     # listened: its own series
    assert port_packets(conn, unlistened, "udp") == 0   # nobody listens: folded ...
    assert port_packets(conn, -1, "udp") >= 9           # ... into the ephemeral bucket
    sniffed = conn.execute("SELECT COUNT(*) FROM packets WHERE round_id = ? AND dest_port = ? AND src_address = ?",
                           (summary.round_id, listened, lab.host_v4(0))).fetchone()[0]
    assert sniffed == 9
