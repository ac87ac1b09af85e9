"""Long fuzz campaign over every decoder, bounded in count and in time.

    python bench/fuzz.py                          # 1,000,000 inputs or 30 minutes, whichever first
    python bench/fuzz.py -n 200000 --max-seconds 900 --seed 7

Seeds are recorded from real impacket and smbclient conversations with a seeded lab, plus the
reference captures. Prints counts by decoder and outcome (ok / protocol_error / fault / close /
crash), saves every crasher into tests/fuzz/corpus/ (replayed by tests/fuzz/test_fuzz_corpus.py),
then sends a batch of hostile inputs to a live lab and checks that a good NTLM logon still opens
bob's mailbox. Exits 1 on any crash or failed logon.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fuzz")
sys.path.insert(0, os.path.abspath(FUZZ_DIR))

import campaign  # noqa: E402
import live  # noqa: E402
from seeds import all_seeds  # noqa: E402
from targets import build_targets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--inputs", type=int, default=1_000_000, help="sans-IO inputs in total")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop the sans-IO campaign after this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--live", type=int, default=500, help="hostile connections to a live lab afterwards")
    ap.add_argument("--corpus", default=campaign.CORPUS, help="where crashers are saved")
    args = ap.parse_args(argv)

    started = time.monotonic()
    seeds = all_seeds()
    targets = build_targets(seeds, tempfile.mkdtemp(prefix="rpcauth-fuzz-"))
    print(f"seeds: {len(seeds.conversations)} conversations, {len(seeds.pcaps)} captures; "
          f"targets: {', '.join(sorted(targets))}", flush=True)

    report = campaign.run(targets, args.inputs, seed=args.seed, max_seconds=args.max_seconds, keep_crashes=1000)
    print(report.table())
    print(f"sans-IO: {report.total} inputs in {report.seconds:.1f} s "
          f"({report.total / max(report.seconds, 1e-9):.0f}/s)")
    saved = [campaign.save_crasher(c, args.corpus) for c in report.crashes]
    for path in saved:
        print(f"crasher saved: {path}")

    from emulator.lab import Lab
    logon_ok = True
    with Lab() as lab:
        live_report = live.run_live(lab, seeds.conversations, args.live, seed=args.seed) if args.live else None
        status = live.good_logon(lab)
        logon_ok = status == 0
        if live_report is not None:
            print(f"live: {live_report.total} hostile connections: {dict(live_report.outcomes)}")
        print(f"live good logon (bob, NTLM, EcDoConnect): status 0x{status:08x} "
              f"{'ok' if logon_ok else 'FAILED'}")
    crashes = sum(c["crash"] for c in report.counts.values())
    print(f"total {report.total + (live_report.total if live_report else 0)} inputs, {crashes} crashes, "
          f"{time.monotonic() - started:.0f} s")
    return 1 if crashes or not logon_ok else 0


if __name__ == "__main__":
    sys.exit(main())
