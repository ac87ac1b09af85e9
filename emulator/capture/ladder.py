"""The auth-relevant steps of a connection, as (frame, direction, label) lines, and the verdict
sentence. Text, Mermaid, HTML and the report all draw from here, so they always agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import Connection, SmbSession

LADDER_KINDS = (
    "smb.negotiate", "smb.session_setup", "smb.tree_connect", "smb.pipe_open", "smb.encrypted",
    "smb.decrypted", "smb.decrypt_failed",
    "rpc.bind", "rpc.alter_context", "rpc.bind_ack", "rpc.alter_context_resp", "rpc.bind_nak",
    "ntlm.negotiate", "ntlm.challenge", "ntlm.authenticate", "rpc.identity",
    "schannel.negotiate", "schannel.challenge",
    "kerberos.token", "kerberos.ticket", "kerberos.ap_rep", "ntlm.session_keys", "rpc.verify", "emsmdb.connect_request", "emsmdb.connect", "rpc.fault", "malformed",
)


# What a highlighted step decided: the layer that authenticated, or whose identity the server
# then acted on. Drawings mark these with words as well as colour.
AUTHENTICATED = "authenticated"
IDENTITY = "identity"
NOTE_KINDS = ("rpc.identity", "ntlm.session_keys", "rpc.verify", "kerberos.ticket", "kerberos.ap_rep")
# RFC 4120 message names, for the tokens the reader recognises without keys.
KERBEROS_MESSAGES = {"ap_req": "AP-REQ", "ap_rep": "AP-REP", "krb_error": "KRB-ERROR"}


@dataclass
class Step:
    frame: int
    to_server: bool
    label: str
    note: bool = False  # a statement about state rather than a message on the wire
    highlight: str | None = None  # AUTHENTICATED, IDENTITY or None


def highlight(ev: dict[str, Any]) -> str | None:
    """Which decision an event records, if any: an SMB session or an RPC bind's NTLM
    AUTHENTICATE that logged someone on, or the identity an RPC connection then acts on."""
    k = ev["kind"]
    if k == "rpc.identity":
        return IDENTITY
    if k == "smb.session_setup" and ev.get("result") == "ok" and ev.get("user"):
        return AUTHENTICATED
    if k == "kerberos.accept" and ev.get("result") == "ok" and ev.get("user"):
        return AUTHENTICATED
    if k in ("ntlm.authenticate", "kerberos.ticket") and ev.get("leg") not in (None, "session_setup") \
            and ev.get("result", "ok") == "ok" and ev.get("user"):
        return AUTHENTICATED
    return None


def _who(user: Any, domain: Any) -> str:
    if not user:
        return "anonymous" if user == "" else "?"
    return f"{domain}\\{user}" if domain else str(user)


def label(ev: dict[str, Any]) -> str:
    k = ev["kind"]
    if k == "smb.negotiate":
        return f"SMB negotiate: dialect {ev.get('dialect')}"
    if k == "smb.session_setup":
        mech = ev.get("mechanism") or "?"
        ver = f" NTLM{ev['ntlm_version']}" if ev.get("ntlm_version") else ""
        ticket = f"{ev['principal']} (Kerberos ticket)" if ev.get("principal") else "(Kerberos ticket)"
        who = ticket if "kerberos" in mech else (
            "anonymous" if ev.get("anonymous") else _who(ev.get("user"), ev.get("domain")))
        return f"SMB session setup{ver} as {who}: {ev.get('result')}"
    if k == "smb.tree_connect":
        return f"SMB tree connect {ev.get('path')}: {ev.get('result')}"
    if k == "smb.pipe_open":
        return f"open pipe \\{ev.get('pipe')}"
    if k == "smb.encrypted":
        why = f": {ev['reason']}" if ev.get("reason") else ""
        return f"SMB3 encrypted message (not readable{why})"
    if k == "smb.decrypted":
        return f"SMB3 encrypted ({ev.get('cipher')}), decrypted and verified with the session key"
    if k == "smb.decrypt_failed":
        return f"SMB3 encrypted ({ev.get('cipher')}): verification failed ({ev.get('reason')})"
    if k in ("rpc.bind", "rpc.alter_context"):
        verb = "bind" if k == "rpc.bind" else "alter_context"
        auth = "no auth" if ev.get("auth_type") == "none" else f"{ev.get('auth_type')}, {ev.get('auth_level')}"
        return f"{verb} {ev.get('interface_name')} v{ev.get('version')} ({auth})"
    if k in ("rpc.bind_ack", "rpc.alter_context_resp"):
        acc = ", ".join(ev.get("accepted") or []) or "nothing"
        verb = "bind_ack" if k == "rpc.bind_ack" else "alter_context_resp"
        return f"{verb}: accepted {acc}"
    if k == "rpc.bind_nak":
        return f"bind_nak (reason {ev.get('reason')})"
    if k == "ntlm.negotiate":
        return f"NTLM NEGOTIATE (in {ev.get('leg')})"
    if k == "ntlm.challenge":
        return f"NTLM CHALLENGE (in {ev.get('leg')})"
    if k == "ntlm.authenticate":
        ver = f"NTLM{ev['ntlm_version']} " if ev.get("ntlm_version") else "NTLM "
        return f"{ver}AUTHENTICATE as {_who(ev.get('user'), ev.get('domain'))} (in {ev.get('leg')})"
    if k == "rpc.identity":
        src, mech = ev.get("source"), ev.get("mechanism") or "none"
        if src == "smb_session":
            who = _who(ev.get("user"), ev.get("domain"))
            if ev.get("user") is None:
                sm = ev.get("session_mechanism") or ""
                who = "anonymous" if sm == "anonymous" else (
                    "the Kerberos ticket's principal" if "kerberos" in sm else who)
            if ev.get("principal"):  # the ticket's client is in the session setup's ticket note
                return f"identity: {who} from the SMB session's ticket"
            return f"identity: {who} from the SMB session"
        if src == "anonymous":
            return "identity: anonymous" + (" (no RPC authentication)" if mech == "none" else f" ({mech})")
        if src == "none":
            return f"identity: nobody ({mech} logon {ev.get('result') or 'not completed'})"
        if ev.get("user") is None and "kerberos" in mech:
            return f"identity: the Kerberos ticket's principal via {mech} ({ev.get('auth_level')}), not parsed"
        if ev.get("principal"):
            return (f"identity: {_who(ev.get('user'), ev.get('domain'))} from the bind's ticket "
                    f"({mech}, {ev.get('auth_level')})")
        return f"identity: {_who(ev.get('user'), ev.get('domain'))} via {mech} ({ev.get('auth_level')})"
    if k in ("schannel.negotiate", "schannel.challenge"):
        who = f" for {_who(ev.get('user'), ev.get('domain'))}" if ev.get("user") else ""
        return f"schannel NL_AUTH_MESSAGE{who} (in {ev.get('leg')})"
    if k == "emsmdb.connect_request":
        dn = ev.get("user_dn") or ("(sealed)" if ev.get("sealed") else "?")
        return f"{ev.get('call')}({dn})"
    if k == "emsmdb.connect":
        st = f"{ev.get('status_name')} ({ev.get('status')})" if ev.get("status") else (
            "(sealed)" if ev.get("sealed") else "?")
        return f"{ev.get('call')} -> {st}"
    if k == "ntlm.session_keys":
        if ev.get("result") == "ok":
            return f"session keys derived from {ev.get('user')}'s password"
        return f"no session keys for {ev.get('user')}: {ev.get('result')}"
    if k == "rpc.verify":
        return f"signature check failed: {ev.get('result')}"
    if k == "kerberos.token":
        name = KERBEROS_MESSAGES.get(ev.get("message") or "", "token")
        return f"Kerberos {name} (in {ev.get('leg')})"
    if k == "kerberos.ticket":
        # Short enough for the drawings; the JSON event has the realm and the enctype too.
        service = (ev.get("service") or "?").split("@")[0]
        if ev.get("result") == "ok":
            return f"ticket for {service}: client {ev.get('principal')}"
        return f"ticket for {service} not read with the keytab: {ev.get('result')}"
    if k == "kerberos.accept":
        # The live server's verdict on an AP-REQ (emulator/kerberos/acceptor.py).
        client = ev.get("principal") or "?"
        return f"Kerberos AP-REQ: ticket for {ev.get('service') or '?'}, client {client}: {ev.get('result')}"
    if k in KDC_LABELS:
        return kdc_label(ev)
    if k == "kerberos.ap_rep":
        return f"AP-REP not read with the ticket's session key: {ev.get('result')}"
    if k == "rpc.fault":
        return f"fault {ev.get('status')}"
    if k == "malformed":
        return f"malformed {ev.get('layer')}: {ev.get('reason')}"
    return k


# The KDC exchanges that fetch the tickets (capture/kdc.py): AS for the TGT, TGS for a service.
KDC_LABELS = {"kerberos.as_req": "AS-REQ", "kerberos.as_rep": "AS-REP", "kerberos.tgs_req": "TGS-REQ",
              "kerberos.tgs_rep": "TGS-REP", "kerberos.krb_error": "KRB-ERROR"}


def kdc_label(ev: dict[str, Any]) -> str:
    name, k = KDC_LABELS[ev["kind"]], ev["kind"]
    realm = f"@{ev['realm']}" if ev.get("realm") else ""
    if k == "kerberos.as_req":
        pre = "with pre-authentication" if ev.get("preauth") else "without pre-authentication"
        return f"{name} {ev.get('client')}{realm} for {ev.get('service')} ({pre})"
    if k == "kerberos.tgs_req":
        return f"{name} for {ev.get('service')} (the client is in the TGT)"
    if k == "kerberos.krb_error":
        return f"{name} {ev.get('error')}" + (f" for {ev['service']}" if ev.get("service") else "")
    return f"{name}: {ev.get('service')} ticket for {ev.get('client')}{realm}"


def kdc_steps(events: list[dict[str, Any]]) -> list[Step]:
    """The ladder of one stream to a KDC."""
    return [Step(ev["frame"], ev.get("dir") == "c2s", label(ev), ev["kind"] == "malformed",
                 AUTHENTICATED if ev["kind"] in ("kerberos.as_rep", "kerberos.tgs_rep") else None)
            for ev in events]


def steps(conn: Connection) -> list[Step]:
    out = []
    for ev in conn.events:
        if ev["kind"] not in LADDER_KINDS:
            continue
        note = ev["kind"] in NOTE_KINDS
        out.append(Step(ev["frame"], ev.get("dir") == "c2s", label(ev), note, highlight(ev)))
    return out


def how(conn: Connection) -> str:
    src = conn.identity_source
    if src == "smb_session":
        if conn.smb_session_frame:
            ticket = f" with a Kerberos ticket of {conn.principal}" if conn.principal else ""
            return f"inherited from the SMB session set up in frame {conn.smb_session_frame}{ticket}"
        return "inherited from an SMB session set up before the capture started"
    if src == "rpc_auth":
        ntlm = f"NTLM{conn.ntlm_version}" if conn.ntlm_version else "NTLM"
        mech = {"ntlm": ntlm, "spnego-ntlm": f"SPNEGO ({ntlm})", "kerberos": "Kerberos",
                "spnego-kerberos": "SPNEGO (Kerberos)", "schannel": "the Netlogon secure channel"
                }.get(conn.mechanism, conn.mechanism)
        ticket = ("" if "kerberos" not in conn.mechanism else
                  f" (the ticket's client {conn.principal})" if conn.principal else
                  " (the client principal is inside the ticket: give --keytab to read it)")
        return (f"authenticated in the RPC bind with {mech} at level {conn.auth_level}"
                f" in frame {conn.identity_frame}{ticket}")
    if src == "anonymous":
        if conn.mechanism != "none":
            return f"with an anonymous {conn.mechanism} logon in the RPC bind"
        return "with no authentication at any layer"
    if conn.mechanism != "none":
        offered = f" offered by {_who(conn.offered_user, conn.offered_domain)}" if conn.offered_user else ""
        return f"after a {conn.mechanism} logon{offered} in the RPC bind that the server did not accept"
    return "with an identity the capture does not show (the connection started before the capture)"


def verdicts(conn: Connection) -> list[str]:
    out = []
    for call in conn.emsmdb:
        dn = call.user_dn or ("a sealed DN" if call.sealed else "an unread DN")
        if call.fault:
            rpc_logon = conn.mechanism != "none"
            refused = "the RPC layer refused the call" + (
                " (the logon in the bind failed)" if call.status == "0x00000005" and rpc_logon else "")
            offered = _who(conn.offered_user, conn.offered_domain) if conn.offered_user else conn.acting
            claimed = (f"; the bind offered credentials of {offered} in frame {conn.offered_frame or conn.identity_frame}"
                       if rpc_logon else "")
            out.append(f"{call.call} for {dn} never ran: {refused} -> fault {call.status_name} "
                       f"({call.status}){claimed}")
            continue
        if call.status:
            result = f"{call.status_name} ({call.status})"
        elif call.sealed:
            result = "a sealed status (give --password user:pw, --lab or, for Kerberos, --keytab to read it)"
        else:
            result = "no response in the capture"
        out.append(f"{call.call} for {dn} ran as {conn.acting}, {how(conn)} -> {result}")
    if not out:
        names = sorted({b.interface_name for b in conn.binds})
        if names:
            out.append(f"Calls on {', '.join(names)} ran as {conn.acting}, {how(conn)}")
        else:
            out.append(f"No bind in the capture; the connection ran as {conn.acting}, {how(conn)}")
    if conn.verified_pdus or conn.bad_signatures:
        out.append(f"({conn.verified_pdus} protected PDU(s) verified with the supplied key, "
                   f"{conn.bad_signatures} failed)")
    if conn.partial:
        out.append("(part of this connection is missing from the capture)")
    return out


def session_line(s: SmbSession) -> str:
    """One SMB session setup, for the text view."""
    who = "anonymous" if s.anonymous else (
        "a Kerberos ticket's principal" if s.user is None and "kerberos" in s.mechanism
        else _who(s.user, s.domain))
    outcome = "established" if s.established else f"refused ({s.status})"
    line = f"SMB {s.dialect or ''} session setup ({s.mechanism}) as {who}: {outcome}, frame {s.frame}"
    if s.decrypted_messages:
        line += f"; then {s.decrypted_messages} {s.cipher} message(s), decrypted"
    if s.failed_messages:
        line += f"; {s.failed_messages} encrypted message(s) failed verification"
    if s.encrypted_messages:
        line += f"; {'then ' if not s.decrypted_messages else ''}{s.encrypted_messages} encrypted message(s), not readable"
        if s.decryption:
            line += f" ({s.decryption})"
    return line
