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
import sys

# an XDP or TC program that needs microseconds per packet is broken (a stall, an unaligned atomic)
MAX_PROGRAM_NS = 5000.0


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

    def exit_code(self) -> int:
        for sentence in self.problems:
            print(f"{self.bench}: implausible: {sentence}", file=sys.stderr)
        if self.problems:
            print(f"{self.bench}: {len(self.problems)} figure(s) cannot be right: exit 1", file=sys.stderr)
        return 1 if self.problems else 0
