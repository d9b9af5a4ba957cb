"""Evaluator benchmark: wall time and peak RSS of `python -m app evaluate` for 1,000 active
ports × 60 rounds, TensorFlow import included, each run a fresh process (peak RSS from wait4).

Two runs on one synthetic store (tests/services/evaluation/synthetic.py, written through the real schema):
  cold    60 rounds, no model yet: rules + first fit (warm-up: trains only)
  steady  60 more rounds with a scan, a flood and a spike, warmed up: rules + scoring + explanations
          + refit from the saved weights (what the hourly cron does every hour)
Target: <= 60 s wall on 2 cores for each. Prints one table with the ratio target / measured.

The cold run's store is benign: any finding there is a false alarm (a detector that judged before it
had a baseline), and so is an outbound finding in the steady run (no outbound event is injected); a
steady run that misses the scan or the flood it was given is wrong too. Each fails the bench (exit 1,
one sentence each). --smoke: 50 ports x 20 rounds, the cold run only, rules only (a window longer
than the store: no fit, no TensorFlow).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.plausible import Plausibility, smoke  # noqa: E402
from tests.services.evaluation.synthetic import SyntheticStore, port_scan, syn_flood, volume_spike  # noqa: E402

SMOKE = smoke()
TARGET_S = 60.0
N_PORTS = 50 if SMOKE else 1000
ROUNDS = 20 if SMOKE else 60
SCANNER, FLOODER, FLOODED_PORT = "203.0.113.9", "203.0.113.7", 2001
OUTBOUND = ("outbound_scan", "exfiltration", "beaconing", "dns_tunnel")


def make_store(path: Path, seed: int = 0) -> SyntheticStore:
    rng_ports = {}
    for i in range(N_PORTS):
        value, proto = (2000 + i, "tcp") if i % 5 else (3000 + i, "udp")
        rng_ports[(value, proto)] = (float(5 + (i * 37) % 2000), f"svc{i % 40}")
    return SyntheticStore(str(path), seed=seed, ports=rng_ports, clients=3 * N_PORTS + 7)


def bench_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTWATCH_")}
    # everything in tmp: the database, models, reports, and a pin root with no pins, so the
    # benchmark's block decisions never reach a real pinned map of this host
    env.update(PORTWATCH_DB=str(tmp / "bench.db"), PORTWATCH_STATE_DIR=str(tmp / "state"),
               PORTWATCH_PIN_ROOT=str(tmp / "no-pins"), PORTWATCH_REPORTS_OUT_DIR=str(tmp / "reports"),
               PORTWATCH_RUN_DIR=str(tmp / "run"),     # its own locks: another evaluation elsewhere never blocks it
               PORTWATCH_CONFIG=str(tmp / "none.toml"), PORTWATCH_EVALUATOR_WARMUP_ROUNDS=str(ROUNDS))
    if SMOKE:       # no window fits in the store: the rules run, the model (and TensorFlow) does not
        env["PORTWATCH_EVALUATOR_WINDOW"] = str(ROUNDS + 1)
    return env


def findings(tmp: Path) -> list[dict]:
    """Every finding in the bench store (`anomalies list --json --since all`, newest first)."""
    out = subprocess.run([sys.executable, "-m", "app", "anomalies", "list", "--json", "--since", "all"], cwd=REPO,
                         env=bench_env(tmp), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"anomalies list failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def timed_evaluate(tmp: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, summary line) of one `python -m app evaluate` process."""
    env = bench_env(tmp)
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
    rows.append(("cold (rules only)" if SMOKE else "cold (warm-up fit)", wall, rss, line))
    cold = findings(tmp)
    steady: list[dict] = []
    if not SMOKE:
        store.add_rounds(ROUNDS, {
            10: [port_scan(SCANNER, range(40000, 40100))],
            20: [syn_flood(FLOODED_PORT, 5000, [FLOODER])],
            30: [volume_spike(2002, "tcp", 400000, "203.0.113.50")],
        })
    store.close()
    if not SMOKE:
        wall, rss, line = timed_evaluate(tmp)
        rows.append(("steady (score + refit)", wall, rss, line))
        seen = {f["id"] for f in cold}
        steady = [f for f in findings(tmp) if f["id"] not in seen]

    print(f"\n== evaluator: {N_PORTS} active ports x {ROUNDS} rounds, one process per run, TF import included "
          f"({os.cpu_count()} cores; store generated in {generated:.0f} s) ==")
    print(f"{'run':<24} {'wall s':>8} {'peak RSS MiB':>13} {'target 60 s / measured':>24}")
    for name, wall, rss, _ in rows:
        print(f"{name:<24} {wall:>8.1f} {rss:>13.0f} {TARGET_S / wall:>23.2f}x")
    for name, *_, line in rows:
        print(f"  {name}: {line}")
    return plausible(cold, steady).exit_code()


def plausible(cold: list[dict], steady: list[dict]) -> Plausibility:
    """cold: the findings of the benign store; steady: those the second run added (none in --smoke)."""
    checks = Plausibility("bench/evaluator.py")
    by_detector = collections.Counter(f["detector"] for f in cold)
    checks.expect(not cold, f"the benign synthetic store ({N_PORTS} ports x {ROUNDS} rounds, no attack in it) "
                            f"yielded {len(cold)} finding(s): "
                            + ", ".join(f"{n} {d}" for d, n in by_detector.most_common())
                            + (f"; e.g. {cold[0]['summary']}" if cold else ""))
    if SMOKE:
        return checks
    checks.expect(any(f["detector"] == "port_scan" and f["source"] == SCANNER for f in steady),
                  f"the port scan from {SCANNER} (100 ports in one round) was not found")
    checks.expect(any(f["detector"] == "syn_flood" and f["port"] == FLOODED_PORT for f in steady),
                  f"the SYN flood on tcp/{FLOODED_PORT} (5,000 SYNs from {FLOODER}) was not found")
    outbound = collections.Counter(f["detector"] for f in steady if f["detector"] in OUTBOUND)
    checks.expect(not outbound, "the steady run found outbound findings with no outbound event injected: "
                                + ", ".join(f"{n} {d}" for d, n in outbound.most_common()))
    return checks


if __name__ == "__main__":
    sys.exit(main())
