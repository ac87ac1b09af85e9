"""Sans-IO SMB1 server engine (NT LM 0.12 with extended security) for IPC$ named pipes.

One `Smb1Engine` per TCP connection: the SMB1 dialect adapter around the shared SessionCore
(session_core.py), which owns sessions (Uids), trees (Tids) and opens (Fids) and decides who a
session is. The transport strips the NetBIOS header and hands each SMB1 message to `handle`,
which returns an `Output`. Ids exist only inside this engine, so ids guessed from another
connection mean nothing here.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..auth.factory import AuthFactory
from ..config import LabConfig
from ..events import Event, event, malformed
from ..sansio import Output, ProtocolError
from .pipe import PipeFactory
from . import smb1_wire as w
from .session_core import Session, SessionCore, SmbError, Tree, Open, netbios_frame
from .smb1_wire import Block, Header, Reply

# Server limits advertised in NEGOTIATE (MS-CIFS 2.2.4.52.2).
MAX_BUFFER_SIZE = 16644
MAX_MPX_COUNT = 50
MAX_RAW_SIZE = 65536
MAX_ECHO_REPLIES = 4
NMPIPE_STATUS = 0x05FF           # message-mode read and type, endpoint, ICount 255 (MS-CIFS 2.2.4.64.2)
FILE_TYPE_MESSAGE_MODE_PIPE = 2
FILE_OPENED = 1
FILE_ATTRIBUTE_NORMAL = 0x80

# TRANSACTION subcommands on \PIPE\ (MS-CIFS 2.2.5).
TRANS_SET_NMPIPE_STATE = 0x0001
TRANS_QUERY_NMPIPE_STATE = 0x0021
TRANS_PEEK_NMPIPE = 0x0023
TRANS_TRANSACT_NMPIPE = 0x0026

# WRITE_ANDX WriteMode bits (MS-CIFS 2.2.4.43.1).
WRITE_RAW_MODE = 0x0004
WRITE_MSG_START = 0x0008

TREE_CONNECT_EXTENDED_RESPONSE = 0x0008   # MS-SMB 2.2.4.7.1
SMB_SUPPORT_SEARCH_BITS = 0x0001

# Names for events: "TREE_CONNECT_ANDX" reads better in a log than a code.
_COMMAND_NAMES = {v: k[4:] for k, v in vars(w).items() if k.startswith("COM_") and k != "COM_NO_ANDX"}


@dataclass
class _Ctx:
    """Per-message state threaded through an AndX chain: a session setup's Uid and a tree
    connect's Tid apply to the commands chained after them (MS-CIFS 3.3.5.1)."""

    message: bytes
    header: Header
    uid: int
    tid: int
    events: list[Event] = field(default_factory=list)
    signing_started: bool = False
    command: int = 0     # of the block being served, for refusal events


class _Ids:
    """16-bit handle allocator starting at a random base (so ids do not repeat across
    connections in a predictable way); never 0 or 0xFFFF, never one in use."""

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._next = int.from_bytes(random_bytes(2), "little") or 1

    def take(self, in_use: dict) -> int:
        for _ in range(0x10000):
            candidate = self._next
            self._next = (self._next + 1) & 0xFFFF
            if candidate not in (0, 0xFFFF) and candidate not in in_use:
                return candidate
        raise SmbError(w.STATUS_INSUFFICIENT_RESOURCES)


class Smb1Engine:
    def __init__(self, *, config: LabConfig, auth: AuthFactory, pipes: PipeFactory, info: dict | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom, now: Callable[[], float] = time.time) -> None:
        self._config = config
        self._auth = auth
        self._random = random_bytes
        self._now = now
        self._limits = config.policy.limits
        self._signing_required = bool(config.policy.smb_signing_required)
        self._negotiated = False
        self._extended_security = True
        self.core: SessionCore[int] = SessionCore(
            auth=auth, pipes=pipes, policy=config.policy, info=dict(info or {}), dialect=lambda: w.DIALECT,
            in_progress_status=w.STATUS_ACCESS_DENIED, bad_tree_status=w.STATUS_SMB_BAD_TID)
        self._uids = _Ids(random_bytes)
        self._tids = _Ids(random_bytes)
        self._fids = _Ids(random_bytes)
        # Connection-wide signing state (MS-CIFS 3.3.1.1: one key and one sequence per connection).
        self._signing_key: bytes | None = None
        self._sequence = 0

    def __repr__(self) -> str:
        return f"Smb1Engine({self.core!r}, signing={self._signing_key is not None})"

    # ------------------------------------------------------------------ entry points

    def handle(self, message: bytes) -> Output:
        """One SMB1 message (without its NetBIOS header); the answer comes NetBIOS-framed."""
        try:
            header = w.parse_header(message)
        except ProtocolError as e:
            # Nothing in a broken header can be trusted, not even the Mid to answer with.
            return Output(b"", [malformed(w.LAYER, e.reason, dialect=w.DIALECT)], True)
        events: list[Event] = []
        return Output(b"".join(netbios_frame(m) for m in self._messages(header, message, events)), events)

    def _messages(self, header: Header, message: bytes, events: list[Event]) -> list[bytes]:
        request_seq = self._sequence
        if self._signing_key is not None:
            if header.command == w.COM_NT_CANCEL:
                # NT_CANCEL has no response and consumes a single sequence number (MS-CIFS 3.3.5.49).
                self._sequence += 1
            else:
                self._sequence += 2
            if not w.verify(self._signing_key, message, request_seq):
                # Once signing runs every request must be signed (MS-CIFS 3.3.5.2); say whether
                # the signature was missing or wrong.
                signed = bool(header.flags2 & w.FLAGS2_SMB_SECURITY_SIGNATURE)
                events.append(event(w.LAYER, "smb.signature", result="bad_signature" if signed else "unsigned_request",
                                    command=f"0x{header.command:02x}", dialect=w.DIALECT))
                return [self._finish(self._error_header(header, w.STATUS_ACCESS_DENIED), request_seq)]

        if header.command == w.COM_NT_CANCEL:
            return []

        ctx = _Ctx(message, header, header.uid, header.tid, events)
        try:
            blocks = w.parse_chain(message, header.command)
        except ProtocolError as e:
            events.append(malformed(w.LAYER, e.reason, command=f"0x{header.command:02x}"))
            return [self._finish(self._error_header(header, w.STATUS_INVALID_SMB), request_seq)]

        if header.command == w.COM_ECHO:
            return self._echo(ctx, blocks[0], request_seq)

        replies: list[Reply] = []
        status, failed = w.STATUS_SUCCESS, None
        for block in blocks:
            ctx.command = block.command
            try:
                reply, status = self._dispatch(ctx, block)
            except SmbError as f:
                ctx.events.extend(f.events)
                status, failed = f.status, block.command
                break
            except ProtocolError as e:
                ctx.events.append(malformed(w.LAYER, e.reason, command=f"0x{block.command:02x}"))
                status, failed = w.STATUS_INVALID_SMB, block.command
                break
            replies.append(reply)
            if status != w.STATUS_SUCCESS:
                break   # MORE_PROCESSING_REQUIRED / BUFFER_OVERFLOW end a chain too

        out_header = self._reply_header(header, status, ctx.uid, ctx.tid)
        if failed is not None and not replies:
            body = w.error_message(out_header)
        else:
            body = w.build_message(out_header, replies, failed)
        if ctx.signing_started:
            # The session setup that starts signing is answered with sequence 1 and the next
            # request carries 2 (MS-CIFS 3.3.5.3).
            request_seq, self._sequence = 0, 2
        return [self._finish(body, request_seq)]

    def close(self) -> list[Event]:
        return self.core.close_all()

    # ------------------------------------------------------------------ framing helpers

    def _reply_header(self, request: Header, status: int, uid: int, tid: int) -> Header:
        keep = (w.FLAGS2_UNICODE | w.FLAGS2_NT_STATUS | w.FLAGS2_LONG_NAMES | w.FLAGS2_EAS
                | w.FLAGS2_IS_LONG_NAME)
        flags2 = request.flags2 & keep
        if self._extended_security:
            flags2 |= w.FLAGS2_EXTENDED_SECURITY
        if self._signing_key is not None:
            flags2 |= w.FLAGS2_SMB_SECURITY_SIGNATURE
        flags = w.FLAGS_REPLY | (request.flags & (w.FLAGS_CASE_INSENSITIVE | w.FLAGS_CANONICALIZED_PATHS))
        return Header(command=request.command, status=w.status_field(status, request.nt_status), flags=flags,
                      flags2=flags2, pid_high=request.pid_high, tid=tid, pid=request.pid, uid=uid,
                      mid=request.mid)

    def _error_header(self, request: Header, status: int) -> bytes:
        return w.error_message(self._reply_header(request, status, request.uid, request.tid))

    def _finish(self, body: bytes, request_seq: int) -> bytes:
        if self._signing_key is None:
            return body
        return w.sign(self._signing_key, body, request_seq + 1)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        cmd = block.command
        if cmd == w.COM_NEGOTIATE:
            return self._negotiate(ctx, block)
        if not self._negotiated:
            raise SmbError(w.STATUS_INVALID_SMB, malformed(w.LAYER, "command_before_negotiate"))
        handler = {
            w.COM_SESSION_SETUP_ANDX: self._session_setup,
            w.COM_LOGOFF_ANDX: self._logoff,
            w.COM_TREE_CONNECT_ANDX: self._tree_connect,
            w.COM_TREE_DISCONNECT: self._tree_disconnect,
            w.COM_NT_CREATE_ANDX: self._nt_create,
            w.COM_WRITE_ANDX: self._write,
            w.COM_READ_ANDX: self._read,
            w.COM_TRANSACTION: self._transaction,
            w.COM_CLOSE: self._close,
        }.get(cmd)
        if handler is None:
            raise SmbError(w.STATUS_NOT_SUPPORTED, event(w.LAYER, "smb.unsupported", command=f"0x{cmd:02x}"))
        return handler(ctx, block)

    # ------------------------------------------------------------------ NEGOTIATE

    def _negotiate(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        if self._negotiated:
            # MS-CIFS 3.3.5.2: a second NEGOTIATE on a connection is an error.
            raise SmbError(w.STATUS_INVALID_SMB, malformed(w.LAYER, "second_negotiate"))
        w.require_words(block, 0)
        dialects = w.parse_dialects(block.data)
        self._negotiated = True
        try:
            index = dialects.index(w.DIALECT)
        except ValueError:
            ctx.events.append(event(w.LAYER, "smb.negotiate", dialect=None, client_dialects=dialects[:16],
                                    result="no_common_dialect"))
            return Reply(w.COM_NEGOTIATE, struct.pack("<H", 0xFFFF)), w.STATUS_SUCCESS

        mode = w.SECURITY_USER | w.SECURITY_ENCRYPT_PASSWORDS | w.SECURITY_SIGNATURES_ENABLED
        if self._signing_required:
            mode |= w.SECURITY_SIGNATURES_REQUIRED
        self._extended_security = bool(ctx.header.flags2 & w.FLAGS2_EXTENDED_SECURITY)
        caps = w.SERVER_CAPABILITIES
        if self._extended_security:
            challenge, tail = b"", self._random(16) + bytes(self._auth.spnego_init_token())
        else:
            # A client without extended security gets the classic response so it can read it;
            # its WordCount-13 session setup is then refused (see _session_setup).
            caps &= ~w.CAP_EXTENDED_SECURITY
            challenge = self._random(8)
            tail = challenge + w.encode_string(self._config.server.domain, ctx.header.unicode, 0)
        words = struct.pack("<HBHHIIIIQhB", index, mode, MAX_MPX_COUNT, 1, MAX_BUFFER_SIZE, MAX_RAW_SIZE, 0,
                            caps, w.filetime(self._now()), 0, len(challenge))
        ctx.events.append(event(w.LAYER, "smb.negotiate", dialect=w.DIALECT, result="ok",
                                signing_required=self._signing_required,
                                extended_security=self._extended_security, client_dialects=dialects[:16]))
        return Reply(w.COM_NEGOTIATE, words, tail), w.STATUS_SUCCESS

    # ------------------------------------------------------------------ SESSION_SETUP_ANDX

    def _session_setup(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        if block.word_count == 13:
            # Plain LM/NTLM responses in the request (MS-CIFS 2.2.4.53): not served.
            raise SmbError(w.STATUS_LOGON_FAILURE, event(
                w.LAYER, "smb.session_setup", user=None, domain="", ntlm_version="", dialect=w.DIALECT,
                result="non_extended_security"))
        w.require_words(block, 12)
        (_cmd, _r, _off, _maxbuf, _mpx, _vc, _skey, blob_len, _reserved, _caps) = w.unpack_words("<BBHHHHIHII", block)
        if blob_len > len(block.data):
            raise ProtocolError(w.LAYER, "security_blob_exceeds_bytes")
        blob = block.data[:blob_len]

        uid = ctx.uid
        session = self.core.sessions.get(uid) if uid else None
        if uid and session is None:
            # A Uid this connection never handed out, or one destroyed by a failed logon.
            raise self._refused(ctx, "no_session", w.STATUS_USER_SESSION_DELETED)
        if session is None:
            uid = self._uids.take(self.core.sessions)
            session = self.core.new_session(uid)
        # An established session re-authenticates (MS-SMB 3.3.5.3): it keeps serving, with its
        # trees and opens, until the new exchange succeeds or fails (session_core.py).
        ctx.uid = uid

        step, logon = self.core.authenticate(session, blob, uid=uid)
        ctx.events.extend(step.events)
        if logon is None:
            return self._session_reply(step.token, 0, ctx.header.unicode), w.STATUS_MORE_PROCESSING_REQUIRED

        client_asks = bool(ctx.header.flags2 & w.FLAGS2_SMB_SECURITY_SIGNATURE)
        if self._signing_key is None and self.core.signs(logon, client_asks):
            # MS-CIFS 3.3.5.3: signing starts with the first session that has a key, and one key
            # and sequence serve the whole connection from then on.
            self._signing_key = logon.session_key
            ctx.signing_started = True
        ctx.events.append(self.core.setup_event(session, signing=self._signing_key is not None, uid=uid))
        # Action bit 0 is SMB_SETUP_GUEST (MS-CIFS 2.2.4.53.2).
        return self._session_reply(step.token, 0x0001 if logon.kind == "guest" else 0,
                                   ctx.header.unicode), w.STATUS_SUCCESS

    def _session_reply(self, token: bytes, action: int, unicode: bool) -> Reply:
        # NativeOS and NativeLanMan are left empty: nothing to fingerprint, nothing to parse wrong.
        words = struct.pack("<HH", action, len(token))

        def render(offset: int) -> tuple[bytes, bytes]:
            data_at = offset + 1 + 4 + len(words) + 2
            tail = bytes(token)
            strings = w.encode_string("", unicode, data_at + len(tail))
            strings += w.encode_string("", unicode, data_at + len(tail) + len(strings))
            return words, tail + strings

        return Reply(w.COM_SESSION_SETUP_ANDX, render=render)

    # ------------------------------------------------------------------ LOGOFF, TREE_(DIS)CONNECT

    def _refused(self, ctx: _Ctx, reason: str, status: int, **fields: Any) -> SmbError:
        """A request naming a Uid, Tid or Fid that grants nothing here: refused, and said so."""
        return self.core.refused(self._command(ctx), reason, status, **self._ids(ctx), **fields)

    @staticmethod
    def _command(ctx: _Ctx) -> str:
        return _COMMAND_NAMES.get(ctx.command, f"0x{ctx.command:02x}")

    @staticmethod
    def _ids(ctx: _Ctx) -> dict[str, Any]:
        return dict(uid=ctx.uid, tid=ctx.tid, dialect=w.DIALECT)

    def _session(self, ctx: _Ctx) -> Session:
        return self.core.usable(ctx.uid, self._command(ctx), **self._ids(ctx))

    def _logoff(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 2)
        session = self._session(ctx)
        ctx.events.extend(self.core.drop_session(session.session_id, "session_ended"))
        ctx.events.append(event(w.LAYER, "smb.logoff", user=session.identity.user, uid=session.session_id))
        return Reply(w.COM_LOGOFF_ANDX), w.STATUS_SUCCESS

    def _tree_connect(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 4)
        session = self._session(ctx)
        (_c, _r, _o, flags, password_len) = w.unpack_words("<BBHHH", block)
        if password_len > len(block.data):
            raise ProtocolError(w.LAYER, "password_length_exceeds_bytes")
        end = block.data_offset + len(block.data)
        path, after = w.read_string(ctx.message, block.data_offset + password_len, end, ctx.header.unicode)
        service, _ = w.read_string(ctx.message, after, end, False) if after < end else ("", end)
        share = path.replace("/", "\\").rstrip("\\").split("\\")[-1]
        base = dict(share=share, user=session.identity.user, uid=session.session_id, service=service)
        if not path.startswith("\\\\") or share.upper() != "IPC$":
            raise SmbError(w.STATUS_BAD_NETWORK_NAME, event(w.LAYER, "smb.tree_connect", result="bad_network_name", **base))
        if service not in ("?????", "IPC"):
            raise SmbError(w.STATUS_BAD_DEVICE_TYPE, event(w.LAYER, "smb.tree_connect", result="bad_device_type", **base))
        tid = self._tids.take(self.core.tree_ids())
        self.core.add_tree(tid, session, "IPC$")
        ctx.tid = tid
        ctx.events.append(event(w.LAYER, "smb.tree_connect", result="ok", tid=tid, **base))
        if flags & TREE_CONNECT_EXTENDED_RESPONSE:
            # MS-SMB 2.2.4.7.2: maximal access for the user and for guests.
            words = struct.pack("<HII", SMB_SUPPORT_SEARCH_BITS, 0x001F01FF, 0)
        else:
            words = struct.pack("<H", SMB_SUPPORT_SEARCH_BITS)
        unicode = ctx.header.unicode

        def render(offset: int) -> tuple[bytes, bytes]:
            data_at = offset + 1 + 4 + len(words) + 2
            service_bytes = b"IPC\0"   # Service is always OEM (MS-CIFS 2.2.4.55.2)
            return words, service_bytes + w.encode_string("", unicode, data_at + len(service_bytes))

        return Reply(w.COM_TREE_CONNECT_ANDX, render=render), w.STATUS_SUCCESS

    def _tree(self, ctx: _Ctx) -> tuple[Session, Tree]:
        session = self._session(ctx)
        return session, self.core.tree(session, ctx.tid, self._command(ctx), **self._ids(ctx))

    def _tree_disconnect(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 0)
        _session, tree = self._tree(ctx)
        ctx.events.extend(self.core.disconnect_tree(tree))
        ctx.events.append(event(w.LAYER, "smb.tree_disconnect", tid=tree.tree_id, uid=tree.session_id))
        return Reply(w.COM_TREE_DISCONNECT), w.STATUS_SUCCESS

    # ------------------------------------------------------------------ NT_CREATE_ANDX, CLOSE

    def _nt_create(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 24)
        session, tree = self._tree(ctx)
        (_c, _r, _o, _res, name_len) = w.unpack_words("<BBHBH", block)
        end = block.data_offset + len(block.data)
        unicode = ctx.header.unicode
        start = block.data_offset + (1 if unicode and block.data_offset % 2 else 0)
        name, _ = w.read_string(ctx.message, start, end, unicode, name_len if name_len <= end - start else None)
        if name.lower().startswith("pipe\\"):
            # On IPC$ the name is the pipe's, after the root's backslash; a bare `pipe\` prefix
            # names nothing, as Windows and Samba answer (smbtorture's rpc.samba3.smb1-pipe-name).
            raise SmbError(w.STATUS_OBJECT_NAME_NOT_FOUND, event(
                w.LAYER, "smb.pipe_open", pipe=name, result="not_found", reason="pipe_prefix",
                smb_user=session.label))
        fid = self._fids.take(self.core.opens)
        _op, events = self.core.open_pipe(session, tree, name, fid, fid=fid)
        ctx.events.extend(events)
        words = struct.pack("<BHIQQQQIQQHHB", 0, fid, FILE_OPENED, 0, 0, 0, 0, FILE_ATTRIBUTE_NORMAL, 4096, 0,
                            FILE_TYPE_MESSAGE_MODE_PIPE, NMPIPE_STATUS, 0)
        return Reply(w.COM_NT_CREATE_ANDX, words), w.STATUS_SUCCESS

    def _open(self, ctx: _Ctx, fid: int) -> Open[int]:
        session, tree = self._tree(ctx)
        handle = self.core.find_open(fid, session, tree)
        if handle is None:
            raise self._refused(ctx, "unknown_file", w.STATUS_INVALID_HANDLE, fid=fid, user=session.identity.user)
        return handle

    def _close(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 3)
        (fid, _mtime) = w.unpack_words("<HI", block)
        handle = self._open(ctx, fid)
        ctx.events.extend(self.core.close_open(handle.handle, "close"))
        return Reply(w.COM_CLOSE), w.STATUS_SUCCESS

    # ------------------------------------------------------------------ WRITE_ANDX, READ_ANDX

    def _write(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 12, 14)
        (_c, _r, _o, fid, _offset, _timeout, mode, _remaining, length_high, length, data_offset) = \
            w.unpack_words("<BBHHIIHHHHH", block)
        handle = self._open(ctx, fid)
        total = length | (length_high << 16)
        if data_offset < block.offset or data_offset + total > len(ctx.message):
            # DataLengthHigh is only meaningful with CAP_LARGE_WRITEX; fall back to the low word.
            total = length
            if data_offset < block.offset or data_offset + total > len(ctx.message):
                raise SmbError(w.STATUS_INVALID_PARAMETER, malformed(w.LAYER, "write_data_outside_message"))
        data = ctx.message[data_offset:data_offset + total]
        if mode & (WRITE_RAW_MODE | WRITE_MSG_START) == (WRITE_RAW_MODE | WRITE_MSG_START):
            # The first fragment of a raw-mode message write starts with a 2-byte message length
            # (MS-CIFS 2.2.4.43.1 WriteMode), which is not part of the pipe data.
            data = data[2:]
        if handle.pipe.closed:
            raise SmbError(w.STATUS_PIPE_DISCONNECTED)
        ctx.events.extend(handle.pipe.write(bytes(data)))
        words = struct.pack("<HHHH", total & 0xFFFF, 0, total >> 16, 0)
        return Reply(w.COM_WRITE_ANDX, words), w.STATUS_SUCCESS

    def _read(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        w.require_words(block, 10, 12)
        (_c, _r, _o, fid, _offset, max_count, _min) = w.unpack_words("<BBHHIHH", block)
        handle = self._open(ctx, fid)
        if handle.pipe.closed and not handle.pipe.pending():
            raise SmbError(w.STATUS_PIPE_DISCONNECTED)
        data, more = handle.pipe.read(max_count)
        available = min(handle.pipe.pending(), 0xFFFF)

        def render(offset: int) -> tuple[bytes, bytes]:
            data_offset = offset + 1 + 24 + 2 + 1   # one pad byte keeps the data 2-aligned
            words = struct.pack("<HHHHHH8s", available, 0, 0, len(data) & 0xFFFF, data_offset,
                                len(data) >> 16, b"")
            return words, b"\0" + data

        return Reply(w.COM_READ_ANDX, render=render), (w.STATUS_BUFFER_OVERFLOW if more else w.STATUS_SUCCESS)

    # ------------------------------------------------------------------ TRANSACTION on \PIPE\

    def _transaction(self, ctx: _Ctx, block: Block) -> tuple[Reply, int]:
        if block.word_count < 14:
            raise ProtocolError(w.LAYER, "bad_word_count_25")
        (total_params, total_data, _max_params, max_data, _max_setup, _r1, _flags, _timeout, _r2,
         param_count, param_offset, data_count, data_offset, setup_count, _r3) = w.unpack_words("<HHHHBBHIHHHHHBB", block)
        if block.word_count != 14 + setup_count:
            raise ProtocolError(w.LAYER, "transaction_setup_count_mismatch")
        setup = struct.unpack_from(f"<{setup_count}H", block.words, 28)
        for off, count in ((param_offset, param_count), (data_offset, data_count)):
            if count and (off < block.data_offset or off + count > block.data_offset + len(block.data)):
                raise SmbError(w.STATUS_INVALID_PARAMETER, malformed(w.LAYER, "transaction_offset_out_of_range"))
        if param_count != total_params or data_count != total_data:
            # Secondary transaction requests are not served: refuse a request that needs them.
            raise SmbError(w.STATUS_NOT_SUPPORTED, event(w.LAYER, "smb.unsupported", command="transaction_secondary"))
        end = block.data_offset + len(block.data)
        name, _ = w.read_string(ctx.message, block.data_offset, end, ctx.header.unicode)
        if name.upper() != "\\PIPE\\" or not setup:
            raise SmbError(w.STATUS_NOT_SUPPORTED, event(w.LAYER, "smb.unsupported", command="transaction", name=name[:64]))
        params = ctx.message[param_offset:param_offset + param_count]
        data = ctx.message[data_offset:data_offset + data_count]
        function = setup[0]
        if len(setup) < 2:
            raise ProtocolError(w.LAYER, "transaction_missing_fid")
        handle = self._open(ctx, setup[1])

        status = w.STATUS_SUCCESS
        out_params, out_data = b"", b""
        if function == TRANS_TRANSACT_NMPIPE:
            if handle.pipe.closed:
                raise SmbError(w.STATUS_PIPE_DISCONNECTED)
            out_data, more, events = handle.pipe.transceive(bytes(data), max_data)
            ctx.events.extend(events)
            if more:
                status = w.STATUS_BUFFER_OVERFLOW
        elif function == TRANS_SET_NMPIPE_STATE:
            if len(params) < 2:
                raise SmbError(w.STATUS_INVALID_PARAMETER, malformed(w.LAYER, "set_nmpipe_state_params"))
        elif function == TRANS_QUERY_NMPIPE_STATE:
            out_params = struct.pack("<H", NMPIPE_STATUS)
        elif function == TRANS_PEEK_NMPIPE:
            pending = min(handle.pipe.pending(), 0xFFFF)
            out_params = struct.pack("<HHH", pending, pending, 3)   # 3: connected
        else:
            raise SmbError(w.STATUS_NOT_SUPPORTED, event(w.LAYER, "smb.unsupported", command=f"transaction_0x{function:04x}"))
        return Reply(w.COM_TRANSACTION, render=w.transaction_layout(out_params, out_data)), status

    # ------------------------------------------------------------------ ECHO

    def _echo(self, ctx: _Ctx, block: Block, request_seq: int) -> list[bytes]:
        header = ctx.header
        try:
            w.require_words(block, 1)
        except ProtocolError as e:
            ctx.events.append(malformed(w.LAYER, e.reason, command="0x2b"))
            return [self._finish(self._error_header(header, w.STATUS_INVALID_SMB), request_seq)]
        (count,) = struct.unpack_from("<H", block.words)
        replies = []
        for n in range(1, min(count, MAX_ECHO_REPLIES) + 1):
            body = w.build_message(self._reply_header(header, w.STATUS_SUCCESS, header.uid, header.tid),
                                   [Reply(w.COM_ECHO, struct.pack("<H", n), block.data)])
            replies.append(self._finish(body, request_seq))
        return replies
