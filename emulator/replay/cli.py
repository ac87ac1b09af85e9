"""`rpcauth replay CAPTURE ...`: arguments, the target, the report, the exit status.

Exit status: 0 when every replayed conversation got the same answers from our server as from
the original one, 1 when any parted ways, 2 when nothing could be replayed (unreadable capture,
no SMB or DCE/RPC conversation, unusable target).
"""

from __future__ import annotations

import argparse
import sys

from ..capture.pcapread import CaptureError
from ..config import ConfigError, load_config
from .report import FORMATS, render, write_capture
from .runner import DEFAULT_TIMEOUT, replay
from .target import EmbeddedTarget, ServedTarget, Target, TargetError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("capture", help="pcap or pcapng, ours or a real network's")
    p.add_argument("--stream", action="append", type=int, metavar="N",
                   help="replay only this tcp.stream (repeatable; default: every SMB and DCE/RPC conversation)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="READY_FILE",
                       help="replay to the lab of `rpcauth serve --ready-file READY_FILE` (loopback only)")
    where.add_argument("--lab", metavar="CONFIG",
                       help="replay to an embedded lab with this config; its users' passwords re-author logons")
    p.add_argument("--events", metavar="FILE",
                   help="with --to: the served lab's --events file, to say why our server answered as it did")
    p.add_argument("--seed", type=int, help="embedded lab only: deterministic challenges (see the docs' warning)")
    p.add_argument("--password", action="append", metavar="USER:PW",
                   help="stand in for USER: recompute the NTLM AUTHENTICATE for our challenge")
    p.add_argument("--format", choices=list(FORMATS), default="text")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--save-capture", metavar="FILE", help="also write what crossed our sockets as a pcap")


def _passwords(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        user, sep, pw = item.partition(":")
        if not sep or not user:
            raise SystemExit("rpcauth replay: --password takes user:password")
        out[user] = pw
    return out


def run(args: argparse.Namespace) -> int:
    from ..capture.unseal import Keyring

    passwords = _passwords(args.password)
    if args.to and args.seed is not None:
        print("rpcauth replay: --seed applies to an embedded lab; a served lab has its own "
              "(rpcauth serve --seed N)", file=sys.stderr)
        return 2
    if args.events and not args.to:
        print("rpcauth replay: --events goes with --to (an embedded lab's events are read directly)",
              file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("rpcauth replay: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        config = load_config(args.lab) if args.lab else None
    except ConfigError as exc:
        print(f"rpcauth replay: bad lab config: {exc}", file=sys.stderr)
        return 2
    keyring = Keyring.build(passwords, config) if (passwords or config is not None) else None
    target: Target | None = None
    try:
        if args.to:
            target = ServedTarget(args.to, args.events)
        else:
            target = EmbeddedTarget(config, seed=args.seed, config_name=args.lab)
        result = replay(args.capture, target, streams=args.stream, keyring=keyring, timeout=args.timeout)
    except CaptureError as exc:
        print(f"rpcauth replay: {exc}", file=sys.stderr)
        return 2
    except TargetError as exc:
        print(f"rpcauth replay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rpcauth replay: cannot start the lab: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        if target is not None:
            target.close()
    sys.stdout.write(render(result, args.format))
    if args.save_capture and result.conversations:
        write_capture(result, args.save_capture)
    if result.deterministic:
        print("rpcauth replay: WARNING: the lab's challenges repeat the capture's (a seeded lab); "
              "see the report", file=sys.stderr)
    if not result.conversations:
        print(f"rpcauth replay: {args.capture} holds no SMB or DCE/RPC conversation that could be replayed",
              file=sys.stderr)
        return 2
    from .report import status
    return 0 if all(status(c) == "identical" for c in result.conversations) else 1
