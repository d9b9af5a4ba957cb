"""`make demo` end to end (what CI runs): the attacker ends up blocked, no benign host does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parent.parent


def test_demo_blocks_the_attacker_and_no_benign_host(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTWATCH_")}
    out = subprocess.run([sys.executable, "-m", "app.demo", "--out", str(tmp_path / "demo")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines() if "  " in line}
    assert "BLOCKED" in lines["attacker 198.18.77.5"] and "NOT blocked" not in lines["attacker 198.18.77.5"]
    assert lines["benign hosts blocked"].split()[-1] == "none"
    assert lines["benign HTTP after"].split()[-1] == "200"
    report = tmp_path / "demo" / "report" / "index.html"
    assert report.exists() and "port_tcp_8080.png" in report.read_text()
    # it cleaned up after itself
    assert "pwdemo-a" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path("/sys/fs/bpf/portwatch/pwdemor0").exists()
