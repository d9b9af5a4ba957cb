"""One owner per interface: a takeover is an epoch, a failed takeover changes nothing, the interface lock
lives where no setting moves it, and a collector whose program vanished stops and says so.

Real XDP on a veth in a network namespace, real SQLite files; exact packet counts at the database.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.db.connection import connect
from app.services import locks
from app.services.blocklist import blocklist
from app.services.kernel import enforcement
from app.services.kernel import pin_owner, xdp
from tests.helpers import (REPO, UdpSink, bpftool_entries, collect, map_drops, pin_root,  # noqa: F401
                           send_udp)
from tests.services.kernel.test_fail_closed import cli, port_packets, settings_of, sha256


def rounds_of(db_path) -> list[dict]:
    conn = connect(db_path, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT id, baseline, total_packets, note FROM rounds ORDER BY id")]
    finally:
        conn.close()


def takeover(settings, lab):
    from app.threads import collection
    return collection.run_collection(settings, lab.interface, 0.2, 1, with_threads=False, takeover=True)


@pytest.mark.kernel
def test_taking_an_interface_back_stores_zero_packets_twice_and_counts_nothing_twice(lab, tmp_path, pin_root):
    h = settings_of(tmp_path, "h", pin_root)
    collect(h, lab)
    src = lab.host_v4(1)
    assert send_udp(lab, src, lab.root_v4, 7801, 300) == 300
    collect(h, lab)
    assert port_packets(h.general.db, 7801) == 300
    x = settings_of(tmp_path, "x", pin_root)
    takeover(x, lab)                                      # x's first write: a baseline of h's counts
    assert send_udp(lab, src, lab.root_v4, 7801, 1235) == 1235
    collect(x, lab)
    assert port_packets(x.general.db, 7801) == 1235
    epoch_x = pin_owner.read(Path(pin_root) / lab.interface)["epoch"]
    takeover(h, lab)                                      # h takes it back: its old snapshot is of another epoch
    assert pin_owner.read(Path(pin_root) / lab.interface)["epoch"] != epoch_x
    assert send_udp(lab, src, lab.root_v4, 7801, 40) == 40
    collect(h, lab)
    assert port_packets(h.general.db, 7801) == 340        # never x's 1,235 again
    assert port_packets(x.general.db, 7801) == 1235
    x_base = [r for r in rounds_of(x.general.db) if r["baseline"]]
    h_base = [r for r in rounds_of(h.general.db) if r["baseline"]]
    assert [(r["total_packets"], r["note"]) for r in x_base + h_base] == [
        (0, "baseline: taken over from another database")] * 2


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * size) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.kernel
def test_a_takeover_onto_a_full_disk_changes_nothing_and_loses_no_counts(lab, tmp_path, pin_root):
    h = settings_of(tmp_path, "h", pin_root)
    collect(h, lab)
    conn = connect(h.general.db)
    for i in (0, 1):
        blocklist.add_manual(conn, h, lab.host_v4(i), reason="test")
    enforcement.apply(conn, h)
    conn.close()
    pdir = Path(pin_root) / lab.interface
    record = pin_owner.read(pdir)
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        full = settings_of(tmp_path, "full", pin_root)
        full.general.db = str(mount / "full.db")
        conn = connect(full.general.db)                    # the database exists (schema and identity) ...
        __import__("app.db.rounds", fromlist=["x"]).database_id(conn)
        conn.close()
        filler = _fill(mount)                              # ... and then the disk is full
        before = sha256(full.general.db)
        src = lab.host_v4(2)
        assert send_udp(lab, src, lab.root_v4, 7802, 700) == 700
        out = cli(full, "collect", "--interface", lab.interface, "--round-seconds", "0.2", "--no-sniffer",
                  "--no-scanner", "--takeover")
        assert out.returncode == 4, out.stdout + out.stderr
        assert "full" in out.stderr
        assert sha256(full.general.db) == before
        assert pin_owner.read(pdir) == record              # the pins still name h, same epoch
        assert bpftool_entries(pdir) == 2                  # h's blocks: still in the map ...
        with UdpSink(lab.root_v4, 7803) as sink:
            assert send_udp(lab, lab.host_v4(0), lab.root_v4, 7803, 30) == 30
            assert send_udp(lab, src, lab.root_v4, 7802, 300) == 300
            assert sink.drain() == {}                      # ... and enforced
        assert map_drops(pdir, lab.host_v4(0)) == 30
        filler.unlink()                                    # space returns
        collect(h, lab)                                    # h counts everything since its last round
        assert port_packets(h.general.db, 7802) == 1000
        assert not any(r["baseline"] for r in rounds_of(h.general.db))
        takeover(full, lab)                                # and now the takeover works
        assert [(r["baseline"], r["total_packets"]) for r in rounds_of(full.general.db)] == [(1, 0), (0, 0)]
        assert pin_owner.read(pdir)["db_path"] == str(Path(full.general.db).resolve())
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def collector_process(settings, interface: str, run_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PORTWATCH_CONFIG="/dev/null", PORTWATCH_DB=settings.general.db,
               PORTWATCH_STATE_DIR=settings.general.state_dir, PORTWATCH_RUN_DIR=str(run_dir),
               PORTWATCH_PIN_ROOT=settings.general.pin_root, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "app", "collect", "--interface", interface, "--no-sniffer",
                             "--no-scanner", *args], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_lock(proc: subprocess.Popen, interface: str) -> None:
    lock = locks.interface_path(interface)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.1)
    pytest.fail(f"the collector never took its lock: {proc.communicate(timeout=10)}")


@pytest.mark.kernel
def test_down_is_refused_while_a_collector_runs_whatever_the_run_dir_says(lab, tmp_path, pin_root):
    s = settings_of(tmp_path, "a", pin_root)
    collect(s, lab)
    proc = collector_process(s, lab.interface, tmp_path / "run-a", "--round-seconds", "30")
    try:
        wait_for_lock(proc, lab.interface)
        for run_dir in (tmp_path / "run-b", Path(s.general.run_dir)):
            s.general.run_dir = str(run_dir)
            out = cli(s, "down", "--interface", lab.interface)
            assert out.returncode == 6, out.stdout + out.stderr
            assert out.stderr.strip() == (f"portwatch: error: a collector is running on {lab.interface}: stop it "
                                          "first (SIGTERM ends it after its round), then run down again")
        assert xdp.attached_program(lab.interface) is not None and (Path(pin_root) / lab.interface).exists()
        assert send_udp(lab, lab.host_v4(1), lab.root_v4, 7804, 47) == 47
        os.killpg(proc.pid, signal.SIGTERM)                # ends after its round: stores the 47 packets once
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    out = cli(s, "down", "--interface", lab.interface)
    assert out.returncode == 0, out.stderr
    assert port_packets(s.general.db, 7804) == 47


@pytest.mark.kernel
def test_a_collector_whose_program_is_detached_stops_and_says_so(lab, tmp_path, pin_root):
    s = settings_of(tmp_path, "a", pin_root)
    collect(s, lab)
    proc = collector_process(s, lab.interface, tmp_path / "run-a", "--round-seconds", "1", "--rounds", "0")
    try:
        wait_for_lock(proc, lab.interface)
        line = proc.stdout.readline()                     # the start line
        assert "round" in proc.stdout.readline()          # one round stored
        subprocess.run(["ip", "link", "set", "dev", lab.interface, "xdpgeneric", "off"], check=True)
        detached_at = time.time()
        assert send_udp(lab, lab.host_v4(1), lab.root_v4, 7805, 100) == 100
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 5, (line, out, err)
    assert f"portwatch's XDP program" in err and f"was detached from {lab.interface}" in err
    assert "nothing is attached now" in err
    conn = connect(s.general.db, readonly=True)
    late = conn.execute("SELECT COUNT(*) FROM rounds WHERE end_time > ?", (detached_at + 0.5,)).fetchone()[0]
    conn.close()
    assert late == 0                                      # no empty round after the detach
    status = cli(s, "status", "--interface", lab.interface)
    assert status.returncode == 1
    assert "no XDP program attached" in status.stderr + status.stdout
