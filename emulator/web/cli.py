"""`rpcauth matrix --ui`: the KB matrix run row by row against one lab while the live view draws
it, the table printed as `rpcauth matrix` prints it, then the page kept up until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable

from ..matrix import render_table, rows_and_config
from .address import UiAddress
from .runs import result_message, run_scenario


def run_matrix_with_ui(args: argparse.Namespace, address: UiAddress,
                       announce: Callable[[str, UiAddress], None]) -> int:
    from ..lab import Lab

    if args.seed is not None:
        print("rpcauth matrix: --seed fixes ports and nonces per row; it does not mix with --ui", file=sys.stderr)
        return 2
    if args.kerberos:
        # The page runs every row against one lab; the Kerberos rows need a realm per row and a
        # workstation ticket, which only `rpcauth matrix --kerberos` sets up today.
        print("rpcauth matrix: --kerberos does not mix with --ui; run it without the page", file=sys.stderr)
        return 2
    try:
        scenarios, config = rows_and_config(args)
    except (OSError, ValueError) as exc:
        print(f"rpcauth matrix: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C (or SIGTERM) ends the run between rows, or the wait after them.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lab = Lab(config, captures=args.captures, ui=address)
    try:
        lab.start()
    except OSError as exc:
        print(f"rpcauth matrix: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        view = lab.ui
        if view is None:
            raise RuntimeError("the lab started without its live view")
        view.scenarios = {s.id: s for s in scenarios}
        announce(view.url, address)
        results = []
        for s in scenarios:
            if stop.is_set():
                break
            result = run_scenario(lab, s)
            results.append(result)
            view.publish_result_threadsafe(s.id, result_message(result))
        print(render_table(results), flush=True)
        print("rpcauth: the live view stays up; Ctrl-C to stop", file=sys.stderr, flush=True)
        stop.wait()
        return 0 if len(results) == len(scenarios) and all(r.ok for r in results) else 1
    finally:
        lab.stop()
