"""`rpcauth client`: the synthetic Exchange client from the command line."""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import tempfile

from ..config import AUTH_LEVELS, ConfigError, default_config, load_config
from .profile import KNOWN_PROTSEQS, LOGON_SECURITY, Credentials, Endpoint, Profile, lab_credentials
from .tickets import workstation_logon

# The client stack (impacket's SMB and DCE/RPC) is imported only when the client runs, so that
# building the `rpcauth` parser stays cheap for every other command.

KB_BOB_DN = "/o=Corp/ou=Site/cn=Recipients/cn=bob"


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--binding-order", default="ncacn_np,ncacn_ip_tcp",
                   help=f"comma-separated RPC_Binding_Order ({', '.join(KNOWN_PROTSEQS)})")
    p.add_argument("--binding", action="append", default=[],
                   help=r"a string binding such as 'ncacn_np:HOST[\pipe\emsmdb]' or 'ncacn_ip_tcp:HOST[6001]'; "
                        "repeat for a binding order; replaces --binding-order and the endpoint mapper")
    p.add_argument("--network-security", choices=["on", "off"], default="off",
                   help="the profile's Use Network Security During Logon check box")
    p.add_argument("--logged-on", default="alice", metavar="USER[:PASSWORD]",
                   help="the workstation's logged-on user (the SMB redirector's credentials)")
    p.add_argument("--prompt-answer", metavar="USER:PASSWORD",
                   help="what the user types at the Windows NT credential prompt (default: nothing)")
    p.add_argument("--ipc-session", metavar="USER[:PASSWORD]",
                   help=r"an existing IPC$ session as another user (net use \\server\IPC$ /user:...)")
    p.add_argument("--domain", default=None, help="NT domain of all credentials (default: the lab's)")
    p.add_argument("--mailbox", default=KB_BOB_DN, help="mailbox DN to open (default: bob's)")
    p.add_argument("--server", default="127.0.0.1", help="server address")
    p.add_argument("--smb-port", type=int, default=None)
    p.add_argument("--epm-port", type=int, default=None)
    p.add_argument("--emsmdb-port", type=int, default=None, help="skip the endpoint mapper for TCP")
    p.add_argument("--pipe", default=None, help=r"EMSMDB pipe, e.g. \pipe\emsmdb (skips the endpoint mapper)")
    p.add_argument("--ready-file", help="take host and ports from an `rpcauth serve --ready-file`")
    p.add_argument("--call", choices=["EcDoConnect", "EcDoConnectEx"], default="EcDoConnect")
    p.add_argument("--auth-level", choices=list(AUTH_LEVELS)[1:], default="connect",
                   help="RPC auth level of the TCP bind")
    p.add_argument("--lab", help="lab config to take omitted passwords from (default: the embedded lab)")
    p.add_argument("--logon-security", choices=list(LOGON_SECURITY), default="password",
                   help="Outlook's logon network security; kerberos and negotiate use the logged-on "
                        "user's ticket, got from the realm named in --ready-file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _creds(spec: str | None, lab, domain: str) -> Credentials | None:
    try:
        return lab_credentials(lab, spec, domain)
    except ValueError as exc:
        raise SystemExit(f"rpcauth client: {exc}")


_BINDING = re.compile(r"^(ncacn_np|ncacn_ip_tcp):([^\[]+)(?:\[([^\]]*)\])?$", re.I)


def profile_from_args(args: argparse.Namespace) -> Profile:
    try:
        lab = load_config(args.lab) if args.lab else default_config()
    except ConfigError as exc:
        raise SystemExit(f"rpcauth client: bad lab config: {exc}")
    domain = args.domain if args.domain is not None else lab.server.domain
    host, smb_port, epm_port = args.server, args.smb_port or 445, args.epm_port or 135
    emsmdb_port, pipe = args.emsmdb_port, args.pipe
    ready: dict = {}
    if args.ready_file:
        with open(args.ready_file, encoding="utf-8") as fh:
            ready = json.load(fh)
        host = ready.get("host", host)
        smb_port = args.smb_port or ready.get("smb") or smb_port
        epm_port = args.epm_port or ready.get("epm") or epm_port
    order = tuple(x.strip() for x in args.binding_order.split(",") if x.strip())
    if args.binding:
        order = ()
        for b in args.binding:
            m = _BINDING.match(b.strip())
            if not m:
                raise SystemExit(f"rpcauth client: cannot parse binding {b!r}")
            seq, host, ep = m.group(1).lower(), m.group(2), m.group(3)
            order += (seq,)
            if seq == "ncacn_ip_tcp" and ep:
                emsmdb_port = int(ep)
            if seq == "ncacn_np" and ep:
                pipe = ep
    logged_on = _creds(args.logged_on, lab, domain)
    if logged_on is None:
        raise SystemExit("rpcauth client: --logged-on names nobody")
    kerberos = None
    if args.logon_security != "password" and ready.get("krb5_conf"):
        # The workstation's logon: the logged-on user's TGT and service tickets, in a ccache of
        # this run's own (removed when the process exits).
        directory = tempfile.mkdtemp(prefix="rpcauth-client-krb5-")
        atexit.register(shutil.rmtree, directory, True)
        kerberos = workstation_logon(ready["krb5_conf"], ready["realm"], ready["kerberos_host"],
                                     logged_on.user, logged_on.password, directory)
    return Profile(
        mailbox_dn=args.mailbox, logged_on=logged_on, binding_order=order,
        use_network_security=args.network_security == "on",
        prompt_answer=_creds(args.prompt_answer, lab, domain),
        ipc_session=_creds(args.ipc_session, lab, domain),
        server=Endpoint(host=host, smb_port=smb_port, epm_port=epm_port, emsmdb_port=emsmdb_port, pipe=pipe),
        connect_call=args.call, auth_level=AUTH_LEVELS[args.auth_level],
        logon_security=args.logon_security, kerberos=kerberos)


def render(profile: Profile, r) -> str:
    lines = [f"Binding order: {', '.join(profile.binding_order)}    Use Network Security: "
             f"{'on' if profile.use_network_security else 'off'}"]
    if r.prompt_shown:
        typed = profile.prompt_answer.qualified if profile.prompt_answer else "(nothing)"
        lines.append(f"Prompt:        shown; typed {typed}; answer {'used' if r.prompt_answer_used else 'NOT used'}")
    else:
        lines.append("Prompt:        not shown")
    tried = ", ".join(f"{t['protseq']} ({t['outcome']})" for t in r.transports_tried)
    lines.append(f"Transports:    {tried or '(none)'}")
    if r.transport_used:
        mech = "Kerberos" if r.auth_mech == "kerberos" else "NTLM"
        layer = f"SMB session setup ({mech})" if r.auth_layer == "smb_session_setup" else f"RPC bind ({mech})"
        lines.append(f"On the wire:   {r.wire_user or 'no credentials'} via {layer}")
        acted = r.acting_user or "nobody (authentication failed)"
        lines.append(f"Server acted:  {acted}" + (f" [{r.identity_source}]" if r.identity_source else "")
                     + f"  ({'read from server events' if r.identity_from == 'server_events' else 'inferred'})")
        lines.append(f"{profile.connect_call}:  {profile.mailbox_dn} -> {r.status_name} ({r.status})")
    lines.append(f"Result:        {r.outcome}")
    if r.dialog:
        lines.append(f"Dialog:        \"{r.dialog}\"")
    return "\n".join(lines)


def run_client_command(args: argparse.Namespace) -> int:
    from .runner import run_client

    profile = profile_from_args(args)
    report = run_client(profile)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(profile, report))
    return 0 if report.opened else 1
