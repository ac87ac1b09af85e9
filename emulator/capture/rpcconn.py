"""One RPC connection seen in a capture: binds, the security context, and EMSMDB calls.

Everything is read with the live server's decoders: `rpc.pdu` frames and decodes the PDUs,
`interfaces.emsmdb_wire` reads EcDoConnect's user DN, and the tokens go through the NTLM,
SPNEGO and schannel readers of `authtokens`. Whose identity the connection acts on is decided by
the live `SecurityContext` (auth/context.py), driven in observer mode (observer.py): a bind
without authentication keeps the transport's identity (the SMB session's user on a pipe,
anonymous on TCP), an authenticated one replaces it, a failed one yields nobody.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..auth.context import State
from ..directory import status_hex, status_name
from ..identity import ANONYMOUS, RPC_AUTH, SMB_SESSION, Identity
from ..sansio import ProtocolError
from ..rpc import pdu as w
from ..rpc.verifier import VerifyError
from .authtokens import (AUTH_TYPE_KERBEROS, AUTH_TYPE_NTLM, AUTH_TYPE_SCHANNEL, AUTH_TYPE_SPNEGO,
                         TokenInfo, inspect_token)
from .observer import NO_MECHANISM, ObservedContext, mechanism_name
from .unseal import Keyring, Unsealer, derive

if TYPE_CHECKING:
    from .kerberos_keys import KerberosExchange, KerberosUnsealer
from .model import (AUTH_LEVEL_NAMES, AUTH_TYPE_NAMES, EMSMDB_CALLS, EMSMDB_UUID,
                    INTERFACE_NAMES, BindInfo, Connection, EmsmdbCall, add_event)

# Keep at most this much of one call's stub while its fragments arrive; EcDoConnect stubs are
# small, and nothing else is read.
MAX_STUB = 64 * 1024
MAX_OPEN_CALLS = 256

# C706 / MS-RPCE fault statuses a refused EMSMDB call comes back with.
FAULT_NAMES = {0x5: "nca_s_fault_access_denied", 0x721: "nca_s_fault_sec_pkg_error",
               0x1C010002: "nca_s_op_rng_error", 0x1C010003: "nca_s_unk_if",
               0x1C00001A: "nca_s_fault_context_mismatch", 0x6F7: "rpc_x_bad_stub_data"}
# Faults that mean the security context was refused (MS-RPCE 3.3.3.4.1: a failed AUTH3 is
# reported on the first call).
AUTH_REFUSED_FAULTS = frozenset({0x5, 0x721})


@dataclass
class SmbSessionInfo:
    user: str | None
    domain: str | None
    frame: int | None
    events: list[dict[str, Any]]
    mechanism: str = NO_MECHANISM
    established: bool = True
    principal: str | None = None  # the Kerberos client principal, read with a keytab


def read_user_dn(stub: bytes, endian: str = "<") -> str | None:
    """szUserDN of EcDoConnect/EcDoConnectEx (MS-OXCRPC 3.1.4.1/3.1.4.11), as emsmdb_wire
    reads it from a captured request."""
    # Imported here: the interfaces package pulls in impacket's NDR, which a capture without
    # EMSMDB never needs and which costs a noticeable part of a short run.
    from ..interfaces.emsmdb_wire import observed_user_dn
    return observed_user_dn(stub, endian == "<")


_LE_AUTH_CALL, _BE_AUTH_CALL = struct.Struct("<HI"), struct.Struct(">HI")
_LE_CTX_OP, _BE_CTX_OP = struct.Struct("<HH"), struct.Struct(">HH")
RESPONSE = w.RESPONSE
# Client PDU types: a request, a bind, an alter_context, an auth3, a co_cancel, an orphaned.
CLIENT_PTYPES = frozenset({w.REQUEST, w.BIND, w.ALTER_CONTEXT, w.AUTH3, w.CO_CANCEL, w.ORPHANED})


class ObservedRpcConnection:
    """One RPC connection as a capture shows it: the live engine (rpc/connection.py) answers
    a client; this one only watches both sides and records what the engine would have said."""
    def __init__(self, conn: Connection, smb: SmbSessionInfo | None = None,
                 keyring: Keyring | None = None) -> None:
        self.conn = conn
        self.smb = smb
        self._keyring = keyring
        self._finished = self._released = False
        self._server_challenge: bytes | None = None
        self._unsealer: Unsealer | KerberosUnsealer | None = None
        self._frames = {True: w.FrameBuffer(), False: w.FrameBuffer()}
        self._contexts: dict[int, str] = {}
        self._calls: dict[int, dict[str, Any]] = {}
        self._pending_binds: dict[int, list[BindInfo]] = {}
        self.rpc_seen = False
        self.malformed = 0  # malformed events so far (the walker resynchronises on them)
        if smb is not None:
            transport = Identity(user=smb.user, domain=smb.domain or "", source=SMB_SESSION,
                                 auth_layer="smb_session_setup")
            conn.smb_user, conn.smb_domain, conn.smb_session_frame = smb.user, smb.domain, smb.frame
            conn.smb_mechanism = smb.mechanism
        else:
            transport = ANONYMOUS
        self._security = ObservedContext(transport, RPC_AUTH)
        self._auth: tuple[int, int] | None = None  # (auth_type, auth_level) of the context
        self._answered = False  # a response came back since the context began
        self._kerberos_seen = False
        self._kerberos: KerberosExchange | None = None  # with a keytab: the ticket's keys
        self._offered: TokenInfo | None = None

    # -- plumbing ---------------------------------------------------------------------------

    def event(self, frame: int, kind: str, direction: str, **fields: Any) -> None:
        if kind == "malformed":
            self.malformed += 1
        add_event(self.conn, {"frame": frame, "kind": kind, "dir": direction, **fields})

    def feed(self, from_client: bool, data: bytes, frame: int) -> None:
        if self._released:
            return
        frames = self._frames[from_client]
        frames.append(data)
        while True:
            try:
                fragment = frames.pop()
            except ProtocolError as exc:
                # Not DCE/RPC framing (C706 12.6.3.1): drop this direction's bytes and start afresh.
                self._frames[from_client] = w.FrameBuffer()
                self.event(frame, "malformed", "c2s" if from_client else "s2c", layer="dcerpc",
                           reason=exc.reason)
                return
            if fragment is None:
                return
            if self._skip(fragment, frame):
                continue
            try:
                self._pdu(w.decode(fragment), frame)
            except ProtocolError as exc:
                self.event(frame, "malformed", "c2s" if from_client else "s2c", layer="dcerpc",
                           reason=exc.reason)

    def _skip(self, data: bytes, frame: int) -> bool:
        """Pass over a request or response that cannot matter without decoding it.

        Only EcDoConnect/EcDoConnectEx requests (and the responses to them) are read; every
        other call's stub is skipped by length. With keys to verify signatures every PDU must
        go through the verifier in order, so nothing is skipped then. A fragment whose header
        or sec_trailer does not hold together is left to the full decoder, which reports it."""
        ptype = data[2]
        if ptype > RESPONSE or ptype == 1 or self._unsealer is not None:
            return False
        e = "<" if data[4] & 0x10 else ">"
        flags = data[3]
        auth_length, call_id = (_LE_AUTH_CALL if e == "<" else _BE_AUTH_CALL).unpack_from(data, 10)
        length = len(data)
        body_start = 40 if ptype == w.REQUEST and flags & w.PFC_OBJECT_UUID else 24
        if body_start > length:
            return False
        if auth_length:
            trailer = length - auth_length - w.SEC_TRAILER_SIZE
            if trailer < body_start or data[trailer + 2] > trailer - body_start:
                return False
        calls = self._calls
        if ptype == w.REQUEST:
            ctx, opnum = (_LE_CTX_OP if e == "<" else _BE_CTX_OP).unpack_from(data, 20)
            if opnum in (0, 10) and self._contexts.get(ctx) == EMSMDB_UUID:
                return False
            if call_id in calls:
                if not flags & w.PFC_FIRST_FRAG:
                    return False  # a later fragment of a call being read
                del calls[call_id]  # the call id is reused by a call that does not matter
        else:
            if not self._answered:
                self._answer(frame)
            call = calls.get(call_id)
            if call is not None:
                if "ec" in call:
                    return False
                if flags & w.PFC_LAST_FRAG:
                    del calls[call_id]
        self.rpc_seen = True
        if not self.conn.first_frame:
            self.conn.first_frame = frame
        return True

    def gap(self, from_client: bool) -> None:
        if self._released:
            return
        self._frames[from_client] = w.FrameBuffer()
        self.conn.partial = True

    # -- PDUs --------------------------------------------------------------------------------

    def _pdu(self, f: w.Pdu, frame: int) -> None:
        self.rpc_seen = True
        if not self.conn.first_frame:
            self.conn.first_frame = frame
        if isinstance(f, w.Bind):  # AlterContext is a Bind
            self._bind(f, frame)
        elif isinstance(f, (w.BindAck, w.BindNak)):
            self._bind_reply(f, frame)
        elif isinstance(f, w.Auth3):
            self._auth_token(f, frame, "auth3")
        elif isinstance(f, w.Request):
            self._request(f, frame)
        elif isinstance(f, w.Response):
            if not self._answered:
                self._answer(frame)
            self._response(f, frame)
        elif isinstance(f, w.Fault):
            self.event(frame, "rpc.fault", "s2c", call_id=f.call_id, status=f"0x{f.status:08x}")
            if f.status in AUTH_REFUSED_FAULTS and self._auth is not None and not self._answered:
                # The first call after the handshake was refused: the logon failed.
                self._settle(frame, ok=False, reason=FAULT_NAMES[f.status])
            call = self._calls.pop(f.call_id, None)
            if call is not None and "ec" in call:
                # The call never ran: the RPC runtime refused it (after a failed NTLM
                # AUTHENTICATE, Windows faults the first call with access denied).
                ec: EmsmdbCall = call["ec"]
                ec.response_frame = frame
                ec.status = f"0x{f.status:08x}"
                ec.status_name = FAULT_NAMES.get(f.status, "fault")
                ec.fault = True

    def _bind(self, f: w.Bind, frame: int) -> None:
        kind = "alter_context" if isinstance(f, w.AlterContext) else "bind"
        auth_type = AUTH_TYPE_NAMES.get(f.auth.auth_type, str(f.auth.auth_type)) if f.auth else "none"
        auth_level = AUTH_LEVEL_NAMES.get(f.auth.auth_level, str(f.auth.auth_level)) if f.auth else "none"
        infos = []
        for ctx in f.contexts:
            ctx_id, iface = ctx.context_id, ctx.abstract.uuid
            version = "%d.%d" % ctx.abstract.version
            self._contexts[ctx_id] = iface
            info = BindInfo(frame, f.call_id, kind, iface, INTERFACE_NAMES.get(iface, iface),
                            version, auth_type, auth_level)
            infos.append(info)
            self.conn.binds.append(info)
        # One event per PDU: clients offer the same interface with several transfer syntaxes.
        first = infos[0] if infos else None
        self.event(frame, f"rpc.{kind}", "c2s", call_id=f.call_id,
                   interface=first.interface if first else None,
                   interface_name="+".join(dict.fromkeys(i.interface_name for i in infos)) or None,
                   version=first.version if first else None,
                   auth_type=auth_type, auth_level=auth_level)
        self._pending_binds[f.call_id] = infos
        if f.auth is not None:
            self._auth_token(f, frame, kind)
        elif kind == "bind" and self._auth is None:
            # A bind without an auth verifier: the context never begins, so the transport's
            # identity stands (SecurityContext.acting_identity in state NONE).
            self._record_identity(frame, "c2s")

    def _auth_token(self, f: w.Pdu, frame: int, leg: str) -> None:
        if f.auth is None:
            return
        info = inspect_token(f.auth.token, f.auth.auth_type)
        client = isinstance(f, (w.Bind, w.Auth3))
        d = "c2s" if client else "s2c"
        restart = self._security.state in (State.NONE, State.FAILED) or (
            self._security.state is State.ESTABLISHED and info.message == "negotiate")
        if client and (self._auth is None or restart):
            self._auth = (f.auth.auth_type, f.auth.auth_level)
            self._answered = False
            self._security.begin(self._mechanism(f.auth.auth_type, info))
        if info.mechanism == "kerberos" or f.auth.auth_type == AUTH_TYPE_KERBEROS:
            # Without a keytab Kerberos is named, not parsed: the client principal is inside
            # the ticket. A client may try it and fall back to NTLM in the same SPNEGO exchange.
            self._kerberos_seen = True
            self.event(frame, "kerberos.token", d, leg=leg, message=info.message)
            if self._keyring is not None and self._keyring.kerberos and info.raw:
                self._read_kerberos(info, f, frame, d, leg)
            if client:
                self._claim(info, f.auth.auth_type, frame)
            return
        if info.mechanism == "schannel":
            self.event(frame, f"schannel.{info.message or 'token'}", d, leg=leg,
                       **({"user": info.user, "domain": info.domain} if client else {}))
            if client:
                self._claim(info, f.auth.auth_type, frame)
            elif not isinstance(f, w.BindNak):
                self._settle(frame, ok=True)  # the server's NL_AUTH_MESSAGE answers the bind
            return
        if info.mechanism != "ntlm" or info.message is None:
            return
        if info.message == "challenge":
            self._server_challenge = info.server_challenge
        self.event(frame, f"ntlm.{info.message}", d, leg=leg,
                   **({"user": info.user, "domain": info.domain, "ntlm_version": info.ntlm_version}
                      if info.message == "authenticate" else {}))
        if info.message == "authenticate" and client:
            self._claim(info, f.auth.auth_type, frame)
            # The server's verdict shows later, if at all: a bind_nak, or an access-denied fault
            # on the first call (AUTH3 has no answer, MS-RPCE 3.3.1.5.7). Until the capture
            # shows one, the logon stands, as tshark's reading of a capture takes it.
            self._settle(frame, ok=True)
            if self._keyring is not None and self._keyring.hashes and f.auth.auth_level >= 3:
                keys = derive(info.raw, self._server_challenge, self._keyring)
                self.event(frame, "ntlm.session_keys", d, user=info.user, result=keys.reason)
                if keys.ok and keys.readers is not None:
                    self._unsealer = Unsealer(keys.readers, f.auth.auth_type, f.auth.auth_level,
                                              f.auth.context_id)

    def _read_kerberos(self, info: TokenInfo, f: w.Pdu, frame: int, direction: str, leg: str) -> None:
        """With a keytab: the AP-REQ's ticket names the client (the claim then carries it), and
        the AP-REP's subkey completes the key that signs and seals the calls."""
        from .kerberos_keys import KerberosExchange, KerberosUnsealer

        keys, auth = self._keyring.kerberos if self._keyring is not None else None, f.auth
        if keys is None or auth is None:
            return
        if info.message == "ap_req" and direction == "c2s":
            self._kerberos = KerberosExchange(keys)
            ticket = self._kerberos.ap_req(info.raw)
            self.event(frame, "kerberos.ticket", direction, leg=leg, result=ticket.result,
                       service=ticket.service, enctype=ticket.enctype, principal=ticket.client,
                       user=ticket.user, domain=ticket.domain)
            if ticket.result == "ok":
                info.user, info.domain, info.principal = ticket.user, ticket.domain, ticket.client
                if auth.auth_level >= 4 and self._kerberos.readable:
                    self._unsealer = KerberosUnsealer(
                        self._kerberos, auth.auth_type, auth.auth_level, auth.context_id,
                        bool(f.header.pfc_flags & w.PFC_SUPPORT_HEADER_SIGN))
        elif info.message == "ap_rep" and self._kerberos is not None:
            result = self._kerberos.ap_rep(info.raw)
            if result != "ok":
                self.event(frame, "kerberos.ap_rep", direction, leg=leg, result=result)

    def _mechanism(self, auth_type: int, info: TokenInfo) -> str:
        if auth_type == AUTH_TYPE_SCHANNEL:
            return "schannel"
        if auth_type == AUTH_TYPE_KERBEROS:
            return "kerberos"
        if auth_type == AUTH_TYPE_NTLM:
            return "ntlm"
        if auth_type == AUTH_TYPE_SPNEGO:
            return mechanism_name(info, self._kerberos_seen) if info.mechanism != "unknown" else "spnego"
        return AUTH_TYPE_NAMES.get(auth_type, str(auth_type))

    def _claim(self, info: TokenInfo, auth_type: int, frame: int) -> None:
        """The client's token names (or hides) who it is."""
        mech = self._security.mechanism
        if mech is None:
            return
        if info.mechanism == "ntlm" or mech.claimed is None or mech.claimed.mechanism == "unknown":
            mech.claim(info)
            mech.mechanism = self._mechanism(auth_type, info)
            if info.user is not None:
                self._offered = info
                self.conn.offered_frame = frame

    def _answer(self, frame: int) -> None:
        """A response came back: the context under way (or just settled) was accepted."""
        self._answered = True
        if self._security.state is State.PENDING:
            self._settle(frame, ok=True)

    def _settle(self, frame: int, ok: bool, reason: str = "ok") -> None:
        if ok:
            self._security.conclude(True)
        elif self._security.state is State.PENDING:
            self._security.conclude(False, reason)
        else:
            self._security.fail(reason)
        self._record_identity(frame, "s2c" if not ok else "c2s", reason=None if ok else reason)

    def _record_identity(self, frame: int, direction: str, reason: str | None = None) -> None:
        c = self.conn
        acting = self._security.acting()
        mech = self._security.mechanism
        c.mechanism = mech.mechanism if mech is not None else NO_MECHANISM
        if self._auth is not None:
            c.auth_type = AUTH_TYPE_NAMES.get(self._auth[0], str(self._auth[0]))
            c.auth_level = AUTH_LEVEL_NAMES.get(self._auth[1], str(self._auth[1]))
        else:
            c.auth_type = c.auth_level = "none"
        claimed = mech.claimed if mech is not None else None
        c.ntlm_version = claimed.ntlm_version if claimed is not None else None
        if acting is None:
            c.identity_source, c.user, c.domain = "none", None, None
        else:
            c.identity_source, c.user, c.domain = acting.source, acting.user, acting.domain or None
        if self._offered is not None:
            c.offered_user, c.offered_domain = self._offered.user, self._offered.domain
        if c.identity_source == SMB_SESSION:
            c.principal = self.smb.principal if self.smb is not None else None
        else:
            c.principal = claimed.principal if claimed is not None and acting is not None else None
        c.identity_frame = frame
        fields: dict[str, Any] = {"source": c.identity_source, "user": c.user, "domain": c.domain,
                                  "mechanism": c.mechanism, "auth_type": c.auth_type,
                                  "auth_level": c.auth_level}
        if c.identity_source == SMB_SESSION and self.smb is not None:
            fields["session_frame"] = self.smb.frame
            fields["session_mechanism"] = self.smb.mechanism
        if c.principal is not None:
            fields["principal"] = c.principal
        if reason is not None:
            fields["result"] = reason
        self.event(frame, "rpc.identity", direction, **fields)

    def _bind_reply(self, f: w.BindAck | w.BindNak, frame: int) -> None:
        infos = self._pending_binds.pop(f.call_id, [])
        if isinstance(f, w.BindNak):
            for info in infos:
                info.result, info.result_frame = "nak", frame
            self.event(frame, "rpc.bind_nak", "s2c", call_id=f.call_id, reason=f.reject_reason)
            if self._security.state in (State.PENDING, State.ESTABLISHED) and self._auth is not None:
                self._settle(frame, ok=False, reason="bind_nak")
            return
        results = [r.result for r in f.results]
        for info, res in zip(infos, results):
            info.result, info.result_frame = ("ok" if res == 0 else "rejected"), frame
        kind = "rpc.alter_context_resp" if isinstance(f, w.AlterContextResp) else "rpc.bind_ack"
        accepted = [i.interface_name for i, r in zip(infos, results) if r == 0]
        self.event(frame, kind, "s2c", call_id=f.call_id, accepted=accepted)
        if f.auth is not None:
            self._auth_token(f, frame, kind.split(".")[1])

    def _request(self, f: w.Request, frame: int) -> None:
        ctx, opnum, flags = f.context_id, f.opnum, f.header.pfc_flags
        endian = "<" if f.header.little_endian else ">"
        stub, sealed = self._open(f, frame, True)
        call = self._calls.get(f.call_id)
        if flags & w.PFC_FIRST_FRAG or call is None:
            iface = self._contexts.get(ctx)
            call = {"opnum": opnum, "iface": iface, "stub": b"", "frame": frame, "sealed": sealed}
            if len(self._calls) >= MAX_OPEN_CALLS:  # unanswered calls must not pile up
                self._calls.pop(next(iter(self._calls)))
            self._calls[f.call_id] = call
        if call["iface"] == EMSMDB_UUID and opnum in (0, 10) and len(call["stub"]) < MAX_STUB:
            call["stub"] += stub
        if flags & w.PFC_LAST_FRAG and call["iface"] == EMSMDB_UUID and opnum in (0, 10):
            user_dn = None if call["sealed"] else read_user_dn(call["stub"], endian)
            ec = EmsmdbCall(EMSMDB_CALLS[opnum], frame, user_dn, sealed=call["sealed"],
                            unsealed=bool(self._unsealer and f.auth and f.auth.auth_level == 6))
            call["ec"] = ec
            call["stub"] = b""
            self.conn.emsmdb.append(ec)
            self.event(frame, "emsmdb.connect_request", "c2s", call=ec.call, call_id=f.call_id,
                       user_dn=user_dn, sealed=ec.sealed)

    def _open(self, f: w.Request | w.Response, frame: int, from_client: bool) -> tuple[bytes, bool]:
        """The stub as far as it can be read, and whether it is still sealed. With keys, every
        protected PDU goes through the verifier in order, so the RC4 streams stay in step."""
        sealed = bool(f.auth and f.auth.auth_level == 6)
        if self._unsealer is None or f.auth is None or f.auth.auth_level < 3:
            return f.stub, sealed
        try:
            stub = self._unsealer.open(f, from_client)
        except VerifyError as exc:
            self.conn.bad_signatures += 1
            self.event(frame, "rpc.verify", "c2s" if from_client else "s2c", call_id=f.call_id,
                       result=exc.reason)
            return f.stub, sealed
        self.conn.verified_pdus += 1
        return stub, False

    def _response(self, f: w.Response, frame: int) -> None:
        flags = f.header.pfc_flags
        stub, sealed = self._open(f, frame, False)
        call = self._calls.get(f.call_id)
        if call is None or "ec" not in call:
            if flags & w.PFC_LAST_FRAG:
                self._calls.pop(f.call_id, None)
            return
        # Only the last 4 bytes matter (the MAPISTATUS return value), so keep a short tail.
        call["tail"] = (call.get("tail", b"") + stub)[-4:]
        if not flags & w.PFC_LAST_FRAG:
            return
        self._calls.pop(f.call_id, None)
        ec: EmsmdbCall = call["ec"]
        ec.response_frame = frame
        if sealed or len(call["tail"]) < 4:
            ec.sealed = ec.sealed or sealed
        else:
            code = struct.unpack("<I" if f.header.little_endian else ">I", call["tail"])[0]
            ec.status, ec.status_name = status_hex(code), status_name(code)
        c = self.conn
        self.event(frame, "emsmdb.connect", "s2c", call=ec.call, user_dn=ec.user_dn,
                   acting_user=c.acting if c.user else None, identity_source=c.identity_source,
                   status=ec.status, status_name=ec.status_name, sealed=ec.sealed)

    def release(self) -> None:
        """The connection has ended: settle it and drop everything but its summary."""
        self.finish()
        self._released = True
        self._frames.clear()
        self._calls.clear()
        self._pending_binds.clear()
        self._unsealer = None

    def finish(self) -> None:
        """Settle what the whole capture says about this connection's identity. Idempotent."""
        if self._finished:
            return
        self._finished = True
        if self._auth is not None and self._security.state is State.PENDING:
            frame = self.conn.binds[-1].frame if self.conn.binds else self.conn.first_frame
            mech = self._security.mechanism
            if mech is not None and mech.claimed is not None and mech.claimed.mechanism != "unknown":
                # The client proved itself (a ticket, a secure-channel negotiate) and nothing in
                # the capture says the server refused it.
                self._settle(frame, ok=True)
            else:
                # An authenticated bind whose handshake the capture does not complete: the
                # server never acted on anyone we can name (a pending context acts for nobody).
                self._record_identity(frame, "c2s", reason="incomplete")
            self.conn.events.sort(key=lambda e: e["frame"])
