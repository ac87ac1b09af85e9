"""Sans-IO SMB2 server engine for IPC$ named pipes (MS-SMB2 3.3), dialects 2.0.2 to 3.1.1.

One `Smb2Engine` serves one TCP connection. It takes one SMB2 message (a compound chain, without
the NetBIOS header) and gives back the response message, events, and whether to close. Session,
tree and file ids live only in this object, so ids from another connection do not exist here.

The security rules that matter for the product:
- a failed SESSION_SETUP destroys the half-made session, so its SessionId grants nothing;
- every signed request is verified, and unsigned requests are refused when signing is required;
- the identity handed to a pipe (and so to RPC) is the one the session's SPNEGO exchange proved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from ..auth.factory import AuthFactory
from ..config import LabConfig
from ..events import Event, event, limit, malformed
from ..sansio import Output, ProtocolError
from . import ntstatus as st
from . import smb2_wire as w
from .pipe import Pipe, PipeFactory
from .session_core import Open, Session, SessionCore, SmbError, Tree, netbios_frame
from .smb2_signing import Signer, session_key_16, signing_key
from .smb3_encryption import (CIPHERS, PREAUTH_SEED, EncryptionError, Opener, Sealer, choose_cipher,
                              encryption_keys, preauth_next)

LAYER = "smb"
CREDIT_WINDOW = 512             # at most this many MessageIds granted and not yet used
MAX_TREES_PER_SESSION = 32
SMALL_IO = 65536                # one credit's worth (MS-SMB2 3.3.5.2.5)
MAX_IO_LARGE = 8 * SMALL_IO     # offered with LARGE_MTU for 2.1 and later
MAXIMAL_ACCESS_IPC = 0x001F01FF
SHAREFLAG_NO_CACHING = 0x00000030
FILETIME_EPOCH_OFFSET = 11644473600

DIALECT_NAMES = {
    w.DIALECT_202: "2.0.2", w.DIALECT_210: "2.1", w.DIALECT_300: "3.0",
    w.DIALECT_302: "3.0.2", w.DIALECT_311: "3.1.1", w.DIALECT_WILDCARD: "2.???",
}

# Commands allowed without a valid session (MS-SMB2 3.3.5.2.9).
SESSIONLESS = {w.NEGOTIATE, w.SESSION_SETUP, w.ECHO, w.CANCEL}
# Commands that need a tree connect (MS-SMB2 3.3.5.2.11).
TREE_COMMANDS = {w.TREE_DISCONNECT, w.CREATE, w.CLOSE, w.FLUSH, w.READ, w.WRITE, w.LOCK, w.IOCTL,
                 w.QUERY_DIRECTORY, w.CHANGE_NOTIFY, w.QUERY_INFO, w.SET_INFO}


SIGNING_NAMES = {w.SIGNING_HMAC_SHA256: "HMAC-SHA256", w.SIGNING_AES_CMAC: "AES-128-CMAC",
                 w.SIGNING_AES_GMAC: "AES-128-GMAC"}


def dialect_name(d: int) -> str:
    return DIALECT_NAMES.get(d, f"0x{d:04x}")


@dataclass
class Keys:
    """What SMB2 keeps per session beside the core's state: signing, encryption and the 3.1.1
    preauth hash."""
    signer: Signer | None = field(default=None, repr=False)
    signing_required: bool = False
    preauth: bytes = field(default=b"", repr=False)
    next_tree_id: int = 1
    sealer: Sealer | None = field(default=None, repr=False)
    opener: Opener | None = field(default=None, repr=False)
    encrypt_data: bool = False       # policy `required`: every request must come encrypted
    encrypted_seen: bool = False     # the first encrypted request was logged


@dataclass
class Reply:
    status: int
    body: bytes
    session_id: int | None = None          # overrides the request's SessionId in the response
    tree_id: int | None = None
    signer: Signer | None = field(default=None, repr=False)
    sign: bool = False
    on_sent: Callable[[bytes], None] | None = None


class _Close(Exception):
    """Internal: the connection must be dropped (broken framing, credit abuse, bad negotiate)."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reason, self.fields = reason, fields


@dataclass
class _Chain:
    """What a related compound element inherits from the one before it (MS-SMB2 3.3.5.2.7.2)."""
    session_id: int = 0
    tree_id: int = 0
    file_id: bytes | None = None
    status: int = st.STATUS_SUCCESS


class Smb2Engine:
    """The SMB2 dialect adapter: SMB2 framing, credits, signing and compounds around the
    shared SessionCore (session_core.py)."""

    def __init__(self, *, config: LabConfig, auth: AuthFactory, pipes: PipeFactory,
                 info: dict | None = None, random_bytes: Callable[[int], bytes],
                 now: Callable[[], float]) -> None:
        self._config = config
        self._limits = config.policy.limits
        self._auth = auth
        self._random = random_bytes
        self._now = now
        self._server_guid = random_bytes(16)
        self.dialect: int | None = None
        self._client: w.NegotiateRequest | None = None
        self._security_mode = w.NEGOTIATE_SIGNING_ENABLED | (
            w.NEGOTIATE_SIGNING_REQUIRED if config.policy.smb_signing_required else 0)
        self._capabilities = 0
        self._max_io = SMALL_IO
        self._signing_algorithm: int | None = None
        self._encryption = config.policy.smb_encryption          # off | desired | required
        self._cipher = w.CIPHER_NONE        # negotiated: AES-128-CCM for 3.0.x, the context's for 3.1.1
        self._encrypted_for: int | None = None   # the SessionId of the transform being served
        self._preauth = b""
        self._available: set[int] = {0}
        self._next_grant = 1
        self._keys: dict[int, Keys] = {}
        self.core: SessionCore[bytes] = SessionCore(
            auth=auth, pipes=pipes, policy=config.policy, info=dict(info or {}),
            dialect=lambda: dialect_name(self.dialect or 0), forget=self._forget)
        self.closed = False

    def __repr__(self) -> str:
        return f"Smb2Engine(dialect={dialect_name(self.dialect or 0)}, {self.core!r})"

    def _forget(self, session_id: int) -> None:
        self._keys.pop(session_id, None)

    # ------------------------------------------------------------------ entry points

    def handle(self, message: bytes) -> Output:
        """One SMB2 message (a compound chain, without its NetBIOS header)."""
        out = Output()
        if self.closed:
            out.close = True
            return out
        try:
            sealer: Sealer | None = None
            self._encrypted_for = None
            if message[:4] == w.TRANSFORM_PROTOCOL_ID:
                message, sealer = self._open_transform(message, out.events)
            elements = w.split_compound(message)
            replies: list[tuple[w.Header, Reply]] = []
            chain = _Chain()
            for i, element in enumerate(elements):
                header = w.parse_header(element)
                if (sealer is not None and not header.flags & w.FLAGS_RELATED_OPERATIONS
                        and header.session_id != self._encrypted_for):
                    # A message sealed with one session's key speaks for that session only.
                    raise _Close("transform_other_session")
                reply = self._element(i, element, header, chain, out.events)
                if reply is not None:
                    replies.append((header, reply))
            if replies:
                data = self._serialise(replies, sign=sealer is None)
                # MS-SMB2 3.3.4.1.4: the answer to an encrypted request is encrypted.
                out.data = netbios_frame(sealer.seal(data) if sealer is not None else data)
            return out
        except ProtocolError as exc:
            out.events.append(malformed(LAYER, exc.reason))
        except _Close as exc:
            out.events.append(malformed(LAYER, exc.reason, **exc.fields))
        except EncryptionError as exc:
            out.events.append(malformed(LAYER, exc.reason))
        except Exception as exc:  # never let a bug in one connection take the server down
            out.events.append(malformed(LAYER, "internal_error", error=type(exc).__name__))
        out.events.extend(self.close())
        out.data, out.close = b"", True
        return out

    def negotiate_from_smb1(self, dialects: list[str]) -> Output:
        """Answer an SMB1 NEGOTIATE that offers SMB2 (multi-protocol negotiate, MS-SMB2
        3.3.5.3.1) with an SMB2 NEGOTIATE response. "SMB 2.???" leaves the dialect open (0x02FF)
        and the client follows with a real SMB2 NEGOTIATE; "SMB 2.002" alone settles 2.0.2."""
        wildcard = "SMB 2.???" in dialects
        chosen = w.DIALECT_WILDCARD if wildcard else w.DIALECT_202
        self._available.discard(0)
        if chosen == w.DIALECT_202:
            self.dialect = w.DIALECT_202
            self._client = w.NegotiateRequest(0, 0, b"\x00" * 16, [w.DIALECT_202], [])
        else:
            self.dialect = w.DIALECT_WILDCARD
        body = self._negotiate_body(chosen, [])
        header = w.Header(command=w.NEGOTIATE, message_id=0, credits=1)
        reply = Reply(st.STATUS_SUCCESS, body)
        self._grant(header, 1)
        data = self._serialise([(header, reply)], granted_already=True)
        ev = event(LAYER, "smb.negotiate", dialect=dialect_name(chosen), via="smb1",
                   signing_required=bool(self._security_mode & w.NEGOTIATE_SIGNING_REQUIRED),
                   client_dialects=list(dialects))
        return Output(netbios_frame(data), [ev])

    def _open_transform(self, message: bytes, events: list[Event]) -> tuple[bytes, Sealer]:
        """MS-SMB2 3.3.5.2.1.1: the session the transform names must be ours and encrypting; the
        message must authenticate under its key with a nonce not seen before. Anything else
        drops the connection."""
        header = w.parse_transform_header(message)
        session = self.core.sessions.get(header.session_id)
        keys = self._keys.get(header.session_id)
        if session is None or not session.established or keys is None:
            raise EncryptionError("transform_unknown_session")
        if keys.opener is None or keys.sealer is None:
            raise EncryptionError("transform_not_negotiated")
        plain = keys.opener.open(header, message)
        self._encrypted_for = header.session_id
        if not keys.encrypted_seen:
            keys.encrypted_seen = True
            events.append(event(LAYER, "smb.encryption", result="on", cipher=keys.opener.cipher.name,
                                user=session.label, dialect=dialect_name(self.dialect or 0)))
        return plain, keys.sealer

    def close(self) -> list[Event]:
        events = self.core.close_all()
        self._keys.clear()
        self.closed = True
        return events

    # ------------------------------------------------------------------ per element

    def _element(self, index: int, msg: bytes, h: w.Header, chain: _Chain,
                 events: list[Event]) -> Reply | None:
        if h.flags & w.FLAGS_SERVER_TO_REDIR:
            raise _Close("response_sent_to_server")
        if h.command != w.CANCEL:
            self._consume_credits(h, len(msg))
        if self.dialect is None or self.dialect == w.DIALECT_WILDCARD:
            if h.command != w.NEGOTIATE:
                raise _Close("request_before_negotiate", command=h.command)
        elif h.command == w.NEGOTIATE:
            raise _Close("second_negotiate")
        if h.command == w.CANCEL:
            return None             # nothing is ever pending here, and CANCEL has no response

        related = bool(h.flags & w.FLAGS_RELATED_OPERATIONS)
        if related:
            if index == 0:
                return Reply(st.STATUS_INVALID_PARAMETER, w.build_error_response())
            if chain.status != st.STATUS_SUCCESS and chain.file_id is None:
                return Reply(chain.status, w.build_error_response())
            h.session_id, h.tree_id = chain.session_id, chain.tree_id

        try:
            reply = self._dispatch(msg, h, chain, related, events)
        except ProtocolError as exc:
            events.append(malformed(LAYER, exc.reason, command=w.COMMAND_NAMES.get(h.command, h.command)))
            reply = Reply(st.STATUS_INVALID_PARAMETER, w.build_error_response())
        chain.session_id = reply.session_id if reply.session_id is not None else h.session_id
        chain.tree_id = reply.tree_id if reply.tree_id is not None else h.tree_id
        chain.status = reply.status
        return reply

    def _consume_credits(self, h: w.Header, size: int) -> None:
        """MS-SMB2 3.3.5.2.3 and 3.3.5.2.5: every MessageId must have been granted and is
        usable once; a multi-credit request uses CreditCharge consecutive ids."""
        charge = max(1, h.credit_charge) if self.dialect not in (None, w.DIALECT_202, w.DIALECT_WILDCARD) else 1
        ids = range(h.message_id, h.message_id + charge)
        if charge > CREDIT_WINDOW or any(i not in self._available for i in ids):
            raise _Close("credit_abuse", message_id=h.message_id, credit_charge=h.credit_charge)
        for i in ids:
            self._available.discard(i)

    def _grant(self, h: w.Header, requested: int) -> int:
        room = CREDIT_WINDOW - len(self._available)
        grant = max(0, min(max(requested, 1), room))
        if not self._available and grant == 0:
            grant = 1
        for _ in range(grant):
            self._available.add(self._next_grant)
            self._next_grant += 1
        return grant

    def _serialise(self, replies: list[tuple[w.Header, Reply]], granted_already: bool = False,
                   sign: bool = True) -> bytes:
        """Build the (possibly compound) response: each element 8-byte aligned with NextCommand
        set, then signed on its own (MS-SMB2 3.3.4.1.3) unless it is to be encrypted, which
        protects it instead (MS-SMB2 3.3.4.1.1)."""
        out = []
        for i, (req, reply) in enumerate(replies):
            credits = req.credits if granted_already else self._grant(req, req.credits)
            flags = w.FLAGS_SERVER_TO_REDIR | (req.flags & w.FLAGS_RELATED_OPERATIONS)
            hdr = w.Header(command=req.command, message_id=req.message_id, status=reply.status,
                           credit_charge=req.credit_charge, credits=credits, flags=flags,
                           tree_id=reply.tree_id if reply.tree_id is not None else req.tree_id,
                           session_id=reply.session_id if reply.session_id is not None else req.session_id)
            body = reply.body
            last = i + 1 == len(replies)
            raw_len = w.HEADER_SIZE + len(body)
            if not last:
                body += b"\x00" * (-raw_len % 8)
                hdr.next_command = w.HEADER_SIZE + len(body)
            data = hdr.pack() + body
            if sign and reply.sign and reply.signer is not None:
                data = reply.signer.sign(data)
            if reply.on_sent is not None:
                reply.on_sent(data)
            out.append(data)
        return b"".join(out)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, msg: bytes, h: w.Header, chain: _Chain, related: bool,
                  events: list[Event]) -> Reply:
        if h.command == w.NEGOTIATE:
            return self._negotiate(msg, h, events)
        if h.command == w.SESSION_SETUP:
            return self._session_setup(msg, h, events)
        if h.command == w.ECHO:
            w.parse_simple(msg)
            return self._signed_like_request(h, Reply(st.STATUS_SUCCESS, w.build_simple_response()))

        command = w.COMMAND_NAMES.get(h.command, h.command)
        try:
            return self._in_session(msg, h, command, chain, related, events)
        except SmbError as exc:
            events.extend(exc.events)
            session = self.core.sessions.get(h.session_id)
            reply = Reply(exc.status, w.build_error_response())
            return self._finish(h, session, reply) if session is not None and session.established else reply

    def _in_session(self, msg: bytes, h: w.Header, command: Any, chain: _Chain, related: bool,
                    events: list[Event]) -> Reply:
        session = self.core.usable(h.session_id, command)
        keys = self._keys.get(session.session_id)
        if keys is not None and keys.encrypt_data and self._encrypted_for != session.session_id:
            # MS-SMB2 3.3.5.2.9: Session.EncryptData and an unencrypted request.
            raise self.core.refused(command, "unencrypted", st.STATUS_ACCESS_DENIED, user=session.label)
        denied = self._check_signature(msg, h, session, events)
        if denied is not None:
            return denied
        if h.command == w.LOGOFF:
            return self._logoff(msg, h, session, events)
        if h.command == w.TREE_CONNECT:
            return self._finish(h, session, self._tree_connect(msg, session, events))
        if h.command not in TREE_COMMANDS:
            return self._finish(h, session, Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response()))
        tree = self.core.tree(session, h.tree_id, command)
        handler = {
            w.TREE_DISCONNECT: self._tree_disconnect, w.CREATE: self._create, w.CLOSE: self._close,
            w.FLUSH: self._flush, w.READ: self._read, w.WRITE: self._write, w.IOCTL: self._ioctl,
            w.QUERY_INFO: self._query_info,
        }.get(h.command)
        if handler is None:
            reply = Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response())
        else:
            reply = handler(msg, h, session, tree, chain, related, events)
            if reply.status == st.STATUS_FILE_CLOSED:
                # Only a FileId this session and tree never opened (or closed) gets this status.
                events.append(event(LAYER, "smb.refused", command=command, reason="unknown_file",
                                    status=st.status_name(st.STATUS_FILE_CLOSED), user=session.label))
        return self._finish(h, session, reply)

    def _finish(self, h: w.Header, session: Session, reply: Reply) -> Reply:
        """Responses are signed when the request was signed or the session requires signing
        (MS-SMB2 3.3.4.1.1)."""
        keys = self._keys.get(session.session_id)
        if keys is not None and keys.signer is not None and (keys.signing_required or h.flags & w.FLAGS_SIGNED):
            reply.signer, reply.sign = keys.signer, True
        return reply

    def _signed_like_request(self, h: w.Header, reply: Reply) -> Reply:
        session = self.core.sessions.get(h.session_id)
        if session is not None and session.established:
            return self._finish(h, session, reply)
        return reply

    def _check_signature(self, msg: bytes, h: w.Header, session: Session,
                         events: list[Event]) -> Reply | None:
        keys = self._keys.get(session.session_id)
        if keys is None or keys.signer is None:
            return None             # anonymous and guest sessions have no key to sign with
        if self._encrypted_for == session.session_id:
            return None             # the transform's AEAD tag authenticated it (MS-SMB2 3.3.5.2.4)
        command = w.COMMAND_NAMES.get(h.command, h.command)
        if h.flags & w.FLAGS_SIGNED:
            if keys.signer.verify(msg):
                return None
            events.append(malformed(LAYER, "bad_signature", command=command, user=session.label))
            return Reply(st.STATUS_ACCESS_DENIED, w.build_error_response())
        if keys.signing_required:
            events.append(malformed(LAYER, "unsigned_request", command=command, user=session.label))
            return Reply(st.STATUS_ACCESS_DENIED, w.build_error_response())
        return None

    # ------------------------------------------------------------------ NEGOTIATE

    def _negotiate_body(self, dialect: int, contexts: list[bytes]) -> bytes:
        system_time = int((self._now() + FILETIME_EPOCH_OFFSET) * 10_000_000)
        return w.build_negotiate_response(
            security_mode=self._security_mode, dialect=dialect, server_guid=self._server_guid,
            capabilities=self._capabilities, max_size=self._max_io, system_time=system_time,
            security_blob=self._auth.spnego_init_token(), contexts=contexts)

    def _negotiate(self, msg: bytes, h: w.Header, events: list[Event]) -> Reply:
        req = w.parse_negotiate(msg)
        common = [d for d in w.SUPPORTED_DIALECTS if d in req.dialects]
        client_names = [dialect_name(d) for d in req.dialects]
        if not common:
            events.append(event(LAYER, "smb.negotiate", dialect=None, result="no_common_dialect",
                                client_dialects=client_names))
            return Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response())
        dialect = max(common)
        contexts: list[bytes] = []
        if dialect == w.DIALECT_311:
            contexts = self._negotiate_contexts(req)
        self.dialect = dialect
        self._client = req
        if dialect in (w.DIALECT_300, w.DIALECT_302) and self._encryption != "off":
            # 3.0 and 3.0.2 announce encryption as a capability and use AES-128-CCM (MS-SMB2
            # 3.3.5.4); 3.1.1 negotiates the cipher in a context instead.
            self._capabilities |= w.GLOBAL_CAP_ENCRYPTION
            self._cipher = w.CIPHER_AES128_CCM
        if dialect >= w.DIALECT_210 and self._limits.max_pdu_size >= MAX_IO_LARGE + 4096:
            self._capabilities |= w.GLOBAL_CAP_LARGE_MTU
            self._max_io = MAX_IO_LARGE
        reply = Reply(st.STATUS_SUCCESS, self._negotiate_body(dialect, contexts))
        if dialect == w.DIALECT_311:
            # MS-SMB2 3.3.5.4: the connection's preauth hash covers this request and response.
            self._preauth = preauth_next(PREAUTH_SEED, msg)

            def after(data: bytes) -> None:
                self._preauth = preauth_next(self._preauth, data)
            reply.on_sent = after
        events.append(event(
            LAYER, "smb.negotiate", dialect=dialect_name(dialect), result="ok",
            signing_required=bool(self._security_mode & w.NEGOTIATE_SIGNING_REQUIRED),
            client_signing_required=bool(req.security_mode & w.NEGOTIATE_SIGNING_REQUIRED),
            cipher=w.CIPHER_NAMES.get(self._cipher),
            signing_algorithm=SIGNING_NAMES.get(self._signing_algorithm) if self._signing_algorithm is not None else None,
            client_dialects=client_names))
        return reply

    def _negotiate_contexts(self, req: w.NegotiateRequest) -> list[bytes]:
        by_type: dict[int, bytes] = {}
        for c in req.contexts:
            if c.type in by_type and c.type in (w.PREAUTH_INTEGRITY_CAPABILITIES,
                                                w.ENCRYPTION_CAPABILITIES, w.SIGNING_CAPABILITIES):
                raise ProtocolError(LAYER, "duplicate negotiate context")
            by_type.setdefault(c.type, c.data)
        if w.PREAUTH_INTEGRITY_CAPABILITIES not in by_type:
            raise ProtocolError(LAYER, "3.1.1 negotiate without PREAUTH_INTEGRITY_CAPABILITIES")
        if w.HASH_SHA512 not in w.parse_preauth_context(by_type[w.PREAUTH_INTEGRITY_CAPABILITIES]):
            raise ProtocolError(LAYER, "3.1.1 negotiate without SHA-512")
        salt = self._random(32)
        out = [w.build_negotiate_context(w.PREAUTH_INTEGRITY_CAPABILITIES,
                                         struct.pack("<HHH", 1, len(salt), w.HASH_SHA512) + salt)]
        if w.ENCRYPTION_CAPABILITIES in by_type:
            offered = w.parse_id_list_context(by_type[w.ENCRYPTION_CAPABILITIES], "ENCRYPTION_CAPABILITIES")
            # MS-SMB2 3.3.5.4: one cipher, the first of the client's list the server supports;
            # 0 when there is none (or the policy turns encryption off).
            if self._encryption != "off":
                self._cipher = choose_cipher(offered)
            out.append(w.build_negotiate_context(w.ENCRYPTION_CAPABILITIES, struct.pack("<HH", 1, self._cipher)))
        if w.SIGNING_CAPABILITIES in by_type:
            offered = w.parse_id_list_context(by_type[w.SIGNING_CAPABILITIES], "SIGNING_CAPABILITIES")
            # The first of the client's algorithms the server supports (its order of preference).
            chosen = next((a for a in offered if a in (w.SIGNING_AES_GMAC, w.SIGNING_AES_CMAC,
                                                       w.SIGNING_HMAC_SHA256)), None)
            if chosen is None:
                raise ProtocolError(LAYER, "no supported signing algorithm")
            self._signing_algorithm = chosen
            out.append(w.build_negotiate_context(w.SIGNING_CAPABILITIES, struct.pack("<HH", 1, chosen)))
        return out

    # ------------------------------------------------------------------ SESSION_SETUP

    def _session_setup(self, msg: bytes, h: w.Header, events: list[Event]) -> Reply:
        req = w.parse_session_setup(msg)
        if req.flags & w.SESSION_SETUP_FLAG_BINDING:
            return Reply(st.STATUS_REQUEST_NOT_ACCEPTED, w.build_error_response())  # no multichannel
        try:
            return self._authenticate(msg, h, req, events)
        except SmbError as exc:
            events.extend(exc.events)
            return Reply(exc.status, w.build_error_response(), session_id=h.session_id or None)

    def _encryption_refusal(self) -> str | None:
        """MS-SMB2 3.3.5.5 steps 1 and 2: with encryption required, a 2.x dialect, or a 3.x
        client that cannot encrypt, gets no session."""
        if self.dialect is None or self.dialect < w.DIALECT_300:
            return "dialect_without_encryption"
        if self.dialect == w.DIALECT_311:
            return "no_common_cipher" if self._cipher == w.CIPHER_NONE else None
        client_caps = self._client.capabilities if self._client is not None else 0
        return None if client_caps & w.GLOBAL_CAP_ENCRYPTION else "client_without_encryption"

    def _authenticate(self, msg: bytes, h: w.Header, req: w.SessionSetupRequest,
                      events: list[Event]) -> Reply:
        if self._encryption == "required" and h.session_id == 0:
            reason = self._encryption_refusal()
            if reason is not None:
                raise self.core.refused("session_setup", reason, st.STATUS_ACCESS_DENIED,
                                        dialect=dialect_name(self.dialect or 0))
        if h.session_id == 0:
            try:
                session = self.core.new_session(self._new_session_id())
            except SmbError as exc:
                raise SmbError(st.STATUS_REQUEST_NOT_ACCEPTED, *exc.events) from None
            self._keys[session.session_id] = Keys(preauth=self._preauth)
        else:
            found = self.core.sessions.get(h.session_id)
            if found is None:
                raise SmbError(st.STATUS_USER_SESSION_DELETED)
            session = found
            if session.established:
                # Re-authentication (MS-SMB2 3.3.5.5.2): a signed request is checked with the
                # session's key; the exchange runs while the session keeps serving.
                denied = self._check_signature(msg, h, session, events)
                if denied is not None:
                    return denied
        keys = self._keys[session.session_id]
        if req.security_mode & w.NEGOTIATE_SIGNING_REQUIRED or self._config.policy.smb_signing_required:
            keys.signing_required = True
        if self.dialect == w.DIALECT_311 and not session.established:
            keys.preauth = preauth_next(keys.preauth, msg)

        sid = session.session_id
        try:
            step, logon = self.core.authenticate(session, req.token)
        except SmbError as exc:
            # A failed logon grants nothing: the session is gone (the answer still names it).
            events.extend(exc.events)
            return Reply(exc.status, w.build_error_response(), session_id=sid)
        events.extend(step.events)
        if logon is None:
            reply = Reply(st.STATUS_MORE_PROCESSING_REQUIRED,
                          w.build_session_setup_response(0, step.token), session_id=sid)
            if session.established:
                # A re-authentication runs on a session that signs: answered like any request.
                return self._finish(h, session, reply)
            if self.dialect == w.DIALECT_311:
                def after(data: bytes, k: Keys = keys) -> None:
                    k.preauth = preauth_next(k.preauth, data)
                reply.on_sent = after
            return reply

        flags = {"anonymous": w.SESSION_FLAG_IS_NULL, "guest": w.SESSION_FLAG_IS_GUEST}.get(logon.kind, 0)
        if not logon.reauth:
            self._derive_encryption(session, keys)
            if self._encryption == "required":
                if keys.sealer is None:
                    # Anonymous and guest have no key to encrypt with: no session (as Samba).
                    events.extend(self.core.drop_session(sid, "encryption_required"))
                    events.append(event(LAYER, "smb.refused", command="session_setup",
                                        reason="encryption_required", session_flags=logon.kind,
                                        status=st.status_name(st.STATUS_ACCESS_DENIED)))
                    return Reply(st.STATUS_ACCESS_DENIED, w.build_error_response(), session_id=sid)
                keys.encrypt_data = True
                flags |= w.SESSION_FLAG_ENCRYPT_DATA
        reply = Reply(st.STATUS_SUCCESS, w.build_session_setup_response(flags, step.token), session_id=sid)
        if logon.reauth:
            # The session keeps its keys and its signing (MS-SMB2 3.3.5.5.2).
            events.append(self.core.setup_event(
                session, signing=keys.signing_required and keys.signer is not None))
            return self._finish(h, session, reply)
        if logon.kind != "user":
            # No key to sign with: Windows and Samba serve such sessions unsigned
            # (docs/security.md, "Signing, anonymous and guest").
            keys.signing_required = False
        elif keys.signer is None and logon.session_key:
            key = session_key_16(logon.session_key)
            keys.signer = Signer(self.dialect, signing_key(self.dialect, key, keys.preauth),
                                 self._signing_algorithm if self.dialect == w.DIALECT_311 else None)
        if keys.signer is not None and (self.dialect >= w.DIALECT_300 or keys.signing_required):
            # MS-SMB2 3.3.5.5.3: 3.x always signs the final response; 2.x when signing is required.
            reply.signer, reply.sign = keys.signer, True
        extra = {"cipher": keys.sealer.cipher.name, "encrypt_data": keys.encrypt_data} if keys.sealer else {}
        events.append(self.core.setup_event(
            session, signing=keys.signing_required and keys.signer is not None, **extra))
        return reply

    def _derive_encryption(self, session: Session, keys: Keys) -> None:
        """MS-SMB2 3.3.5.5.3: a user session on a connection that negotiated a cipher gets its
        encryption and decryption keys (from the same preauth hash as its signing key)."""
        logon = session.logon
        if logon is None or logon.kind != "user" or not logon.session_key or self._cipher == w.CIPHER_NONE:
            return
        cipher = CIPHERS[self._cipher]
        out_key, in_key = encryption_keys(self.dialect or 0, cipher, logon.session_key, keys.preauth)
        keys.sealer = Sealer(cipher, out_key, session.session_id)
        keys.opener = Opener(cipher, in_key)

    def _new_session_id(self) -> int:
        while True:
            sid = int.from_bytes(self._random(8), "little")
            if sid not in (0, 0xFFFFFFFFFFFFFFFF) and sid not in self.core.sessions:
                return sid

    def _logoff(self, msg: bytes, h: w.Header, session: Session, events: list[Event]) -> Reply:
        w.parse_simple(msg)
        reply = self._finish(h, session, Reply(st.STATUS_SUCCESS, w.build_simple_response()))
        events.extend(self.core.drop_session(session.session_id, "logoff"))
        events.append(event(LAYER, "smb.logoff", user=session.identity.user,
                            domain=session.identity.domain))
        return reply

    # ------------------------------------------------------------------ trees

    def _tree_connect(self, msg: bytes, session: Session, events: list[Event]) -> Reply:
        path = w.parse_tree_connect(msg).rstrip("\x00")
        parts = path.split("\\")
        # \\server\share: ['', '', server, share]
        share = parts[3] if len(parts) == 4 and parts[0] == "" and parts[1] == "" and parts[2] else None
        if share is None or share.upper() != "IPC$":
            events.append(event(LAYER, "smb.tree_connect", share=share if share is not None else path,
                                result="bad_network_name", user=session.identity.user))
            return Reply(st.STATUS_BAD_NETWORK_NAME, w.build_error_response())
        if self.core.tree_count(session.session_id) >= MAX_TREES_PER_SESSION:
            events.append(limit(LAYER, "max_trees_per_session", value=MAX_TREES_PER_SESSION))
            return Reply(st.STATUS_INSUFFICIENT_RESOURCES, w.build_error_response())
        tid = self._next_tree_id(session)
        self.core.add_tree(tid, session, "IPC$")
        events.append(event(LAYER, "smb.tree_connect", share="IPC$", result="ok",
                            user=session.identity.user, domain=session.identity.domain))
        return Reply(st.STATUS_SUCCESS, w.build_tree_connect_response(
            w.SHARE_TYPE_PIPE, SHAREFLAG_NO_CACHING, 0, MAXIMAL_ACCESS_IPC), tree_id=tid)

    def _next_tree_id(self, session: Session) -> int:
        """TreeIds count from 1 in each session and are never reused within it."""
        keys = self._keys[session.session_id]
        tid, keys.next_tree_id = keys.next_tree_id, keys.next_tree_id + 1
        return tid

    def _tree_disconnect(self, msg, h, session, tree, chain, related, events) -> Reply:
        w.parse_simple(msg)
        events.extend(self.core.disconnect_tree(tree))
        return Reply(st.STATUS_SUCCESS, w.build_simple_response())

    # ------------------------------------------------------------------ files (pipes)

    def _lookup(self, file_id: bytes, session: Session, tree: Tree, chain: _Chain,
                related: bool) -> Open[bytes] | None:
        if related and file_id == w.FILE_ID_ANY and chain.file_id is not None:
            file_id = chain.file_id
        op = self.core.find_open(file_id, session, tree)
        if op is not None:
            chain.file_id = op.handle
        return op

    def _create(self, msg, h, session, tree, chain, related, events) -> Reply:
        req = w.parse_create(msg)
        while True:
            file_id = self._random(16)
            if file_id != w.FILE_ID_ANY and file_id not in self.core.opens:
                break
        # SMB2 names are relative to the share (MS-SMB2 2.2.13: "MUST NOT begin with a
        # separator"): a leading backslash names no pipe, as Windows and Samba answer.
        if req.name.startswith("\\"):
            events.append(event(LAYER, "smb.pipe_open", pipe=req.name, result="not_found",
                                reason="leading_separator", smb_user=session.label))
            return Reply(st.STATUS_OBJECT_NAME_NOT_FOUND, w.build_error_response())
        try:
            _op, pipe_events = self.core.open_pipe(session, tree, req.name, file_id)
        except SmbError as exc:
            events.extend(exc.events)
            return Reply(exc.status, w.build_error_response())
        events.extend(pipe_events)
        chain.file_id = file_id
        return Reply(st.STATUS_SUCCESS, w.build_create_response(file_id, allocation=4096))

    def _close(self, msg, h, session, tree, chain, related, events) -> Reply:
        op = self._lookup(w.parse_close(msg), session, tree, chain, related)
        if op is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        events.extend(self.core.close_open(op.handle, "close"))
        return Reply(st.STATUS_SUCCESS, w.build_close_response())

    def _flush(self, msg, h, session, tree, chain, related, events) -> Reply:
        b = w.Body(msg, 24, w.CLOSE_REQ)           # FLUSH has CLOSE's shape: 24 bytes, FileId last
        if self._lookup(b.values[3], session, tree, chain, related) is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        return Reply(st.STATUS_SUCCESS, w.build_simple_response())

    def _charge_ok(self, h: w.Header, size: int) -> bool:
        """MS-SMB2 3.3.5.2.5: a payload above 64 KiB must be paid for with CreditCharge."""
        if size > self._max_io:
            return False
        if self.dialect == w.DIALECT_202:
            return True
        return max(1, h.credit_charge) >= 1 + (max(size, 1) - 1) // SMALL_IO

    def _read(self, msg, h, session, tree, chain, related, events) -> Reply:
        req = w.parse_read(msg)
        if not self._charge_ok(h, req.length):
            return Reply(st.STATUS_INVALID_PARAMETER, w.build_error_response())
        op = self._lookup(req.file_id, session, tree, chain, related)
        if op is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        data, more = op.pipe.read(req.length)
        if not data:
            # Nothing is pending: the RPC engine answers synchronously, so there is nothing to
            # wait for. A closed pipe says so; an open one is simply empty.
            status = st.STATUS_PIPE_BROKEN if op.pipe.closed else st.STATUS_PIPE_EMPTY
            return Reply(status, w.build_error_response())
        return Reply(st.STATUS_BUFFER_OVERFLOW if more else st.STATUS_SUCCESS, w.build_read_response(data))

    def _write(self, msg, h, session, tree, chain, related, events) -> Reply:
        req = w.parse_write(msg)
        if not self._charge_ok(h, len(req.data)):
            return Reply(st.STATUS_INVALID_PARAMETER, w.build_error_response())
        op = self._lookup(req.file_id, session, tree, chain, related)
        if op is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        if op.pipe.closed:
            return Reply(st.STATUS_PIPE_BROKEN, w.build_error_response())
        events.extend(op.pipe.write(req.data))
        return Reply(st.STATUS_SUCCESS, w.build_write_response(len(req.data)))

    def _ioctl(self, msg, h, session, tree, chain, related, events) -> Reply:
        req = w.parse_ioctl(msg)
        if not req.flags & w.IOCTL_IS_FSCTL:
            return Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response())
        if req.ctl_code == w.FSCTL_VALIDATE_NEGOTIATE_INFO:
            return self._validate_negotiate(req, session)
        if req.ctl_code != w.FSCTL_PIPE_TRANSCEIVE:
            return Reply(st.STATUS_INVALID_DEVICE_REQUEST, w.build_error_response())
        if not self._charge_ok(h, max(len(req.input), min(req.max_output, self._max_io))):
            return Reply(st.STATUS_INVALID_PARAMETER, w.build_error_response())
        op = self._lookup(req.file_id, session, tree, chain, related)
        if op is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        if op.pipe.closed:
            return Reply(st.STATUS_PIPE_BROKEN, w.build_error_response())
        data, more, pipe_events = op.pipe.transceive(req.input, min(req.max_output, self._max_io))
        events.extend(pipe_events)
        status = st.STATUS_BUFFER_OVERFLOW if more else st.STATUS_SUCCESS
        return Reply(status, w.build_ioctl_response(req.ctl_code, op.handle, data))

    def _validate_negotiate(self, req: w.IoctlRequest, session: Session) -> Reply:
        """MS-SMB2 3.3.5.15.12: the client repeats what it sent in NEGOTIATE inside a signed
        request; any difference means someone tampered with the negotiate, so we hang up."""
        if self.dialect == w.DIALECT_311:
            raise _Close("validate_negotiate_on_311")
        info = w.parse_validate_negotiate(req.input)
        c = self._client
        if (c is None or info.capabilities != c.capabilities or info.guid != c.client_guid
                or info.security_mode != c.security_mode or info.dialects != c.dialects):
            raise _Close("validate_negotiate_mismatch")
        out = w.build_validate_negotiate_response(self._capabilities, self._server_guid,
                                                  self._security_mode, self.dialect or 0)
        reply = Reply(st.STATUS_SUCCESS, w.build_ioctl_response(req.ctl_code, req.file_id, out))
        keys = self._keys.get(session.session_id)
        if keys is not None and keys.signer is not None:
            reply.signer, reply.sign = keys.signer, True
        return reply

    def _query_info(self, msg, h, session, tree, chain, related, events) -> Reply:
        req = w.parse_query_info(msg)
        op = self._lookup(req.file_id, session, tree, chain, related)
        if op is None:
            return Reply(st.STATUS_FILE_CLOSED, w.build_error_response())
        if req.info_type != 1:                  # SMB2_0_INFO_FILE only
            return Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response())
        data = _pipe_file_info(req.info_class, op.pipe)
        if data is None:
            return Reply(st.STATUS_NOT_SUPPORTED, w.build_error_response())
        if req.output_length < len(data):
            return Reply(st.STATUS_INFO_LENGTH_MISMATCH, w.build_error_response())
        return Reply(st.STATUS_SUCCESS, w.build_query_info_response(data))


def _pipe_file_info(info_class: int, pipe: Pipe) -> bytes | None:
    """The FILE_INFORMATION classes (MS-FSCC 2.4) clients ask of a named pipe."""
    if info_class == 4:          # FileBasicInformation
        return struct.pack("<QQQQII", 0, 0, 0, 0, w.FILE_ATTRIBUTE_NORMAL, 0)
    if info_class == 5:          # FileStandardInformation: pipes report DeletePending like Windows
        return struct.pack("<QQIBBH", 4096, 0, 1, 1, 0, 0)
    if info_class == 14:         # FilePositionInformation
        return struct.pack("<Q", 0)
    if info_class == 23:         # FilePipeInformation: message read mode, queued completion
        return struct.pack("<II", 1, 0)
    if info_class == 24:         # FilePipeLocalInformation
        return struct.pack("<IIIIIIIIII", 1, 2, 0xFFFFFFFF, 1, 4096, pipe.pending(), 4096, 4096, 3, 1)
    return None
