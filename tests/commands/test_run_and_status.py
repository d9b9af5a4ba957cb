"""`run` (what `make run` starts) and `status` against a real lab interface."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def test_run_prints_one_line_per_round_then_status_reports_it(lab, tmp_path):
    (tmp_path / "none.toml").write_text("")
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp_path / "none.toml"), PORTWATCH_DB=str(tmp_path / "ports.db"),
               PORTWATCH_STATE_DIR=str(tmp_path / "state"), PORTWATCH_RUN_DIR=str(tmp_path / "run"),
               PORTWATCH_SNIFFER_ENABLED="false")
    out = subprocess.run([sys.executable, "-m", "app", "run", "--interface", lab.interface, "--round-seconds", "1",
                          "--max-rounds", "3", "--evaluate-every", "100000"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"portwatch: watching {lab.interface}")
    assert [l.split(":")[0] for l in lines[1:]] == [f"round {i} on {lab.interface}" for i in (1, 2, 3)]
    status = subprocess.run([sys.executable, "-m", "app", "status", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    text = json.dumps(info)
    assert lab.interface in text and "generic (auto: veth)" in text and "TC egress" in text
    assert '"attached": true' in text
