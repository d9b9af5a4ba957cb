"""Fail closed and exact on every path — real XDP in network namespaces, real SQLite files.

Each test counts packets exactly: at a UDP sink behind XDP (what passed), in the pinned maps (what the
kernel counted) and in the database (what was stored). Where a file is claimed unchanged, its sha256 is
compared before and after.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.db import blacklist as queries
from app.db import series
from app.db.connection import connect
from app.errors import UsageError
from app.services.blocklist import blocklist
from app.services.kernel import enforcement
from app.services.collector import rounds, teardown
from app.services.kernel import bpf_structs, maps, pin_owner, xdp
from app.services.collector.collector import Collector, Observations
from tests.helpers import (REPO, UdpSink, blocklist_settings, bpftool_entries, collect, map_drops,  # noqa: F401
                           pin_root, send_udp)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def port_packets(db_path, port: int, protocol: str = "udp") -> int:
    conn = connect(db_path, readonly=True)
    try:
        return conn.execute("SELECT COALESCE(SUM(ps.packets), 0) FROM port_stats ps JOIN ports p ON p.id = ps.port_id "
                            "WHERE p.value = ? AND p.protocol = ?", (port, protocol)).fetchone()[0]
    finally:
        conn.close()


def cli(settings, *args, timeout=120) -> subprocess.CompletedProcess:
    """``python -m app ARGS`` with ``settings``' paths (database, state, run dir, pin root)."""
    env = dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=settings.general.db,
               PORTWATCH_STATE_DIR=settings.general.state_dir, PORTWATCH_RUN_DIR=settings.general.run_dir,
               PORTWATCH_PIN_ROOT=settings.general.pin_root, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=timeout)


class Stream:
    """A paced UDP stream from a lab host (one datagram per ``gap`` seconds until :meth:`finish`, bounded in
    count and time), received by a UdpSink drained in a thread (no datagram lost to a full socket buffer)."""

    def __init__(self, lab, src: str, port: int, count: int = 25000, gap: float = 0.001):
        self.sink = UdpSink(lab.root_v4, port)
        self.received: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        code = ("import signal, socket, sys, time\n"
                "stop = []\n"
                "signal.signal(signal.SIGTERM, lambda *a: stop.append(1))\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))\n"
                "n, deadline = 0, time.monotonic() + 60\n"
                "print('ready', flush=True)\n"
                "while n < int(sys.argv[4]) and not stop and time.monotonic() < deadline:\n"
                "    s.sendto(b'x' * 32, (sys.argv[2], int(sys.argv[3]))); n += 1; time.sleep(float(sys.argv[5]))\n"
                "print(n)\n")
        self.proc = lab.popen(sys.executable, "-c", code, src, lab.root_v4, str(port), str(count), str(gap),
                              stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def _drain(self):
        while not self._stop.is_set():
            for src, n in self.sink.drain(0.5).items():
                self.received[src] = self.received.get(src, 0) + n

    def finish(self) -> int:
        """Stop the sender; returns how many it sent (received counts are in ``received``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        time.sleep(0.5)
        self._stop.set()
        self._thread.join(timeout=5)
        for src, n in self.sink.drain(1.0).items():
            self.received[src] = self.received.get(src, 0) + n
        self.sink.close()
        return int(out.strip())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stop.set()
        self.sink.close()


def settings_of(tmp_path, name, pin_root):
    """Settings of database ``name`` (its own directory), pinned under ``pin_root``; one run dir for all, as
    on a host (/run/portwatch)."""
    (tmp_path / name).mkdir(exist_ok=True)
    s = blocklist_settings(tmp_path / name, pin_root)
    s.general.run_dir = str(tmp_path / "run")
    return s


def loaded_with_block(lab, tmp_path, pin_root, name="a"):
    """Settings of database ``name`` pinned under ``pin_root``, loaded by one collection, with lab host 0 blocked."""
    s = settings_of(tmp_path, name, pin_root)
    collect(s, lab)
    conn = connect(s.general.db)
    blocklist.add_manual(conn, s, lab.host_v4(0), reason="test")
    enforcement.apply(conn, s)
    conn.close()
    return s, Path(s.general.pin_root) / lab.interface


@pytest.mark.kernel
def test_blocked_source_sending_through_a_recreating_reload_never_passes(lab, tmp_path, pin_root):
    s, pdir = loaded_with_block(lab, tmp_path, pin_root)
    blocked, other = lab.host_v4(0), lab.host_v4(1)
    old_map_id = maps.PinnedMap(pdir / "blacklist").info.id
    blocked_stream = Stream(lab, blocked, 7710)
    other_stream = Stream(lab, other, 7711)
    try:
        time.sleep(0.3)
        s.collector.blacklist_map_size = 8192           # a size change: the maps are recreated during the stream
        collect(s, lab)
        time.sleep(0.3)
        sent_blocked, sent_other = blocked_stream.finish(), other_stream.finish()
    finally:
        blocked_stream.kill()
        other_stream.kill()
    collect(s, lab)
    assert maps.PinnedMap(pdir / "blacklist").info.id != old_map_id      # really a new map
    assert sent_blocked > 300 and sent_other > 300
    assert blocked_stream.received == {}                                # 0 packets of the blocked source passed
    assert other_stream.received == {other: sent_other}                  # and XDP let everything else through
    conn = connect(s.general.db)
    reasons = [r[0] for r in conn.execute("SELECT reason FROM xdp_loads ORDER BY id")]
    assert reasons == ["first-load", "maps-recreated"]
    # exact on that path too: the replaced maps' last round + the new maps' rounds hold every packet
    assert queries.get_entry(conn, f"{blocked}/32")["drops"] == sent_blocked
    assert conn.execute("SELECT SUM(drops) FROM blacklist_drops WHERE address = ?",
                        (f"{blocked}/32",)).fetchone()[0] == sent_blocked
    assert port_packets(s.general.db, 7711) == sent_other
    assert conn.execute("SELECT COUNT(*) FROM rounds WHERE note = 'last counts of the replaced maps'").fetchone()[0] == 1
    assert (f"{blocked}/32", "map-prefill") in [(r["address"], r["action"]) for r in queries.events(conn)]
    assert not (pdir / xdp.RETIRED).exists()
    # the stream straddled the swap: the old map dropped some, the new one the rest
    last_old = conn.execute("SELECT id FROM rounds WHERE note = 'last counts of the replaced maps'").fetchone()[0]
    old, new = conn.execute("SELECT COALESCE(SUM(CASE WHEN round_id <= ? THEN drops END), 0), "
                            "COALESCE(SUM(CASE WHEN round_id > ? THEN drops END), 0) FROM blacklist_drops",
                            (last_old, last_old)).fetchone()
    assert old > 0 and new > 0 and old + new == sent_blocked
    conn.close()


@pytest.mark.kernel
def test_a_second_database_is_refused_and_the_map_keeps_its_entries(lab, tmp_path, pin_root):
    a, pdir = loaded_with_block(lab, tmp_path, pin_root, "a")
    b = settings_of(tmp_path, "b", pin_root)
    conn_b = connect(b.general.db)                       # database b exists, with its own (empty) ledger
    enforcement.apply(conn_b, b)                         # `blacklist` commands of b skip a's interface
    conn_b.close()
    before_a, before_b = sha256(a.general.db), sha256(b.general.db)
    out = cli(b, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"portwatch: error: interface {lab.interface} is enforced by another database "
        f"({Path(a.general.db).resolve()}): run `python -m app down --interface {lab.interface}` first, or pass "
        "--takeover to move it to this database on purpose")
    fresh = settings_of(tmp_path, "c", pin_root)       # a database that does not exist yet
    out = cli(fresh, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner")
    assert out.returncode == 2 and "is enforced by another database" in out.stderr
    assert not Path(fresh.general.db).exists()           # refused before it was created
    assert sha256(a.general.db) == before_a and sha256(b.general.db) == before_b
    assert bpftool_entries(pdir) == 1                    # the entry is still there ...
    with UdpSink(lab.root_v4, 7720) as sink:
        assert send_udp(lab, lab.host_v4(0), lab.root_v4, 7720, 30) == 30
        assert sink.drain() == {}                        # ... and still enforced
    assert map_drops(pdir, lab.host_v4(0)) == 30
    assert pin_owner.read(pdir)["db_path"] == str(Path(a.general.db).resolve())


@pytest.mark.kernel
def test_a_new_database_first_round_is_a_baseline_with_no_history(lab, tmp_path, pin_root):
    a, pdir = loaded_with_block(lab, tmp_path, pin_root, "a")
    src = lab.host_v4(1)
    assert send_udp(lab, src, lab.root_v4, 7730, 700) == 700          # history of database a, not of b
    b = settings_of(tmp_path, "b", pin_root)
    out = cli(b, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer", "--no-scanner",
              "--takeover")
    assert out.returncode == 0, out.stderr
    assert "baseline" in out.stdout
    conn = connect(b.general.db)
    # the takeover's baseline (stored before the pin record named b), then the run's own round
    [base, own] = conn.execute("SELECT * FROM rounds ORDER BY id").fetchall()
    assert base["baseline"] == 1 and base["total_packets"] == 0
    assert own["baseline"] == 0 and own["total_packets"] == 0
    for table in ("port_stats", "source_stats", "blacklist_drops"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    # no inbound flow and nothing of a's history; the host's own link chatter (an IPv6 MLD report or
    # router solicitation the kernel sends on the veth at its own times) may be an outbound flow of the round
    history = [dict(r) for r in conn.execute(
        "SELECT * FROM flows WHERE direction = 'in' OR ? IN (src_address, dst_address)", (src,))]
    assert history == []
    assert [r["id"] for r in series.rounds_after(conn, 0, 100)] == [own["id"]]
    assert send_udp(lab, src, lab.root_v4, 7730, 250) == 250
    collect(b, lab)
    assert port_packets(b.general.db, 7730) == 250                     # exactly what came after the baseline
    assert [r["id"] for r in series.rounds_after(conn, 0, 100)] == [own["id"], own["id"] + 1]
    # the takeover moved enforcement: b's (empty) ledger now rules the map, a is refused
    assert bpftool_entries(pdir) == 0
    assert pin_owner.read(pdir)["db_path"] == str(Path(b.general.db).resolve())
    with pytest.raises(UsageError, match="is enforced by another database"):
        collect(a, lab)
    conn.close()


@pytest.mark.kernel
def test_down_mid_stream_stores_every_packet_counted_before_the_detach(lab, tmp_path, pin_root):
    a, pdir = loaded_with_block(lab, tmp_path, pin_root, "a")
    src = lab.host_v4(1)
    assert send_udp(lab, src, lab.root_v4, 7740, 500) == 500
    # hold the maps open: after `down` they are unpinned and detached, so what they hold is frozen
    port_map, global_map = maps.PinnedMap(pdir / "port_stats"), maps.PinnedMap(pdir / "global")
    stream = Stream(lab, src, 7740)
    other = settings_of(tmp_path, "other", pin_root)   # `down` run with another database: still works
    try:
        time.sleep(1.0)
        out = cli(other, "down", "--interface", lab.interface)
        time.sleep(0.5)
        sent = stream.finish()
    finally:
        stream.kill()
    assert out.returncode == 0, out.stderr
    assert "stored a final round" in out.stdout and str(Path(a.general.db).resolve()) in out.stdout
    assert xdp.attached_program(lab.interface) is None and not pdir.exists()
    assert not Path(other.general.db).exists()
    frozen = rounds.diff(rounds.read_map(port_map), rounds.empty("port_stats"))     # every key, whole
    [at_detach] = [int(v[0]) for port, v in zip(frozen.field("port").tolist(), frozen.values.tolist()) if port == 7740]
    total_at_detach = int(rounds.read_map(global_map).counters[0][bpf_structs.GLOBAL_NAMES.index("total")])
    port_map.close()
    global_map.close()
    assert stream.received == {src: sent}
    assert 500 < at_detach < 500 + sent                  # the detach fell inside the stream
    assert port_packets(a.general.db, 7740) == at_detach                # every packet counted up to the detach
    conn = connect(a.general.db, readonly=True)
    assert conn.execute("SELECT SUM(total_packets) FROM rounds").fetchone()[0] == total_at_detach
    assert conn.execute("SELECT note FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0] == "final round: down"
    conn.close()


@pytest.mark.kernel
def test_down_then_collect_counts_exactly(lab, tmp_path, pin_root):
    """`down` then `collect` once lost 2,000 of 3,500 packets to a stale snapshot: every packet is counted once."""
    s = blocklist_settings(tmp_path, pin_root)
    collect(s, lab)
    src = lab.host_v4(1)
    assert send_udp(lab, src, lab.root_v4, 7750, 1000) == 1000
    assert any("final round" in d for d in teardown.down(s, lab.interface))
    assert send_udp(lab, src, lab.root_v4, 7750, 500) == 500            # nothing attached: nothing to count
    collect(s, lab)                                                   # a first load again: new maps
    assert send_udp(lab, src, lab.root_v4, 7750, 2000) == 2000
    collect(s, lab)
    assert port_packets(s.general.db, 7750) == 3000
    conn = connect(s.general.db, readonly=True)
    assert conn.execute("SELECT COUNT(*) FROM rounds WHERE baseline = 1").fetchone()[0] == 0
    conn.close()


def _load_cmd(s, interface):
    pdir = Path(s.general.pin_root) / interface
    return [sys.executable, "-m", "app.services.kernel.xdp_loader", "load", "--interface", interface, "--pin-dir", str(pdir),
            "--mode", s.collector.xdp_mode, "--hash", xdp.source_hash(s),
            *("--flag=" + f for f in xdp.build_flags(s))]


@pytest.mark.kernel
def test_a_loader_killed_while_compiling_leaves_a_record_status_doctor_report_down_removes(lab, tmp_path, pin_root):
    s = blocklist_settings(tmp_path, pin_root)
    pdir = Path(s.general.pin_root) / lab.interface
    loader = subprocess.Popen(_load_cmd(s, lab.interface), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    loader.stdin.write("{}")
    loader.stdin.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ((pin_owner.read(pdir) or {}).get("load") or {}).get("state") != "compiling":
        time.sleep(0.005)
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(timeout=10)
    record = pin_owner.read(pdir)
    assert record["load"]["state"] == "compiling" and record["load"]["pid"] == loader.pid
    assert xdp.attached_program(lab.interface) is None
    problem = (f"a load of the XDP program on {lab.interface} did not finish (pid {loader.pid} stopped while "
               f"compiling): `python -m app down --interface {lab.interface}` removes it")
    assert pin_owner.describe_attachment(lab.interface, s.general.pin_root)["problem"] == problem
    out = cli(s, "status", "--interface", lab.interface)
    assert problem in out.stdout, out.stdout + out.stderr
    out = cli(s, "doctor")
    assert problem in out.stdout, out.stdout + out.stderr
    out = cli(s, "down", "--interface", lab.interface)
    assert out.returncode == 0 and f"removed pins {pdir}" in out.stdout, out.stdout + out.stderr
    assert not pdir.exists()
    assert pin_owner.describe_attachment(lab.interface, s.general.pin_root)["problem"] is None


@pytest.mark.kernel
def test_a_load_stopped_while_attaching_is_recorded_and_down_detaches_it(lab, tmp_path, pin_root):
    """The attaching step is recorded (program id) before the attach: a loader stopped right after the
    attach leaves a program the record names. (The stop is simulated: the record is set back to that step
    with a pid that has exited.)"""
    s = blocklist_settings(tmp_path, pin_root)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    attached = xdp.attached_program(lab.interface)[0]
    record = pin_owner.read(pdir)
    assert record["load"]["state"] == "attached" and record["load"]["program_id"] == attached
    gone = subprocess.Popen(["true"])
    gone.wait()
    (pdir / "prog").unlink()                              # not even the pin names it: only the record does
    pin_owner.update(pdir, load=dict(record["load"], state="attaching", pid=gone.pid))
    info = pin_owner.describe_attachment(lab.interface, s.general.pin_root)
    assert info["recorded"] and "stopped while attaching" in info["problem"]
    out = cli(s, "down", "--interface", lab.interface)
    assert out.returncode == 0, out.stderr
    assert f"detached XDP program {attached} from {lab.interface}" in out.stdout
    assert xdp.attached_program(lab.interface) is None and not pdir.exists()


@pytest.mark.kernel
def test_a_leftover_program_with_no_record_is_reported_and_removed_by_down(lab, tmp_path, pin_root):
    s = blocklist_settings(tmp_path, pin_root)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    attached = xdp.attached_program(lab.interface)[0]
    subprocess.run(["rm", "-r", str(pdir)], check=True)  # pins and record gone, the program still attached
    assert xdp.attached_program(lab.interface)[0] == attached
    problem = (f"a portwatch XDP program (id {attached}) is attached to {lab.interface} with no record of its load: "
               f"`python -m app down --interface {lab.interface}` removes it")
    assert pin_owner.describe_attachment(lab.interface, s.general.pin_root)["problem"] == problem
    assert problem in cli(s, "status", "--interface", lab.interface).stdout
    assert problem in cli(s, "doctor").stdout
    out = cli(s, "down", "--interface", lab.interface)
    assert out.returncode == 0 and f"detached leftover XDP program {attached}" in out.stdout, out.stdout + out.stderr
    assert xdp.attached_program(lab.interface) is None


def test_snapshot_of_other_maps_is_no_baseline(tmp_path):
    """Root-free: a snapshot read from other maps (ids differ) is ignored; maps born for this database count
    from zero, others make the round a baseline."""
    from tests.fakes import fake_maps
    from tests.helpers import make_settings
    from app.services.kernel.bpf_structs import PwGlobal
    s = make_settings(tmp_path)
    s.general.pin_root = str(tmp_path / "no-pins")
    fakes = fake_maps(ncpu=1)
    c = Collector(s, "fake0")
    c.conn = connect(c.db_path)
    c._maps = fakes
    g = PwGlobal()
    g.c[bpf_structs.GLOBAL_NAMES.index("total")] = 40
    fakes["global"].put(maps.INDEX_0, g)
    first = c.close_round(time.time(), Observations())
    assert first.baseline and first.packets == 0                # maps not born for this database
    g.c[bpf_structs.GLOBAL_NAMES.index("total")] = 55
    fakes["global"].put(maps.INDEX_0, g)
    second = c.close_round(time.time(), Observations())
    assert not second.baseline and second.packets == 15
    c.close()


@pytest.mark.kernel
def test_a_run_killed_between_the_swap_and_the_last_round_of_the_replaced_maps_loses_nothing(lab, tmp_path, pin_root):
    s = settings_of(tmp_path, "a", pin_root)
    collect(s, lab)
    src = lab.host_v4(1)
    pdir = Path(s.general.pin_root) / lab.interface
    assert send_udp(lab, src, lab.root_v4, 7760, 300) == 300
    s.collector.flow_map_size = 4096
    state = xdp.ensure_loaded(s, lab.interface)          # the loader ran, then the collector "died"
    assert state.reason == "maps-recreated" and state.retired == pdir / xdp.RETIRED and state.retired.exists()
    assert send_udp(lab, src, lab.root_v4, 7760, 200) == 200          # counted by the new maps
    summaries = collect(s, lab)                          # the next run closes the retired maps first
    assert not (pdir / xdp.RETIRED).exists()
    assert port_packets(s.general.db, 7760) == 500
    conn = connect(s.general.db, readonly=True)
    notes = [r[0] for r in conn.execute("SELECT note FROM rounds ORDER BY id")]
    assert notes[-2:] == ["last counts of the replaced maps", None] and not summaries[-1].baseline
    conn.close()


@pytest.mark.kernel
def test_opening_reconciles_before_the_round_starts(lab, tmp_path, pin_root):
    s, pdir = loaded_with_block(lab, tmp_path, pin_root)
    blocked = lab.host_v4(0)
    with maps.PinnedMap(pdir / "blacklist") as m:        # emptied by hand between two runs
        assert m.delete(bpf_structs.lpm_key(ipaddress.ip_network(f"{blocked}/32")))
    c = Collector(s, lab.interface)
    c.open()
    try:
        with UdpSink(lab.root_v4, 7770) as sink:         # during the round, before it closes
            assert send_udp(lab, blocked, lab.root_v4, 7770, 50) == 50
            assert sink.drain() == {}
        c.close_round(time.time(), Observations())
    finally:
        c.close()
    conn = connect(s.general.db, readonly=True)
    assert queries.get_entry(conn, f"{blocked}/32")["drops"] == 50
    conn.close()


@pytest.mark.kernel
def test_a_recreating_reload_that_fails_to_build_puts_the_running_maps_back(lab, tmp_path, pin_root):
    from app.errors import BpfError
    s, pdir = loaded_with_block(lab, tmp_path, pin_root)
    src, blocked = lab.host_v4(1), lab.host_v4(0)
    assert send_udp(lab, src, lab.root_v4, 7780, 100) == 100
    s.collector.blacklist_map_size = 8192                # asks for new maps ...
    s.collector.extra_cflags = "-DFLOW_MAP_SIZE=nonsense"  # ... with a build that cannot compile
    with pytest.raises(BpfError, match="failed to compile"):
        collect(s, lab)
    assert not (pdir / xdp.RETIRED).exists() and (pdir / "port_stats").exists()
    with UdpSink(lab.root_v4, 7781) as sink:             # the running program still enforces
        assert send_udp(lab, blocked, lab.root_v4, 7781, 20) == 20
        assert sink.drain() == {}
    assert send_udp(lab, src, lab.root_v4, 7780, 50) == 50
    s.collector.blacklist_map_size, s.collector.extra_cflags = 16384, ""
    collect(s, lab)
    assert port_packets(s.general.db, 7780) == 150
    conn = connect(s.general.db, readonly=True)
    assert [r[0] for r in conn.execute("SELECT reason FROM xdp_loads")] == ["first-load"]
    assert queries.get_entry(conn, f"{blocked}/32")["drops"] == 20
    conn.close()


@pytest.mark.kernel
def test_a_loader_killed_after_retiring_the_pins_before_the_swap_loses_nothing(lab, tmp_path, pin_root):
    s = settings_of(tmp_path, "a", pin_root)
    collect(s, lab)
    pdir = Path(s.general.pin_root) / lab.interface
    src = lab.host_v4(1)
    assert send_udp(lab, src, lab.root_v4, 7790, 120) == 120
    xdp.retire_pins(pdir)                                # what a loader did before it was killed
    assert xdp.retired_still_attached(lab.interface, pdir)
    assert send_udp(lab, src, lab.root_v4, 7790, 80) == 80
    collect(s, lab)                                      # the pins go back; nothing is reloaded
    assert not (pdir / xdp.RETIRED).exists()
    assert port_packets(s.general.db, 7790) == 200
    conn = connect(s.general.db, readonly=True)
    assert [r[0] for r in conn.execute("SELECT reason FROM xdp_loads")] == ["first-load"]
    conn.close()
