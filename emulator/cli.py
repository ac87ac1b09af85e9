"""rpcauth: serve | client | matrix | explain | compare | replay | report."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import sys
from typing import Callable, TextIO

from .config import ConfigError, TcpTransport, default_config, load_config

PRIVILEGED = 1024


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _write_ready(path: str, info: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the live view
def _ui_address(args: argparse.Namespace, command: str):
    """--ui [HOST:]PORT -> a web.UiAddress, None without --ui, False after printing an error."""
    if not getattr(args, "ui", None):
        return None
    from .web import parse_address
    from .web.address import AddressError

    try:
        return parse_address(args.ui)
    except AddressError as exc:
        print(f"rpcauth {command}: --ui: {exc}", file=sys.stderr)
        return False


def _announce_ui(url: str, address) -> None:
    if address.needs_token:
        print(f"rpcauth: WARNING: the live view listens on {address.host}, beyond this machine's own "
              f"names. Anyone who can reach it and has the token can watch the lab and run logons "
              f"against it. Token: {address.token}", file=sys.stderr)
    print(f"rpcauth: live view at {url}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from .lab import Lab

    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        print(f"rpcauth serve: bad config: {exc}", file=sys.stderr)
        return 2
    config = config.with_ports(smb=args.smb_port, epm=args.epm_port, emsmdb=args.emsmdb_port,
                               kdc=args.kdc_port)
    t = config.transports
    k = config.kerberos
    if os.geteuid() != 0:
        for name, tr in (("smb", t.smb), ("epm", t.epm), ("emsmdb", t.emsmdb),
                         ("kdc", TcpTransport(enabled=k.enabled, port=k.kdc_port))):
            if tr.enabled and 0 < tr.port < PRIVILEGED:
                print(f"rpcauth serve: port {tr.port} for {name} needs root. Pick another with "
                      f"--{name}-port N (for example --{name}-port {tr.port + 10000}, or 0 for an "
                      f"ephemeral port; the ready file then tells clients which).", file=sys.stderr)
                return 2
    if not _is_loopback(args.host):
        print(f"rpcauth serve: WARNING: listening on {args.host}, not loopback. This lab accepts and "
              f"records NTLM exchanges (user names, challenge responses) from anyone who can reach it.",
              file=sys.stderr)

    ui = _ui_address(args, "serve")
    if ui is False:
        return 2
    # A served lab's events go to --events; only a short tail is kept in memory.
    lab = Lab(config, host=args.host, ephemeral=False, captures=args.captures,
              events_path=args.events, seed=args.seed, keep_events=1000, ui=ui)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await lab.start_async()
        live = None
        try:
            if args.live_capture:
                from .server.live_capture import LiveCapture

                live = LiveCapture(args.live_capture, list(lab.ports.values()),
                                   os.path.join(args.captures or ".", "live.pcapng"))
                print(f"rpcauth: live capture of {args.live_capture} into {live.path}", file=sys.stderr)
            info = lab.ready_info()
            if args.ready_file:
                _write_ready(args.ready_file, info)
            print(f"rpcauth: serving lab {config.source} on {args.host}: "
                  + ", ".join(f"{k} {v}" for k, v in lab.ports.items()), file=sys.stderr, flush=True)
            if lab.ui_url:
                _announce_ui(lab.ui_url, lab.ui_address)
            if lab.realm is not None:
                print(f"rpcauth: Kerberos realm {lab.realm.name}, KDC on {args.host}:{lab.realm.port}; "
                      f"clients use KRB5_CONFIG={lab.realm.krb5_conf}", file=sys.stderr, flush=True)
                for user in lab.realm.ntlm_only:
                    print(f"rpcauth: user {user} has only an NT hash the KDC could not take: "
                          f"NTLM only", file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            if live is not None:
                live.stop()
            await lab.stop_async()
        print("rpcauth: stopped; captures closed and events flushed", file=sys.stderr)

    from .kerberos.realm import RealmError
    from .server.live_capture import LiveCaptureError

    try:
        asyncio.run(main())
    except RealmError as exc:
        print(f"rpcauth serve: Kerberos realm: {exc}", file=sys.stderr)
        return 2
    except LiveCaptureError as exc:
        print(f"rpcauth serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rpcauth serve: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------- client
def cmd_client(args: argparse.Namespace) -> int:
    from .client.cli import run_client_command

    return run_client_command(args)


# ---------------------------------------------------------------------- matrix
def cmd_matrix(args: argparse.Namespace) -> int:
    if getattr(args, "ui", None):
        ui = _ui_address(args, "matrix")
        if ui is False:
            return 2
        from .web.cli import run_matrix_with_ui

        return run_matrix_with_ui(args, ui, _announce_ui)
    from .matrix import run_matrix_command

    return run_matrix_command(args)


# ---------------------------------------------------------------------- captures
def _capture_cli(fn):
    def run(args: argparse.Namespace) -> int:
        from .capture import CaptureError

        try:
            return fn(args)
        except CaptureError as exc:
            print(f"rpcauth {args.command}: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:
            print(f"rpcauth {args.command}: bad lab config: {exc}", file=sys.stderr)
            return 2
    return run


def _passwords(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in args.password or []:
        user, sep, pw = item.partition(":")
        if not sep:
            raise SystemExit("rpcauth: --password takes user:password")
        out[user] = pw
    return out


def terminal_progress(stream: TextIO | None = None) -> Callable[[int, int], None] | None:
    """A progress bar for reading a capture, on stderr when it is a terminal; otherwise None."""
    out = stream or sys.stderr
    if not out.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 40
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        out.write(f"\rreading [{bar:<{width}}] {done >> 10} / {total >> 10} KiB")
        if done >= total:
            out.write("\n")
        out.flush()

    return show


@_capture_cli
def cmd_explain(args: argparse.Namespace) -> int:
    from .capture.explain import explain_to

    lab = load_config(args.lab) if args.lab else None
    # Written as it is read (JSON streams connection by connection), so memory stays flat.
    explain_to(sys.stdout, args.capture, args.format, passwords=_passwords(args), lab=lab,
               keytab=args.keytab, progress=terminal_progress())
    return 0


@_capture_cli
def cmd_compare(args: argparse.Namespace) -> int:
    from .capture.compare import compare

    result = compare(args.a, args.b)
    for line in result.lines:
        print(line)
    return 0 if result.same else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay.cli import run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from .matrix import report_command

    return report_command(args)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpcauth", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the lab's SMB, endpoint mapper and EMSMDB listeners")
    s.add_argument("--config", help="lab config (YAML); default: the embedded KB lab")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--smb-port", type=int, help="SMB port (0 = ephemeral; 445 needs root)")
    s.add_argument("--epm-port", type=int, help="endpoint mapper port (0 = ephemeral; 135 needs root)")
    s.add_argument("--emsmdb-port", type=int, help="EMSMDB port (0 = ephemeral)")
    s.add_argument("--kdc-port", type=int,
                   help="KDC port when kerberos.enabled (0 = ephemeral; 88 needs root)")
    s.add_argument("--captures", help="directory for one pcap per connection")
    s.add_argument("--events", help="JSON Lines event file")
    s.add_argument("--ready-file", help="written as JSON once every listener accepts")
    s.add_argument("--seed", type=int, help="deterministic challenges, handles and timestamps (labs only)")
    s.add_argument("--live-capture", metavar="IFACE",
                   help="also record the real traffic on IFACE (e.g. lo) with dumpcap; needs root")
    s.add_argument("--ui", metavar="[HOST:]PORT",
                   help="also serve the live view, a web page drawing each logon (host default 127.0.0.1; "
                        "any other host needs the token printed at start-up)")
    s.set_defaults(func=cmd_serve)

    from .client.cli import add_client_arguments

    c = sub.add_parser("client", help="run the synthetic Exchange client")
    add_client_arguments(c)
    c.set_defaults(func=cmd_client)

    m = sub.add_parser("matrix", help="run the KB Q146188 matrix against an embedded lab")
    m.add_argument("--captures", help="directory for one capture per row")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument("--scenarios", help="YAML file of rows to run instead of the KB table")
    m.add_argument("--config", help="lab config for the embedded lab (default: the KB lab)")
    m.add_argument("--report", help="also write the HTML teaching report to this directory")
    m.add_argument("--seed", type=int, help="deterministic server output (for reference captures)")
    m.add_argument("--ui", metavar="[HOST:]PORT",
                   help="run the rows against one lab with the live view, then keep serving it until Ctrl-C")
    m.add_argument("--kerberos", action="store_true",
                   help="add the rows beyond the KB: Kerberos at either layer (needs MIT Kerberos)")
    m.add_argument("--encrypt", action="store_true",
                   help="the lab requires SMB3 encryption (policy.smb_encryption: required); the KB's "
                        "outcome is unchanged, the report's ladders show the encryption")
    m.set_defaults(func=cmd_matrix)

    e = sub.add_parser("explain", help="explain who authenticated where in a capture")
    e.add_argument("capture")
    e.add_argument("--format", choices=["text", "json", "mermaid", "html"], default="text")
    e.add_argument("--lab", help="lab config whose users' keys unseal PKT_PRIVACY stubs and decrypt SMB3 (NTLM) and "
                                 "name a ticket's client as its lab user; a config names no "
                                 "Kerberos keys (the lab's realm gets fresh ones at every start), "
                                 "so give --keytab as well for Kerberos")
    e.add_argument("--keytab", metavar="FILE",
                   help="keytab with the service keys (the lab's is the ready file's \"keytab\"): "
                        "decrypts Kerberos tickets and authenticators, names the client principal, "
                        "verifies and unseals Kerberos-protected stubs, decrypts SMB3 Kerberos sessions")
    e.add_argument("--password", action="append", metavar="USER:PW",
                   help="a user's password, to unseal stubs and decrypt the user's SMB3 sessions")
    e.set_defaults(func=cmd_explain)

    k = sub.add_parser("compare", help="compare the auth paths of two captures")
    k.add_argument("a")
    k.add_argument("b")
    k.set_defaults(func=cmd_compare)

    from .replay.cli import add_arguments as add_replay_arguments

    rp = sub.add_parser("replay", help="send a capture's client side to the emulator, compare the answers")
    add_replay_arguments(rp)
    rp.set_defaults(func=cmd_replay)

    r = sub.add_parser("report", help="HTML teaching report for a matrix run directory")
    r.add_argument("directory")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
