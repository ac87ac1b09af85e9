"""One RPC connection seen in a capture: binds, the security context, and EMSMDB calls.

The identity rule is the one in DESIGN.md section 2 and MS-RPCE 3.3.3.4: an authenticated bind
(or alter_context/auth3 leg) replaces the transport's identity; a bind without authentication
keeps it. On a named pipe the transport identity is the SMB session's user; on TCP it is
nobody.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..directory import status_hex, status_name
from ..sansio import ProtocolError
from ..rpc import pdu as w
from ..rpc.verifier import VerifyError
from .authtokens import inspect_token
from .unseal import Keyring, Unsealer, derive
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


@dataclass
class SmbSessionInfo:
    user: str | None
    domain: str | None
    frame: int | None
    events: list[dict[str, Any]]


def read_user_dn(stub: bytes, endian: str = "<") -> str | None:
    """szUserDN of EcDoConnect/EcDoConnectEx (MS-OXCRPC 3.1.4.1/3.1.4.11): the first [in]
    parameter, an NDR conformant varying string of 8-bit characters (C706 14.3.4.2).

    The string is read straight from the front of the stub; when that is not printable ASCII
    the interface's own request structure is tried, and then the string behind a unique-pointer
    referent (clients of other eras append different trailing parameters)."""
    dn = _read_ndr_string(stub, 0, endian)
    if dn is not None:
        return dn
    if endian == "<":
        from ..interfaces.emsmdb import EcDoConnect  # impacket's NDR: slow to import and to run
        try:
            req = EcDoConnect(data=stub)
            dn = req["szUserDN"]
            dn = dn.decode("latin-1") if isinstance(dn, bytes) else str(dn)
            dn = dn.rstrip("\x00")
            if dn and dn.isprintable():
                return dn
        except Exception:  # impacket's NDR raises assorted errors on foreign stubs
            pass
    return _read_ndr_string(stub, 4, endian)


def _read_ndr_string(stub: bytes, pos: int, endian: str) -> str | None:
    """A conformant varying string of printable ASCII at `pos` (at 4: behind a unique-pointer
    referent), or None."""
    if len(stub) < pos + 12:
        return None
    max_count, offset, actual = struct.unpack(endian + "III", stub[pos:pos + 12])
    if offset == 0 and 0 < actual <= max_count <= 4096 and pos + 12 + actual <= len(stub):
        text = stub[pos + 12:pos + 12 + actual].rstrip(b"\x00")
        if all(32 <= c < 127 for c in text):
            return text.decode("ascii")
    return None


_LE_AUTH_CALL, _BE_AUTH_CALL = struct.Struct("<HI"), struct.Struct(">HI")
_LE_CTX_OP, _BE_CTX_OP = struct.Struct("<HH"), struct.Struct(">HH")
RESPONSE = w.RESPONSE


def _cut(data: bytes | bytearray) -> tuple[Any, int | None]:
    """Cut complete fragments by frag_length (C706 12.6.3.1): ([(start, end)], where the
    incomplete rest begins), or (reason, None) when the bytes are not DCE/RPC framing."""
    frags = []
    pos, n = 0, len(data)
    while n - pos >= 2:
        if data[pos] != 5 or data[pos + 1] > 1:
            return f"rpc version {data[pos]}.{data[pos + 1]} is not 5.0/5.1", None
        if n - pos < 10:
            break
        frag_length = data[pos + 8] | data[pos + 9] << 8 if data[pos + 4] & 0x10 else \
            data[pos + 8] << 8 | data[pos + 9]
        if frag_length < w.HEADER_SIZE:
            return f"frag_length {frag_length} is smaller than the header", None
        if n - pos < frag_length:
            break
        frags.append((pos, pos + frag_length))
        pos += frag_length
    return frags, pos


class RpcConnection:
    def __init__(self, conn: Connection, smb: SmbSessionInfo | None = None,
                 keyring: Keyring | None = None) -> None:
        self.conn = conn
        self.smb = smb
        self._keyring = keyring
        self._finished = self._released = False
        self._server_challenge: bytes | None = None
        self._unsealer: Unsealer | None = None
        self._buffers = {True: bytearray(), False: bytearray()}
        self._contexts: dict[int, str] = {}
        self._calls: dict[int, dict[str, Any]] = {}
        self._pending_binds: dict[int, list[BindInfo]] = {}
        self.rpc_seen = False
        self.malformed = 0  # malformed events so far (the walker resynchronises on them)
        self._identity_auth: tuple[str, str] | None = None  # (auth_type name, level name)
        self._authenticated = False
        self._kerberos: tuple[int, str, str] | None = None
        if smb is not None:
            conn.smb_user, conn.smb_domain, conn.smb_session_frame = smb.user, smb.domain, smb.frame

    # -- plumbing ---------------------------------------------------------------------------

    def event(self, frame: int, kind: str, direction: str, **fields: Any) -> None:
        if kind == "malformed":
            self.malformed += 1
        add_event(self.conn, {"frame": frame, "kind": kind, "dir": direction, **fields})

    def feed(self, from_client: bool, data: bytes, frame: int) -> None:
        if self._released:
            return
        buf = self._buffers[from_client]
        if buf:
            buf += data
            data = buf
        frags, rest = _cut(data)
        if rest is None:
            # Not DCE/RPC framing (C706 12.6.3.1): drop this direction's bytes and start afresh.
            self._buffers[from_client] = bytearray()
            if self.rpc_seen:
                self.event(frame, "malformed", "c2s" if from_client else "s2c", layer="dcerpc",
                           reason=frags)
            return
        self._buffers[from_client] = bytearray(data[rest:]) if rest < len(data) else bytearray()
        for start, end in frags:
            if self._skip(data, start, end, frame):
                continue
            try:
                self._pdu(w.decode(bytes(data[start:end])), frame)
            except ProtocolError as exc:
                self.event(frame, "malformed", "c2s" if from_client else "s2c", layer="dcerpc",
                           reason=exc.reason)

    def _skip(self, data: bytes | bytearray, start: int, end: int, frame: int) -> bool:
        """Pass over a request or response that cannot matter without decoding it.

        Only EcDoConnect/EcDoConnectEx requests (and the responses to them) are read; every
        other call's stub is skipped by length. With keys to verify signatures every PDU must
        go through the verifier in order, so nothing is skipped then. A fragment whose header
        or sec_trailer does not hold together is left to the full decoder, which reports it."""
        ptype = data[start + 2]
        if ptype > RESPONSE or ptype == 1 or self._unsealer is not None:
            return False
        e = "<" if data[start + 4] & 0x10 else ">"
        flags = data[start + 3]
        auth_length, call_id = (_LE_AUTH_CALL if e == "<" else _BE_AUTH_CALL).unpack_from(data, start + 10)
        length = end - start
        body_start = 40 if ptype == w.REQUEST and flags & w.PFC_OBJECT_UUID else 24
        if body_start > length:
            return False
        if auth_length:
            trailer = length - auth_length - w.SEC_TRAILER_SIZE
            if trailer < body_start or data[start + trailer + 2] > trailer - body_start:
                return False
        calls = self._calls
        if ptype == w.REQUEST:
            ctx, opnum = (_LE_CTX_OP if e == "<" else _BE_CTX_OP).unpack_from(data, start + 20)
            if opnum in (0, 10) and self._contexts.get(ctx) == EMSMDB_UUID:
                return False
            if call_id in calls:
                if not flags & w.PFC_FIRST_FRAG:
                    return False  # a later fragment of a call being read
                del calls[call_id]  # the call id is reused by a call that does not matter
        else:
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
        self._buffers[from_client] = bytearray()
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
            self._response(f, frame)
        elif isinstance(f, w.Fault):
            self.event(frame, "rpc.fault", "s2c", call_id=f.call_id, status=f"0x{f.status:08x}")
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
            self._identity_auth = (auth_type, auth_level)
            self._auth_token(f, frame, kind)
        elif not self._authenticated and kind == "bind":
            self._inherit(frame)

    def _inherit(self, frame: int) -> None:
        """A bind without an auth verifier keeps the transport's identity."""
        c = self.conn
        if c.transport == "ncacn_np":
            c.identity_source = "smb_session"
            c.user = self.smb.user if self.smb else None
            c.domain = self.smb.domain if self.smb else None
            self.event(frame, "rpc.identity", "c2s", source="smb_session", user=c.user,
                       domain=c.domain, session_frame=self.smb.frame if self.smb else None)
        else:
            c.identity_source = "anonymous"
            self.event(frame, "rpc.identity", "c2s", source="anonymous", user=None)
        c.identity_frame = frame
        c.auth_level, c.auth_type = "none", "none"

    def _auth_token(self, f: w.Pdu, frame: int, leg: str) -> None:
        assert f.auth is not None
        c = self.conn
        auth_type = AUTH_TYPE_NAMES.get(f.auth.auth_type, str(f.auth.auth_type))
        level = AUTH_LEVEL_NAMES.get(f.auth.auth_level, str(f.auth.auth_level))
        info = inspect_token(f.auth.token)
        d = "c2s" if isinstance(f, (w.Bind, w.Auth3)) else "s2c"
        if auth_type == "kerberos" or info.mechanism == "kerberos":
            # Kerberos is named, not parsed. A client may try it and fall back to NTLM in the
            # same SPNEGO exchange, so the identity is settled in finish().
            self.event(frame, "kerberos.token", d, leg=leg)
            if self._kerberos is None:
                self._kerberos = (frame, auth_type, level)
            return
        if info.mechanism != "ntlm" or info.message is None:
            return
        if info.message == "challenge":
            self._server_challenge = info.server_challenge
        self.event(frame, f"ntlm.{info.message}", d, leg=leg,
                   **({"user": info.user, "domain": info.domain, "ntlm_version": info.ntlm_version}
                      if info.message == "authenticate" else {}))
        if info.message == "authenticate":
            source = "rpc_spnego" if auth_type == "spnego" else "rpc_ntlm"
            c.identity_source = "anonymous" if info.anonymous else source
            c.user = None if info.anonymous else info.user
            c.domain = None if info.anonymous else info.domain
            c.auth_level, c.auth_type, c.ntlm_version = level, auth_type, info.ntlm_version
            c.identity_frame = frame
            self._authenticated = True
            self.event(frame, "rpc.identity", d, source=c.identity_source, user=c.user,
                       domain=c.domain, auth_type=auth_type, auth_level=level)
            if self._keyring and f.auth.auth_level >= 3:
                keys = derive(info.raw, self._server_challenge, self._keyring)
                self.event(frame, "ntlm.session_keys", d, user=info.user, result=keys.reason)
                if keys.ok and keys.readers is not None:
                    self._unsealer = Unsealer(keys.readers, f.auth.auth_type, f.auth.auth_level,
                                              f.auth.context_id)

    def _bind_reply(self, f: w.BindAck | w.BindNak, frame: int) -> None:
        infos = self._pending_binds.pop(f.call_id, [])
        if isinstance(f, w.BindNak):
            for info in infos:
                info.result, info.result_frame = "nak", frame
            self.event(frame, "rpc.bind_nak", "s2c", call_id=f.call_id, reason=f.reject_reason)
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
        self._buffers.clear()
        self._calls.clear()
        self._pending_binds.clear()
        self._unsealer = None

    def finish(self) -> None:
        """Settle what the whole capture says about this connection's identity. Idempotent."""
        if self._finished:
            return
        self._finished = True
        c = self.conn
        if self._kerberos is not None and not self._authenticated:
            frame, auth_type, level = self._kerberos
            c.identity_source, c.user, c.domain = "kerberos", None, None
            c.auth_type, c.auth_level, c.identity_frame = auth_type, level, frame
            self.event(frame, "rpc.identity", "c2s", source="kerberos", user=None,
                       auth_type=auth_type, auth_level=level)
            c.events.sort(key=lambda e: e["frame"])
        elif self._identity_auth is not None and not self._authenticated:
            # An authenticated bind whose handshake the capture does not complete: the server
            # never acted on anyone we can name.
            c.identity_source = "none"
            c.auth_type, c.auth_level = self._identity_auth
