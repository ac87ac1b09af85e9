"""The server side of one connection-oriented DCE/RPC association, sans-IO.

Bytes in, `Output` (bytes, events, close) out. The layering follows Samba's dcesrv_core.c:
the transport hands us the identity it established; binds, alter_contexts and auth3 run the
security context; requests are verified, reassembled and dispatched to interfaces, which only
see a `CallContext` with the acting identity that the association's `SecurityContext`
(emulator/auth/context.py) decides.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..auth.context import SecurityContext, State
from ..auth.factory import AuthFactory
from ..config import AUTH_LEVEL_NAMES, Policy
from ..events import Event, event, limit, malformed
from ..identity import RPC_AUTH, Identity
from ..sansio import Output, ProtocolError
from . import pdu as P
from .interface import (NCA_S_FAULT_ACCESS_DENIED, NCA_S_FAULT_NDR, NCA_S_FAULT_SEC_PKG_ERROR,
                        NCA_S_PROTO_ERROR, NCA_S_UNK_IF, CallContext, RpcFault, RpcInterface)
from .verifier import (LEVEL_CONNECT, LEVEL_INTEGRITY, RpcProtection, VerifyError,
                       effective_level, overhead, protect, unprotect)

LAYER = "rpc"
AUTH_TYPE_NONE, AUTH_TYPE_SPNEGO, AUTH_TYPE_NTLM, AUTH_TYPE_KERBEROS = 0, 9, 10, 16
AUTH_TYPE_NAMES = {AUTH_TYPE_NONE: "none", AUTH_TYPE_SPNEGO: "spnego", AUTH_TYPE_NTLM: "ntlm",
                   AUTH_TYPE_KERBEROS: "kerberos"}
LEVEL_NONE = 1

# What we offer as max_recv/max_xmit_frag: Windows uses 5840 on TCP and 4280 on named pipes.
OUR_MAX_FRAG = {"ncacn_ip_tcp": 5840, "ncacn_np": 4280}
# C706 12.6.3.6: every implementation must accept fragments of at least this size.
MIN_FRAG = 1432
SUPPORTED_FEATURES = P.BTFN_KEEP_CONNECTION_ON_ORPHAN


def auth_type_name(auth_type: int) -> str:
    return AUTH_TYPE_NAMES.get(auth_type, str(auth_type))


def auth_level_name(level: int) -> str:
    return AUTH_LEVEL_NAMES.get(level, str(level))


@dataclass
class _PartialCall:
    call_id: int
    context_id: int
    opnum: int
    level: int                  # the effective level the fragments actually arrived at
    little_endian: bool         # the stub's integer byte order (the first fragment's drep)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class RpcConnection:
    def __init__(self, *, transport: str, transport_identity: Identity,
                 interfaces: Sequence[RpcInterface], auth: AuthFactory, policy: Policy,
                 info: dict | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time) -> None:
        self.transport = transport
        self.transport_identity = transport_identity
        self._interfaces = list(interfaces)
        self._auth_factory = auth
        self._policy = policy
        self._info = dict(info or {})
        self._random_bytes = random_bytes
        self._now = now
        self._limits = policy.limits
        self._frames = P.FrameBuffer(self._limits.max_fragment_size)
        self._closed = False
        self._released = False
        # Association state.
        self._bound = False
        self._contexts: dict[int, RpcInterface] = {}
        self._xmit = MIN_FRAG
        self._assoc_group = 0
        # Security: the association's context (the KB's rule lives there), the auth triple the
        # bind fixed, and once established, how calls are protected.
        self._security = SecurityContext(transport_identity, RPC_AUTH)
        self._auth_triple: tuple[int, int, int] | None = None   # type, level, context id
        self._header_signing = False
        self._sc: RpcProtection | None = None
        self._pending_bind_fields: dict[str, Any] = {}
        self._identity: Identity | None = None
        self._partial: _PartialCall | None = None
        self._state: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ public API

    @property
    def identity(self) -> Identity | None:
        """The acting identity, once a bind (and its authentication) completed."""
        return self._identity

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_partial_input(self) -> bool:
        # A fragment cut short, or a call whose last fragment has not come yet.
        return self._frames.pending > 0 or self._partial is not None

    def receive(self, data: bytes) -> Output:
        if self._closed:
            return Output(close=True)
        out = Output()
        self._frames.append(data)
        while True:
            try:
                frag = self._frames.pop()
            except ProtocolError as exc:
                if isinstance(exc, P.FragmentTooLarge):
                    out.events.append(limit(LAYER, "max_fragment_size", size=exc.size, value=exc.limit,
                                            transport=self.transport))
                out.events.append(self._malformed(exc.reason))
                return self._close(out)
            if frag is None:
                return out
            try:
                out.extend(self._on_fragment(frag))
            except Exception as exc:  # last line of defence: a bug must not kill the server
                out.events.append(self._malformed("internal_error", error=type(exc).__name__))
                out.close = True
            if out.close:
                return self._close(out)

    def close(self) -> list[Event]:
        """Release interface state once (context handles); returns the interfaces' events."""
        self._closed = True
        if self._released:
            return []
        self._released = True
        events: list[Event] = []
        seen: set[str] = set()
        for iface in self._contexts.values():
            if iface.name in seen:
                continue
            seen.add(iface.name)
            try:
                events.extend(iface.connection_closed(self._state.setdefault(iface.name, {})))
            except Exception as exc:
                events.append(self._malformed("interface_close_error", interface=iface.name,
                                              error=type(exc).__name__))
        return events

    # ------------------------------------------------------------------ helpers

    def _ev(self, kind: str, **fields: Any) -> Event:
        return event(LAYER, kind, transport=self.transport, **fields, **self._info_fields(fields))

    def _info_fields(self, taken: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self._info.items() if k not in taken and k != "transport"}

    def _malformed(self, reason: str, **fields: Any) -> Event:
        return malformed(LAYER, reason, transport=self.transport, **fields,
                         **self._info_fields({"reason": 1, **fields}))

    def _close(self, out: Output) -> Output:
        out.close = True
        self._closed = True
        return out

    def _fault(self, call_id: int, status: int, reason: str, *, context_id: int = 0,
               close: bool = False, did_not_execute: bool = True, **fields: Any) -> Output:
        flags = P.PFC_FIRST_FRAG | P.PFC_LAST_FRAG
        if did_not_execute:
            flags |= P.PFC_DID_NOT_EXECUTE
        data = P.assemble(P.FAULT, flags, call_id, P.fault_body(status, context_id))
        ev = self._ev("rpc.fault", status=f"0x{status:08x}", reason=reason, call_id=call_id, **fields)
        return Output(data, [ev], close)

    def _bind_nak(self, call_id: int, reason: int) -> bytes:
        return P.assemble(P.BIND_NAK, P.PFC_FIRST_FRAG | P.PFC_LAST_FRAG, call_id, P.bind_nak_body(reason))

    # ------------------------------------------------------------------ dispatch

    def _on_fragment(self, frag: bytes) -> Output:
        try:
            pdu = P.decode(frag)
        except ProtocolError as exc:
            out = Output(events=[self._malformed(exc.reason)])
            # A request whose call id we can read still gets a fault (C706 12.6.4.7).
            if len(frag) >= P.HEADER_SIZE and frag[2] == P.REQUEST and frag[4] & 0x10:
                call_id = struct.unpack_from("<I", frag, 12)[0]
                out.extend(self._fault(call_id, NCA_S_PROTO_ERROR, "malformed"))
            return self._close(out)
        if not pdu.header.ascii_ieee:
            # Big-endian integers are read (the interfaces convert such stubs, C706 14.1:
            # the receiver makes it right); EBCDIC characters and non-IEEE floats are not.
            out = Output(events=[self._malformed("drep_unsupported", drep=pdu.header.drep.hex())])
            return self._close(out)
        if isinstance(pdu, P.AlterContext):
            return self._on_alter(pdu)
        if isinstance(pdu, P.Bind):
            return self._on_bind(pdu)
        if isinstance(pdu, P.Auth3):
            return self._on_auth3(pdu)
        if isinstance(pdu, P.Request):
            return self._on_request(pdu)
        if isinstance(pdu, P.Orphaned):
            # C706 12.6.4.11: the client abandoned a call; drop whatever of it we hold.
            if self._partial is not None and self._partial.call_id == pdu.call_id:
                self._partial = None
            return Output()
        if isinstance(pdu, (P.CoCancel, P.Shutdown)):
            return Output()
        # Server-to-client PDUs coming from a client.
        out = Output(events=[self._malformed(f"unexpected {P.PTYPE_NAMES[pdu.header.ptype]} from client")])
        return self._close(out)

    # ------------------------------------------------------------------ presentation contexts

    def _find_interface(self, syntax: P.SyntaxId) -> RpcInterface | None:
        want = syntax.uuid.lower()
        for iface in self._interfaces:
            if iface.uuid.lower() != want:
                continue
            # C706 11.2.3: major versions must match; the server's minor must be >= the client's.
            if iface.version[0] == syntax.version[0] and iface.version[1] >= syntax.version[1]:
                return iface
        return None

    def _evaluate(self, contexts: Sequence[P.PresentationContext]
                  ) -> tuple[list[P.ContextResult], dict[int, RpcInterface]]:
        results: list[P.ContextResult] = []
        accepted: dict[int, RpcInterface] = {}
        for ctx in contexts:
            features = [t for t in ctx.transfer_syntaxes
                        if t.uuid.startswith(P.BTFN_PREFIX) and t.uuid.endswith("-000000000000")]
            if features:
                offered = int.from_bytes(bytes.fromhex(features[0].uuid[19:23]), "little")
                results.append(P.ContextResult(P.RESULT_NEGOTIATE_ACK, offered & SUPPORTED_FEATURES,
                                               P.NULL_SYNTAX))
                continue
            iface = self._find_interface(ctx.abstract)
            if iface is None:
                results.append(P.ContextResult(P.RESULT_PROVIDER_REJECTION,
                                               P.REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED, P.NULL_SYNTAX))
                continue
            ndr32 = P.SyntaxId(*P.NDR32)
            if any(t.uuid.lower() == ndr32.uuid and t.version == ndr32.version
                   for t in ctx.transfer_syntaxes):
                results.append(P.ContextResult(P.RESULT_ACCEPTANCE, 0, ndr32))
                accepted[ctx.context_id] = iface
            else:
                # NDR64 and anything else: like Windows without NDR64, reason 2.
                results.append(P.ContextResult(P.RESULT_PROVIDER_REJECTION,
                                               P.REASON_TRANSFER_SYNTAXES_NOT_SUPPORTED, P.NULL_SYNTAX))
        return results, accepted

    def _describe(self, contexts: Sequence[P.PresentationContext],
                  accepted: dict[int, RpcInterface]) -> dict[str, Any]:
        """Interface fields of the rpc.bind event: the first accepted, else the first proposed."""
        for ctx in contexts:
            if ctx.context_id in accepted:
                iface = accepted[ctx.context_id]
                return {"interface": iface.uuid, "interface_name": iface.name,
                        "version": f"{iface.version[0]}.{iface.version[1]}"}
        for ctx in contexts:
            if not ctx.abstract.uuid.startswith(P.BTFN_PREFIX):
                return {"interface": ctx.abstract.uuid, "interface_name": "",
                        "version": f"{ctx.abstract.version[0]}.{ctx.abstract.version[1]}"}
        return {"interface": "", "interface_name": "", "version": ""}

    def _below_policy(self, level: int, ifaces: Sequence[RpcInterface]) -> bool:
        minimum = effective_level(int(self._policy.min_auth_level.get(self.transport, LEVEL_NONE)))
        return effective_level(level) < minimum and any(not i.policy_exempt for i in ifaces)

    # ------------------------------------------------------------------ bind

    def _on_bind(self, b: P.Bind) -> Output:
        results, accepted = self._evaluate(b.contexts)
        av = b.auth
        level = av.auth_level if av else LEVEL_NONE
        fields = dict(self._describe(b.contexts, accepted),
                      auth_type=auth_type_name(av.auth_type if av else AUTH_TYPE_NONE),
                      auth_level=auth_level_name(level), call_id=b.call_id)
        out = Output()

        def nak(reason: int, result: str) -> Output:
            out.data += self._bind_nak(b.call_id, reason)
            out.events.append(self._ev("rpc.bind", **fields, result=result))
            return out

        if self._bound:
            # MS-RPCE 3.3.1.5.2: one bind per connection; further contexts come by alter_context.
            return nak(P.NAK_REASON_NOT_SPECIFIED, "second_bind")
        if self._security.state is not State.NONE:
            # An earlier bind on this connection was refused: its context is dead, and a new
            # bind starts a new one from the transport's identity.
            self._security = SecurityContext(self.transport_identity, RPC_AUTH)
        acceptor = None
        if av is not None:
            if not LEVEL_CONNECT <= av.auth_level <= 6:
                out.events.append(self._malformed(f"auth_level {av.auth_level}"))
                return nak(P.NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED, "unsupported_auth")
            acceptor = self._auth_factory.acceptor(av.auth_type)
            if acceptor is None:
                return nak(P.NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED, "unsupported_auth")
        if self._below_policy(level, list(accepted.values())):
            return nak(P.NAK_LOCAL_LIMIT_EXCEEDED, "below_policy")

        auth_token = None
        step = None
        if av is not None and acceptor is not None:
            self._security.begin(acceptor)
            step = self._security.step(av.token)
            out.events.extend(step.events)
            if self._security.state is State.FAILED:
                return nak(P.NAK_INVALID_CHECKSUM, self._security.failure or "malformed")
            auth_token = step.token

        # Accept the association.
        self._bound = True
        self._contexts.update(accepted)
        ours = OUR_MAX_FRAG.get(self.transport, 4280)
        self._xmit = max(MIN_FRAG, min(b.max_recv_frag, ours))
        recv = max(MIN_FRAG, min(b.max_xmit_frag, ours))
        self._frames.max_fragment_size = recv
        self._assoc_group = b.assoc_group_id or (
            int.from_bytes(self._random_bytes(4), "little") & 0x7FFFFFFF) or 1
        flags = P.PFC_FIRST_FRAG | P.PFC_LAST_FRAG
        if av is not None and b.header.pfc_flags & P.PFC_SUPPORT_HEADER_SIGN:
            flags |= P.PFC_SUPPORT_HEADER_SIGN       # MS-RPCE 2.2.2.3: echo to agree
            self._header_signing = True
        body = P.bind_ack_body(self._xmit, recv, self._assoc_group, self._secondary_address(), results)
        auth = None
        if av is not None:
            auth = (av.auth_type, av.auth_level, av.context_id, auth_token or b"")
        out.data += P.assemble(P.BIND_ACK, flags, b.call_id, body, auth)

        if not accepted:
            fields["result"] = "no_usable_context"
        if av is None:
            out.events.append(self._ev("rpc.bind", **{"result": "ok", **fields}))
            self._set_identity(out)
            return out
        self._auth_triple = (av.auth_type, av.auth_level, av.context_id)
        self._pending_bind_fields = fields
        if self._security.state is State.ESTABLISHED:
            self._auth_complete(out)
        return out

    def _secondary_address(self) -> str:
        # MS-RPCE 2.2.2.4 / C706 12.6.4.4: the port on TCP, \PIPE\name on a named pipe. Always
        # send at least the terminating NUL: clients parse the field as a C string.
        if self.transport == "ncacn_np" and self._info.get("pipe"):
            return "\\PIPE\\" + str(self._info["pipe"]).split("\\")[-1]
        if self._info.get("local_port") is not None:
            return str(self._info["local_port"])
        return ""

    def _set_identity(self, out: Output) -> None:
        ident = self._security.acting_identity
        if ident is None:
            raise RuntimeError(f"no acting identity in state {self._security.state.value}")
        self._identity = ident
        out.events.append(self._ev("rpc.identity", source=ident.source, user=ident.user,
                                   domain=ident.domain, auth_layer=ident.auth_layer,
                                   mechanism=ident.mechanism))

    def _auth_complete(self, out: Output) -> None:
        if self._auth_triple is None:
            raise RuntimeError("security context established without a bind's auth triple")
        auth_type, level, ctx_id = self._auth_triple
        self._sc = RpcProtection(self._security.acceptor, auth_type, level, ctx_id,
                                 self._header_signing)
        result = self._pending_bind_fields.pop("result", "ok")
        out.events.append(self._ev("rpc.bind", **self._pending_bind_fields, result=result))
        self._set_identity(out)

    def _auth_failed(self, out: Output, reason: str) -> None:
        # MS-RPCE 3.3.1.5.2 / Samba: the security context is dead; nothing reaches an interface.
        if self._security.state is not State.FAILED:
            self._security.fail(reason)
        self._sc = None
        self._pending_bind_fields.pop("result", None)
        out.events.append(self._ev("rpc.bind", **self._pending_bind_fields, result=reason))

    # ------------------------------------------------------------------ auth3 / alter_context

    def _on_auth3(self, a: P.Auth3) -> Output:
        out = Output()
        if self._security.state is not State.PENDING:
            out.events.append(self._malformed("unexpected auth3"))
            return self._close(out)
        av = a.auth
        if av is None or (av.auth_type, av.auth_level, av.context_id) != self._auth_triple:
            out.events.append(self._malformed("auth3 verifier does not match the bind"))
            self._auth_failed(out, "malformed")
            return out
        step = self._security.step(av.token)
        out.events.extend(step.events)
        if self._security.state is State.ESTABLISHED:
            self._auth_complete(out)
        elif self._security.state is State.FAILED:
            self._auth_failed(out, self._security.failure or "malformed")
        else:
            # AUTH3 is the last leg: a mechanism that wants more has not finished in time.
            self._auth_failed(out, "bad_state")
        return out   # auth3 has no response (C706 12.6.4.1)

    def _on_alter(self, a: P.AlterContext) -> Output:
        if not self._bound:
            out = Output(events=[self._malformed("alter_context before bind")])
            out.extend(self._fault(a.call_id, NCA_S_PROTO_ERROR, "no_bind"))
            return self._close(out)
        results, accepted = self._evaluate(a.contexts)
        av = a.auth
        fields = dict(self._describe(a.contexts, accepted),
                      auth_type=auth_type_name(av.auth_type if av else AUTH_TYPE_NONE),
                      auth_level=auth_level_name(av.auth_level if av else LEVEL_NONE),
                      call_id=a.call_id, alter=True)
        out = Output()
        token: bytes | None = None

        def refuse(result: str, status: int = NCA_S_FAULT_ACCESS_DENIED, close: bool = False) -> Output:
            out.events.append(self._ev("rpc.bind", **fields, result=result))
            out.extend(self._fault(a.call_id, status, result, close=close))
            return out

        state = self._security.state
        if state is State.FAILED:
            return refuse("auth_failed", close=True)
        if av is not None:
            triple = (av.auth_type, av.auth_level, av.context_id)
            if state is State.PENDING:
                if triple != self._auth_triple:
                    self._auth_failed(out, "downgrade")
                    return refuse("downgrade", close=True)
                step = self._security.step(av.token)
                out.events.extend(step.events)
                if self._security.state is State.FAILED:
                    reason = self._security.failure or "malformed"
                    self._auth_failed(out, reason)
                    out.extend(self._fault(a.call_id, NCA_S_FAULT_ACCESS_DENIED, reason, close=True))
                    return out
                token = step.token
                if self._security.state is State.ESTABLISHED:
                    self._auth_complete(out)
            elif state is State.ESTABLISHED:
                if self._auth_triple is not None and triple[:2] != self._auth_triple[:2]:
                    # MS-RPCE 3.3.1.5.4: the type/level of a security context cannot change.
                    return refuse("downgrade")
                if triple != self._auth_triple:
                    # A second security context on the connection: multiplexing not offered.
                    return refuse("unsupported_auth")
            else:
                # Authentication is negotiated by the bind, not added afterwards.
                return refuse("unsupported_auth")
        level = self._auth_triple[1] if state is State.ESTABLISHED and self._auth_triple else LEVEL_NONE
        if state is not State.PENDING and self._below_policy(level, list(accepted.values())):
            return refuse("below_policy")
        self._contexts.update(accepted)
        body = P.bind_ack_body(self._xmit, self._frames.max_fragment_size, self._assoc_group, "", results)
        auth = None
        if av is not None and token:
            auth = (av.auth_type, av.auth_level, av.context_id, token)
        out.data += P.assemble(P.ALTER_CONTEXT_RESP, P.PFC_FIRST_FRAG | P.PFC_LAST_FRAG, a.call_id, body, auth)
        if av is None:
            out.events.append(self._ev("rpc.bind", **fields, result="ok" if accepted else "no_usable_context"))
        return out

    # ------------------------------------------------------------------ requests

    def _on_request(self, r: P.Request) -> Output:
        if not self._bound:
            return self._fault(r.call_id, NCA_S_PROTO_ERROR, "no_bind", close=True)
        if self._security.state is State.FAILED:
            return self._fault(r.call_id, NCA_S_FAULT_ACCESS_DENIED, "auth_failed", close=True)
        if self._security.state is State.PENDING:
            return self._fault(r.call_id, NCA_S_FAULT_ACCESS_DENIED, "auth_incomplete", close=True)

        level = LEVEL_NONE
        stub = r.stub
        if self._sc is not None:
            level = effective_level(self._sc.auth_level)
            checks = level >= LEVEL_INTEGRITY or (level > LEVEL_CONNECT and r.auth is not None)
            if checks:
                try:
                    stub = unprotect(self._sc, r)
                except VerifyError as exc:
                    out = Output(events=[self._ev("rpc.verify", result=exc.reason, call_id=r.call_id,
                                                  auth_level=auth_level_name(self._sc.auth_level))])
                    out.extend(self._fault(r.call_id, NCA_S_FAULT_SEC_PKG_ERROR, exc.reason, close=True))
                    return out
            elif level > LEVEL_CONNECT:
                # Packet level without a verifier protects nothing: it counts as connect.
                level = LEVEL_CONNECT

        flags = r.header.pfc_flags
        if flags & P.PFC_FIRST_FRAG:
            if self._partial is not None:
                out = Output(events=[self._malformed("new call before the last fragment", call_id=r.call_id)])
                out.extend(self._fault(r.call_id, NCA_S_PROTO_ERROR, "interleaved_fragments"))
                return self._close(out)
            self._partial = _PartialCall(r.call_id, r.context_id, r.opnum, level,
                                         r.header.little_endian)
        elif self._partial is None or self._partial.call_id != r.call_id:
            out = Output(events=[self._malformed("fragment without a first fragment", call_id=r.call_id)])
            out.extend(self._fault(r.call_id, NCA_S_PROTO_ERROR, "orphan_fragment"))
            return self._close(out)
        call = self._partial
        call.level = min(call.level, level)
        call.chunks.append(stub)
        call.size += len(stub)
        if call.size > self._limits.max_pdu_size:
            self._partial = None
            out = Output(events=[limit(LAYER, "max_pdu_size", size=call.size, call_id=r.call_id,
                                       transport=self.transport)])
            out.extend(self._fault(r.call_id, NCA_S_PROTO_ERROR, "max_pdu_size"))
            return self._close(out)
        if not flags & P.PFC_LAST_FRAG:
            return Output()
        self._partial = None
        return self._dispatch(call, b"".join(call.chunks))

    def _dispatch(self, call: _PartialCall, stub: bytes) -> Output:
        iface = self._contexts.get(call.context_id)
        if iface is None:
            return self._fault(call.call_id, NCA_S_UNK_IF, "unknown_context", context_id=call.context_id)
        if self._below_policy(call.level, [iface]):
            return self._fault(call.call_id, NCA_S_FAULT_ACCESS_DENIED, "below_policy",
                               context_id=call.context_id, interface=iface.uuid)
        # Interfaces and events see the protection this call really had: a packet-level call
        # that arrived without a verifier counts as connect (see _on_request).
        out = Output(events=[self._ev("rpc.request", interface=iface.uuid, interface_name=iface.name,
                                      opnum=call.opnum, auth_level=auth_level_name(call.level),
                                      call_id=call.call_id)])
        if self._identity is None:
            # Unreachable: requests are refused above unless the association has an identity.
            raise RuntimeError("dispatch without an acting identity")
        ctx = CallContext(identity=self._identity, transport=self.transport,
                          auth_type=self._sc.auth_type if self._sc else AUTH_TYPE_NONE,
                          auth_level=call.level,
                          conn_state=self._state.setdefault(iface.name, {}),
                          emit=out.events.append, info=dict(self._info),
                          little_endian=call.little_endian)
        try:
            result = iface.call(call.opnum, stub, ctx)
        except RpcFault as f:
            out.extend(self._fault(call.call_id, f.status, f.reason or "interface_fault",
                                   context_id=call.context_id, did_not_execute=False))
            return out
        except Exception as exc:
            out.events.append(self._malformed("interface_error", interface=iface.name, opnum=call.opnum,
                                              error=type(exc).__name__))
            out.extend(self._fault(call.call_id, NCA_S_FAULT_NDR, "bad_stub", context_id=call.context_id,
                                   did_not_execute=False))
            return out
        if not isinstance(result, (bytes, bytearray)):
            out.events.append(self._malformed("interface_error", interface=iface.name, opnum=call.opnum,
                                              error="non-bytes result"))
            out.extend(self._fault(call.call_id, NCA_S_FAULT_NDR, "bad_stub", context_id=call.context_id))
            return out
        signed = self._sc is not None and call.level > LEVEL_CONNECT
        out.data += self._response(call, bytes(result), signed)
        return out

    def _response(self, call: _PartialCall, stub: bytes, signed: bool) -> bytes:
        """Fragment a response to the client's max_recv_frag, each fragment signed or sealed on
        its own (MS-RPCE 3.3.1.5.2.2)."""
        room = self._xmit - P.HEADER_SIZE - 8 - overhead(self._sc, signed)
        if signed:
            room -= room % 16        # keep the padding of all but the last fragment at zero
        room = max(room, 16)
        out = bytearray()
        offset = 0
        first = True
        while True:
            chunk = stub[offset:offset + room]
            offset += len(chunk)
            last = offset >= len(stub)
            flags = (P.PFC_FIRST_FRAG if first else 0) | (P.PFC_LAST_FRAG if last else 0)
            prefix = P.response_prefix(len(stub) - offset + len(chunk), call.context_id)
            if signed and self._sc is not None:
                out += protect(self._sc, P.RESPONSE, flags, call.call_id, prefix, chunk)
            else:
                out += P.assemble(P.RESPONSE, flags, call.call_id, prefix + chunk)
            first = False
            if last:
                return bytes(out)
