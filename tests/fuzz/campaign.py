"""A bounded fuzz campaign over every target: counts by target and outcome, crashers kept.

Used by the CI tests (about 20,000 inputs) and by bench/fuzz.py (a million, bounded in time).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from targets import OUTCOMES, Crash, weight_of

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


@dataclass
class Report:
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    crashes: list[Crash] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def table(self) -> str:
        rows = [f"{'decoder':<16}" + "".join(f"{o:>16}" for o in OUTCOMES) + f"{'total':>10}"]
        for name in sorted(self.counts):
            c = self.counts[name]
            rows.append(f"{name:<16}" + "".join(f"{c[o]:>16}" for o in OUTCOMES) + f"{sum(c.values()):>10}")
        totals = Counter()
        for c in self.counts.values():
            totals.update(c)
        rows.append(f"{'all':<16}" + "".join(f"{totals[o]:>16}" for o in OUTCOMES) + f"{sum(totals.values()):>10}")
        return "\n".join(rows)


def plan(targets: dict, total: int) -> dict[str, int]:
    """Inputs per target for a campaign of `total`, in proportion to the weights."""
    weights = {name: weight_of(name, t) for name, t in targets.items() if getattr(t, "seeds", None)}
    whole = sum(weights.values())
    return {name: max(1, total * w // whole) for name, w in weights.items()}


def run(targets: dict, total: int, *, seed: int = 1, max_seconds: float | None = None,
        keep_crashes: int = 50) -> Report:
    """Round-robin over targets in proportion to their share, so a time bound still covers all."""
    rng = random.Random(seed)
    quota = plan(targets, total)
    done = Counter()
    report = Report()
    start = time.monotonic()
    names = sorted(quota)
    while True:
        progressed = False
        for name in names:
            if done[name] >= quota[name]:
                continue
            target = targets[name]
            batch = max(1, quota[name] // 200)
            for _ in range(min(batch, quota[name] - done[name])):
                data = target.make_input(rng)
                try:
                    outcome = target.run(data)
                except Crash as crash:
                    outcome = "crash"
                    if len(report.crashes) < keep_crashes:
                        report.crashes.append(crash)
                report.counts[name][outcome] += 1
                done[name] += 1
            progressed = True
        if not progressed:
            break
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    report.seconds = time.monotonic() - start
    return report


def save_crasher(crash: Crash, corpus: str = CORPUS) -> str:
    """Store a crasher as `<target>-<sha1>.bin`, replayed by tests/fuzz/test_corpus.py."""
    os.makedirs(corpus, exist_ok=True)
    digest = hashlib.sha1(crash.data).hexdigest()[:16]
    path = os.path.join(corpus, f"{crash.target}-{digest}.bin")
    with open(path, "wb") as f:
        f.write(crash.data)
    return path
