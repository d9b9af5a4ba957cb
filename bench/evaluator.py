"""Evaluator benchmark (issue 3): wall time and peak RSS of `python -m app evaluate` for 1,000 active
ports × 60 rounds, TensorFlow import included, each run a fresh process (peak RSS from wait4).

Two runs on one synthetic store (tests/services/evaluation/synthetic.py, written through the real schema):
  cold    60 rounds, no model yet: rules + first fit (warm-up: trains only)
  steady  60 more rounds with a scan, a flood and a spike, warmed up: rules + scoring + explanations
          + refit from the saved weights (what the hourly cron does every hour)
Target: <= 60 s wall on 2 cores for each. Prints one table with the ratio target / measured.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.services.synthetic import SyntheticStore, port_scan, syn_flood, volume_spike  # noqa: E402

TARGET_S = 60.0
N_PORTS = 1000
ROUNDS = 60


def make_store(path: Path, seed: int = 0) -> SyntheticStore:
    rng_ports = {}
    for i in range(N_PORTS):
        value, proto = (2000 + i, "tcp") if i % 5 else (3000 + i, "udp")
        rng_ports[(value, proto)] = (float(5 + (i * 37) % 2000), f"svc{i % 40}")
    return SyntheticStore(str(path), seed=seed, ports=rng_ports, clients=3 * N_PORTS + 7)


def timed_evaluate(tmp: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, summary line) of one `python -m app evaluate` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTWATCH_")}
    # everything in tmp: the database, models, reports, and a pin root with no pins, so the
    # benchmark's block decisions never reach a real pinned map of this host
    env.update(PORTWATCH_DB=str(tmp / "bench.db"), PORTWATCH_STATE_DIR=str(tmp / "state"),
               PORTWATCH_PIN_ROOT=str(tmp / "no-pins"), PORTWATCH_REPORTS_OUT_DIR=str(tmp / "reports"),
               PORTWATCH_CONFIG=str(tmp / "none.toml"), PORTWATCH_EVALUATOR_WARMUP_ROUNDS=str(ROUNDS))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "evaluate", "-q"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed ({proc.returncode}): {err.strip()[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0, out.strip()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pwev-bench-"))
    (tmp / "none.toml").write_text("")
    t0 = time.perf_counter()
    store = make_store(tmp / "bench.db")
    store.add_rounds(ROUNDS)
    generated = time.perf_counter() - t0
    rows = []
    wall, rss, line = timed_evaluate(tmp)
    rows.append(("cold (warm-up fit)", wall, rss, line))
    store.add_rounds(ROUNDS, {
        10: [port_scan("203.0.113.9", range(40000, 40100))],
        20: [syn_flood(2001, 5000, ["203.0.113.7"])],
        30: [volume_spike(2002, "tcp", 400000, "203.0.113.50")],
    })
    store.close()
    wall, rss, line = timed_evaluate(tmp)
    rows.append(("steady (score + refit)", wall, rss, line))

    print(f"\n== evaluator: {N_PORTS} active ports x {ROUNDS} rounds, one process per run, TF import included "
          f"({os.cpu_count()} cores; store generated in {generated:.0f} s) ==")
    print(f"{'run':<24} {'wall s':>8} {'peak RSS MiB':>13} {'target 60 s / measured':>24}")
    for name, wall, rss, _ in rows:
        print(f"{name:<24} {wall:>8.1f} {rss:>13.0f} {TARGET_S / wall:>23.2f}x")
    for name, *_, line in rows:
        print(f"  {name}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
