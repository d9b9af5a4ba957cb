"""`make bench`: every benchmark in bench/, one after another, each printing its own ratio table.
`make bench-smoke` (--smoke): the small variants of the ones whose checks matter most (the drop
path against the pass path, a benign store's findings, a replay feeding every packet with plausible
per-packet times), in well under a minute; .ci/run runs it.

Each script measures its comparisons side by side in one run; none of them is a test. Each exits 1
with a sentence when a figure cannot be right (bench/plausible.py); this exits 1 when any failed.
Run one alone with `.venv/bin/python bench/<name>.py [--smoke]`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["collector.py", "snapshots.py", "egress.py", "blocklist.py", "evaluator.py", "detection.py", "fleet.py", "replay.py"]
SMOKE = ["blocklist.py", "evaluator.py", "replay.py"]


def main(argv: list[str] | None = None) -> int:
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    failed = []
    started = time.monotonic()
    for name in SMOKE if smoke else ORDER:
        path = HERE / name
        print(f"\n##### bench/{name}{' --smoke' if smoke else ''}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(path), *(["--smoke"] if smoke else [])]).returncode
        print(f"##### bench/{name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"##### {'bench-smoke' if smoke else 'bench'}: {time.monotonic() - started:.0f} s in all", flush=True)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
