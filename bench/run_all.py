"""`make bench`: every benchmark in bench/, one after another, each printing its own ratio table.

Each script measures its comparisons side by side in one run; none of them is a test.
Run one alone with `.venv/bin/python bench/<name>.py`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["collector.py", "snapshots.py", "egress.py", "blocklist.py", "evaluator.py", "detection.py", "fleet.py", "replay.py"]


def main() -> int:
    failed = []
    for name in ORDER:
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n##### bench/{name}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(path)]).returncode
        print(f"##### bench/{name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
