"""Runs one logon the way the Exchange client does, with impacket's client stack, and reports
what the user saw and what the server did."""

from __future__ import annotations

import re
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from impacket.dcerpc.v5 import epm, transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_GSS_NEGOTIATE, RPC_C_AUTHN_WINNT, DCERPCException
from impacket.smbconnection import SessionError, SMBConnection
from impacket.uuid import uuidtup_to_bin

from ..directory import EC_LOGIN_FAILURE, EC_SUCCESS, status_hex, status_name
from ..interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect, hEcDoConnectEx, hEcDoDisconnect
from . import dialogs
from .decision import Attempt, plan
from .redirector import encrypt_only_when_asked
from .profile import SERVED_PROTSEQS, Profile
from .tickets import NoTicket, service_ticket

EMSMDB_IF = uuidtup_to_bin((EMSMDB_UUID, "0.81"))


@dataclass
class ClientReport:
    mailbox_dn: str
    prompt_shown: bool = False
    prompt_answer_used: bool = False
    transports_tried: list[dict[str, str]] = field(default_factory=list)
    transport_used: str | None = None
    auth_layer: str | None = None          # smb_session_setup | rpc_bind
    auth_mech: str | None = None           # ntlm | kerberos: how that layer proved the user
    wire_user: str | None = None           # whose credentials the client actually sent
    acting_user: str | None = None         # whose identity the server acted on
    identity_source: str | None = None     # smb_session | rpc_auth | anonymous (the server's words)
    identity_from: str = "inferred"        # "server_events" when read from an in-process lab
    status: str | None = None
    status_name: str | None = None
    outcome: str = "unreachable"           # opened | denied | logon_failure | unknown_user | unreachable
    dialog: str | None = None
    server_conns: list[str] = field(default_factory=list)
    local_ports: list[int] = field(default_factory=list)

    @property
    def opened(self) -> bool:
        return self.outcome == "opened"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["opened"] = self.opened
        return d


class _Unreachable(Exception):
    pass


def _nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _call(dce, profile: Profile) -> tuple[int | None, str]:
    """EcDoConnect(Ex) then EcDoDisconnect. (status, 'ok'|'fault') ; a fault means the RPC layer
    refused us (a failed NTLM bind faults the first call with access denied)."""
    connect = hEcDoConnectEx if profile.connect_call == "EcDoConnectEx" else hEcDoConnect
    try:
        status, handle, _display = connect(dce, profile.mailbox_dn)
    except DCERPCException:
        return None, "fault"
    if status == EC_SUCCESS:
        try:
            hEcDoDisconnect(dce, handle)
        except DCERPCException:
            pass
    return status, "ok"


def _pipe_via_epm(smb: SMBConnection, profile: Profile) -> str:
    t = transport.SMBTransport(profile.server.host, profile.server.smb_port, r"\epmapper", smb_connection=smb)
    dce = t.get_dce_rpc()
    dce.connect()
    try:
        binding = epm.hept_map(profile.server.host, EMSMDB_IF, protocol="ncacn_np", dce=dce)
    finally:
        dce.disconnect()
    m = re.search(r"\[(.*)\]", binding)
    if not m:
        raise _Unreachable("endpoint mapper gave no pipe")
    return m.group(1)


def _port_via_epm(profile: Profile) -> int:
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{profile.server.host}[{profile.server.epm_port}]")
    rt.set_connect_timeout(profile.timeout)
    dce = rt.get_dce_rpc()
    try:
        dce.connect()
    except OSError as exc:
        raise _Unreachable(str(exc)) from None
    try:
        binding = epm.hept_map(profile.server.host, EMSMDB_IF, protocol="ncacn_ip_tcp", dce=dce)
    finally:
        dce.disconnect()
    return int(re.search(r"\[(\d+)\]", binding).group(1))


def _over_named_pipe(profile: Profile, attempt: Attempt, report: ClientReport) -> tuple[int | None, str]:
    creds = attempt.smb_credentials
    if creds is None:
        raise ValueError("a named-pipe attempt needs the credentials of an SMB session")
    kerberos = profile.kerberos if attempt.mech == "kerberos" else None
    # With Kerberos the server is named as its service principals name it.
    name = kerberos.hostname if kerberos else profile.server.host
    try:
        smb = SMBConnection(name, profile.server.host, sess_port=profile.server.smb_port,
                            timeout=profile.timeout)
    except SessionError:
        raise
    except Exception as exc:  # refused, reset, or impacket's NetBIOS errors: no SMB server there
        raise _Unreachable(str(exc)) from None
    report.local_ports.append(smb.getSMBServer().get_socket().getsockname()[1])
    try:
        settle_encryption = encrypt_only_when_asked(smb)
        try:
            if kerberos is not None:
                smb.kerberosLogin(creds.user, "", kerberos.realm, kdcHost=profile.server.host,
                                  TGS=service_ticket(kerberos, "cifs"), useCache=False)
            else:
                smb.login(creds.user, creds.password, creds.domain)
            settle_encryption()
        except NoTicket:
            return None, "no_ticket"
        except SessionError:
            return None, "smb_logon_failed"
        pipe = profile.server.pipe or _pipe_via_epm(smb, profile)
        t = transport.SMBTransport(profile.server.host, profile.server.smb_port, pipe, smb_connection=smb)
        dce = t.get_dce_rpc()
        dce.connect()
        try:
            dce.bind(EMSMDB_IF)         # no RPC-level authentication: the pipe's session is used
            return _call(dce, profile)
        finally:
            dce.disconnect()
    finally:
        try:
            smb.logoff()
        except Exception:
            pass
        smb.close()


def _over_tcp(profile: Profile, attempt: Attempt, report: ClientReport) -> tuple[int | None, str]:
    port = profile.server.emsmdb_port or _port_via_epm(profile)
    creds = attempt.rpc_credentials
    if attempt.mech == "kerberos":
        # The logged-on user's ticket for host/<server>; impacket binds with it through SPNEGO.
        logon = profile.kerberos
        if logon is None or creds is None:
            return None, "no_ticket"
        try:
            tgs = service_ticket(logon, "host")
        except NoTicket:
            return None, "no_ticket"
        rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{logon.hostname}[{port}]")
        rt.setRemoteHost(profile.server.host)
        rt.set_credentials(creds.user, "", logon.realm, TGS=tgs)
        rt.set_kerberos(True, profile.server.host)
    else:
        rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{profile.server.host}[{port}]")
        if creds is not None:
            rt.set_credentials(creds.user, creds.password, creds.domain)
    rt.set_connect_timeout(profile.timeout)
    dce = rt.get_dce_rpc()
    if creds is not None:
        dce.set_auth_type(RPC_C_AUTHN_GSS_NEGOTIATE if attempt.mech == "kerberos" else RPC_C_AUTHN_WINNT)
        dce.set_auth_level(profile.auth_level)
    try:
        dce.connect()
    except OSError as exc:
        raise _Unreachable(str(exc)) from None
    _nodelay(rt.get_socket())
    report.local_ports.append(rt.get_socket().getsockname()[1])
    try:
        try:
            dce.bind(EMSMDB_IF)
        except DCERPCException:
            return None, "bind_refused"
        return _call(dce, profile)
    finally:
        try:
            dce.disconnect()
        except Exception:
            pass


def _server_view(report: ClientReport, events: Any) -> None:
    """Read whose identity the server acted on from the lab's own events."""
    # The lab listens on loopback, so the server saw our ports from one of these addresses.
    peers = {f"{host}:{port}" for port in report.local_ports for host in ("127.0.0.1", "::1")}
    conns = [r["conn"] for r in events.records("conn.open") if r.get("peer") in peers]
    report.server_conns = conns
    connects = [r for r in events.records("emsmdb.connect") if r["conn"] in conns]
    report.identity_from = "server_events"
    if connects:
        last = connects[-1]
        report.acting_user = last.get("acting_user")
        report.identity_source = last.get("identity_source")
    else:
        report.acting_user = None
        report.identity_source = None


def run_client(profile: Profile, *, events: Any = None) -> ClientReport:
    """Walk the binding order like the Exchange client and log on to the mailbox."""
    report = ClientReport(mailbox_dn=profile.mailbox_dn)
    for protseq in profile.binding_order:
        if protseq not in SERVED_PROTSEQS:
            report.transports_tried.append({"protseq": protseq, "outcome": "not_served"})
            continue
        attempt = plan(profile, protseq)
        report.prompt_shown = report.prompt_shown or attempt.prompt_shown
        runner = _over_named_pipe if protseq == "ncacn_np" else _over_tcp
        try:
            status, how = runner(profile, attempt, report)
        except _Unreachable:
            report.transports_tried.append({"protseq": protseq, "outcome": "unreachable"})
            continue
        report.transports_tried.append({"protseq": protseq, "outcome": "used"})
        report.transport_used = protseq
        report.auth_layer = attempt.auth_layer
        report.auth_mech = attempt.mech
        wire = attempt.smb_credentials or attempt.rpc_credentials
        report.wire_user = wire.qualified if wire else None
        report.prompt_answer_used = (attempt.rpc_credentials is not None
                                     and attempt.rpc_credentials == profile.prompt_answer)
        report.acting_user = wire.qualified if (wire and status is not None) else None
        report.identity_source = ("smb_session" if protseq == "ncacn_np" else "rpc_auth") if report.acting_user else None
        if status is None:
            report.outcome = "logon_failure"
            report.status = status_hex(EC_LOGIN_FAILURE)
            report.status_name = f"{how}"
            report.dialog = dialogs.LOGON_FAILED
        else:
            report.status, report.status_name = status_hex(status), status_name(status)
            report.outcome = {0: "opened", 0x3F2: "denied", 0x3EB: "unknown_user"}.get(status, "logon_failure")
            report.dialog = dialogs.for_status(status)
        break
    else:
        report.dialog = dialogs.UNREACHABLE
    if events is not None and report.local_ports:
        _server_view(report, events)
    return report
