"""`collect` says what it is doing: one start line before the first round ends, and a progress line
for the first compile when a person watches (stderr is a terminal); none under cron."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _collect(lab, tmp_path, stderr) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PORTWATCH_CONFIG=str(tmp_path / "none.toml"),
               PORTWATCH_DB=str(tmp_path / "ports.db"), PORTWATCH_STATE_DIR=str(tmp_path / "state"),
               PORTWATCH_RUN_DIR=str(tmp_path / "run"))
    (tmp_path / "none.toml").write_text("")
    return subprocess.run([sys.executable, "-m", "app", "collect", "--interface", lab.interface, "--round-seconds",
                           "0.3", "--rounds", "2", "--no-sniffer", "--no-scanner"], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=env, timeout=180)


@pytest.mark.kernel
def test_start_line_and_first_compile_progress(lab, tmp_path):
    master, slave = pty.openpty()
    try:
        first = _collect(lab, tmp_path, slave)
        os.close(slave)
        slave = None
        progress = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            progress += chunk
            if len(chunk) < 65536:
                break
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert first.returncode == 0
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"round 1 of 2 on {lab.interface}, 0.3 s each, XDP ") and "compiled in" in lines[0]
    assert len(lines) == 3                                    # the start line, then one line per round
    assert f"compiling and attaching the XDP program on {lab.interface}" in progress.decode(errors="replace")

    again = _collect(lab, tmp_path, subprocess.PIPE)          # stderr not a terminal: no progress line
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0].endswith(f"already attached), database {tmp_path / 'ports.db'}")
    assert "compiling" not in again.stderr


@pytest.mark.kernel
def test_json_lines_one_object_per_round(lab, tmp_path):
    import json
    env = dict(os.environ, PYTHONPATH=str(REPO), PORTWATCH_CONFIG=str(tmp_path / "none.toml"),
               PORTWATCH_DB=str(tmp_path / "ports.db"), PORTWATCH_STATE_DIR=str(tmp_path / "state"),
               PORTWATCH_RUN_DIR=str(tmp_path / "run"))
    (tmp_path / "none.toml").write_text("")
    out = subprocess.run([sys.executable, "-m", "app", "collect", "--interface", lab.interface, "--round-seconds",
                          "0.3", "--rounds", "2", "--no-sniffer", "--no-scanner", "--json"], capture_output=True,
                         text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    rounds = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["round_id"] for r in rounds] == [1, 2] and all(r["interface"] == lab.interface for r in rounds)
    assert f"round 1 of 2 on {lab.interface}" in out.stderr          # the start line is not data: stderr
