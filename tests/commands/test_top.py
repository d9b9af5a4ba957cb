"""`python -m app top`: the live view from the pinned maps, as plain text and under a pseudo-terminal,
shows the lab's port and source; it writes nothing (the database is not even created)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.cli import main
from tests.helpers import collect, make_settings, send_udp

REPO = Path(__file__).resolve().parents[2]
PORT = 7311


def _env(tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PORTWATCH_CONFIG=str(tmp_path / "none.toml"),
               PORTWATCH_DB=str(tmp_path / "top-never-writes.db"))
    return env


def _traffic(lab, src: str, stop: threading.Event, bursts: int = 12) -> None:
    for _ in range(bursts):                     # bounded: at most 12 bursts of 40 datagrams, 0.4 s apart
        if stop.is_set():
            return
        send_udp(lab, src, lab.root_v4, PORT, 40)
        time.sleep(0.4)


@pytest.fixture
def loaded(lab, tmp_path):
    settings = make_settings(tmp_path)
    collect(settings, lab, seconds=0.2)          # loads, attaches and pins the program
    src = lab.host_v4(0)
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(lab, src, stop), daemon=True)
    yield lab, src, stop, sender
    stop.set()
    if sender.is_alive():
        sender.join(timeout=10)


@pytest.mark.kernel
def test_top_plain_text(loaded, tmp_path):
    lab, src, stop, sender = loaded
    sender.start()
    out = subprocess.run([sys.executable, "-m", "app", "top", "--interface", lab.interface, "--interval", "1",
                          "--count", "3"], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    stop.set()
    assert out.returncode == 0, out.stderr
    refreshes = out.stdout.split("portwatch top - ")[1:]
    assert len(refreshes) == 3 and "\x1b[" not in out.stdout
    assert any(f"udp/{PORT}" in r and src in r for r in refreshes), out.stdout
    assert "BLOCKLIST" in out.stdout and "unparsed" in out.stdout
    assert not (tmp_path / "top-never-writes.db").exists()


@pytest.mark.kernel
def test_top_under_a_pseudo_terminal(loaded, tmp_path):
    lab, src, stop, sender = loaded
    sender.start()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "app", "top", "--interface", lab.interface, "--interval", "1"],
                            stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path), close_fds=True)
    os.close(slave)
    screen = b""

    def read_until(deadline: float, done) -> None:
        """Read what top writes until ``deadline`` or ``done()``: a terminal is always read, else a full
        pty buffer would block top's next write (a frame, or its goodbye after Ctrl-C)."""
        nonlocal screen
        while time.monotonic() < deadline and not done():
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break

    try:   # three frames (a loaded machine may take seconds to start top), then Ctrl-C
        read_until(time.monotonic() + 30, lambda: screen.count(b"(Ctrl-C quits)") >= 3)
    finally:
        proc.send_signal(2)                     # Ctrl-C ends it cleanly
        try:
            read_until(time.monotonic() + 20, lambda: proc.poll() is not None)
            proc.wait(timeout=1)
        finally:
            if proc.poll() is None:
                proc.kill()
        os.close(master)
        stop.set()
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    frames = text.split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 2 and "(Ctrl-C quits)" in frames[-1]
    assert any(f"udp/{PORT}" in f and src in f for f in frames), text[-3000:]
    assert not (tmp_path / "top-never-writes.db").exists()


def test_top_without_pins_says_what_to_do(state_env, capsys):
    assert main(["top", "--interface", "lo", "--count", "1"]) == 2
    err = capsys.readouterr().err
    assert "no pinned maps for lo" in err and "python -m app collect --interface lo" in err
    with pytest.raises(SystemExit) as stopped:           # argparse: the duration parser refuses it
        main(["top", "--interface", "lo", "--interval", "0"])
    assert stopped.value.code == 2


def test_top_asks_which_interface_when_several_are_pinned(state_env, capsys, monkeypatch):
    for name in ("pwx0", "pwx1"):
        (state_env / "no-pins" / name).mkdir(parents=True)
        (state_env / "no-pins" / name / "port_stats").write_text("")
    assert main(["top", "--count", "1"]) == 2
    assert "several interfaces have pinned maps (pwx0, pwx1): pass --interface IF" in capsys.readouterr().err


@pytest.mark.kernel
def test_top_json_lines_and_a_detached_program_is_said(loaded, tmp_path):
    """--json: one object per refresh. With the XDP program detached while traffic flows, every
    refresh says so first and top exits 5 with one sentence: 0/s is not what the interface carries."""
    import json
    lab, src, stop, sender = loaded
    sender.start()
    cmd = [sys.executable, "-m", "app", "top", "--interface", lab.interface, "--interval", "0.5", "--count", "2"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr
    views = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(views) == 2 and all(v["attached"] and v["problem"] is None for v in views)
    assert any(p["key"] == f"udp/{PORT}" for v in views for p in v["ports"])
    subprocess.run(["ip", "link", "set", "dev", lab.interface, "xdpgeneric", "off"], check=True)
    subprocess.run(["ip", "link", "set", "dev", lab.interface, "xdp", "off"], check=True)
    detached = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    stop.set()
    assert detached.returncode == 5, detached.stderr
    assert detached.stdout.startswith(f"WARNING: portwatch's XDP program is not attached to {lab.interface}")
    [said] = [l for l in detached.stderr.splitlines() if l.startswith("portwatch: error:")]
    assert "re-attaches it" in said and "Traceback" not in detached.stderr
