"""Benchmarks that can fail: each bench checks that its figures could be true and, after printing
its tables (the numbers stay visible), exits 1 with one sentence per figure that cannot be —
a drop path slower than the pass path, findings on a benign synthetic store, a per-packet cost in
microseconds, a round that used more CPU than the process that ran it.

    checks = Plausibility("bench/blocklist.py")
    checks.expect(drop_ns < pass_ns, f"a blocked frame costs {drop_ns:.0f} ns, more than a passed one ...")
    return checks.exit_code()

``smoke()``: the bench runs its small variant (`make bench-smoke`: fewer trials and sizes, the same
checks), chosen by --smoke on the command line or PW_BENCH_SMOKE=1.
"""
from __future__ import annotations

import os
import statistics
import sys

# an XDP or TC program that needs microseconds per packet is broken (a stall, an unaligned atomic)
MAX_PROGRAM_NS = 5000.0
NOISE = 1.25


def _rates(values: list[float]) -> str:
    return "/".join(f"{v / 1000:,.0f}k" for v in values)


def smoke() -> bool:
    return "--smoke" in sys.argv[1:] or os.environ.get("PW_BENCH_SMOKE") == "1"


class Plausibility:
    def __init__(self, bench: str):
        self.bench = bench
        self.problems: list[str] = []

    def expect(self, ok: bool, sentence: str) -> bool:
        """Record ``sentence`` (what is wrong, with the figures) unless ``ok``."""
        if not ok:
            self.problems.append(sentence)
        return ok

    def program_cost(self, label: str, ns: float) -> bool:
        return self.expect(0 < ns < MAX_PROGRAM_NS, f"{label} costs {ns:,.0f} ns per packet: outside "
                                                    f"0-{MAX_PROGRAM_NS:,.0f} ns, no program this small costs that")

    def not_faster(self, label: str, with_program: list[float], without: list[float], what: str) -> bool:
        """Rates (packets/s of interleaved trials) with a program may not beat the rates with less of
        one (``without``) by more than noise: 25 %, or the trials' own spread when that is wider (other
        processes share the CPUs). Fewer than 3 trials show no spread: not judged."""
        if min(len(with_program), len(without)) < 3:
            return True
        a, b = statistics.median(with_program), statistics.median(without)
        allowed = max(NOISE, *(max(r) / min(r) for r in (with_program, without) if min(r) > 0))
        return self.expect(a <= allowed * b, f"{label}: {a:,.0f} packets/s, more than {allowed:.2f}x the "
                                             f"{b:,.0f} of {what} (trials: {_rates(with_program)} against "
                                             f"{_rates(without)})")

    def exit_code(self) -> int:
        for sentence in self.problems:
            print(f"{self.bench}: implausible: {sentence}", file=sys.stderr)
        if self.problems:
            print(f"{self.bench}: {len(self.problems)} figure(s) cannot be right: exit 1", file=sys.stderr)
        return 1 if self.problems else 0
