"""One collector per interface, whatever its database, state dir or run dir: the lock lives at a fixed place."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def collector(tmp_path: Path, name: str, interface: str, seconds: str) -> subprocess.Popen:
    """A `collect` run with its own database, state dir and run dir."""
    (tmp_path / "none.toml").write_text("")
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"),
               PORTWATCH_STATE_DIR=str(tmp_path / name / "state"), PORTWATCH_RUN_DIR=str(tmp_path / name / "run"),
               PORTWATCH_DB=str(tmp_path / name / "ports.db"))
    return subprocess.Popen([sys.executable, "-m", "app", "collect", "--interface", interface, "--round-seconds",
                             seconds, "--no-sniffer", "--no-scanner"], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.kernel
def test_second_collector_with_other_state_dir_run_dir_and_database_exits_6(lab, tmp_path):
    from app.services import locks
    first = collector(tmp_path, "a", lab.interface, "20")
    lock = locks.interface_path(lab.interface)
    assert lock.parent == Path("/run/portwatch/interfaces")
    try:
        deadline = time.monotonic() + 60                 # the first run compiles the program: bounded wait
        while time.monotonic() < deadline and first.poll() is None:
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the first collector never took its lock: {first.communicate(timeout=10)}")
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert stat.S_IMODE(lock.parent.stat().st_mode) == 0o700
        second = collector(tmp_path, "b", lab.interface, "1")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 6, err
        assert err.strip() == (f"portwatch: error: another collector is running on {lab.interface}: this run does "
                               "not overlap it")
        assert not (tmp_path / "b" / "ports.db").exists()       # refused before it opened its database
    finally:
        os.killpg(first.pid, signal.SIGKILL)     # the collector and its loader child: no pin made after teardown
        first.wait(timeout=10)
