"""Before and after, in one run: our server from two checkouts, measured in turn.

  python bench/paired.py BEFORE_ROOT [AFTER_ROOT] [--rounds 3] [--count 60]

Starts `rpcauth serve` once from each checkout (PYTHONPATH set to it), then alternates the
named-pipe srvsvc logon and the TCP PKT_PRIVACY EcDoConnect logon between them for --rounds rounds
(so drift on a shared machine falls on both), and prints the median server CPU per logon of each
and the ratio after/before. The figures in docs/benchmarks.md, "What the profile showed and what
changed", come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after", nargs="?", default=os.path.dirname(HERE))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=60)
    a = p.parse_args(argv)
    servers = {"before": peers.start_ours(root=os.path.abspath(a.before), label="before"),
               "after": peers.start_ours(root=os.path.abspath(a.after), label="after")}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(a.rounds):
            for mode, call in (("np", "srvsvc"), ("tcp", "emsmdb")):
                for name, peer in servers.items():
                    r = run.measure(peer, mode, call, a.count, 1, 300)
                    if r["cpu_ms"] is not None and not r["failures"]:
                        cpu.setdefault((mode, name), []).append(r["cpu_ms"])
    finally:
        for peer in servers.values():
            peer.stop()
    print("| logon | before ms | after ms | after/before |")
    print("|---|---|---|---|")
    for mode, label in (("np", "named-pipe srvsvc"), ("tcp", "TCP PKT_PRIVACY EcDoConnect")):
        b, f = cpu.get((mode, "before")), cpu.get((mode, "after"))
        if b and f:
            mb, mf = statistics.median(b), statistics.median(f)
            print(f"| {label} | {mb:.2f} | {mf:.2f} | {mf / mb:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
