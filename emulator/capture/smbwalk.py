"""Follow SMB1 (MS-CIFS) and SMB2 (MS-SMB2) on one TCP stream far enough to know who set up
each session and which named pipes carried DCE/RPC, and feed the pipe bytes into one
ObservedRpcConnection per open pipe.

Messages are read with the live server's decoders (`smb1_wire`, `smb2_wire`), in both
directions; the session's identity comes from the live `SecurityContext` in observer mode
(observer.py), given the server's status. Only the commands that matter are read: negotiate,
session setup, tree connect, create, read, write, ioctl (FSCTL_PIPE_TRANSCEIVE), transaction
(TransactNmPipe) and close. Requests and responses are matched by MID (SMB1) or MessageId (SMB2).
Every session setup is reported (`SmbSession`), whether or not it opened a pipe; an SMB3
session whose later traffic is encrypted is reported from its clear-text setup, with a count of
the messages that could not be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..auth.context import State
from ..identity import ANONYMOUS, SMB_SESSION
from ..sansio import ProtocolError
from ..smb import smb1_wire as s1
from ..smb import smb2_wire as s2
from .authtokens import TokenInfo, inspect_token
from .model import AUTH_EVENT_KINDS, MAX_EVENTS, Connection, SmbSession
from .observer import ObservedContext, mechanism_name
from .rpcconn import ObservedRpcConnection, SmbSessionInfo
from .smb3_keys import Smb3Reader

STATUS_SUCCESS = 0
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
STATUS_BUFFER_OVERFLOW = 0x80000005
STATUS_PENDING = 0x00000103
MAX_PENDING = 4096
MAX_SESSIONS = 1024
MAX_SESSION_RECORDS = 4096  # session setups reported per stream; a stream of endless retries is cut
DATA_STATUSES = (STATUS_SUCCESS, STATUS_BUFFER_OVERFLOW)

SMB2_DIALECTS = {0x0202: "2.0.2", 0x0210: "2.1", 0x0300: "3.0", 0x0302: "3.0.2", 0x0311: "3.1.1",
                 0x02FF: "2.??? (SMB1 negotiate offered SMB2)"}
# SMB2 commands (MS-SMB2 2.2.1.2).
NEGOTIATE, SESSION_SETUP, TREE_CONNECT, CREATE, CLOSE, READ, WRITE, IOCTL = 0, 1, 3, 5, 6, 8, 9, 11
# TRANS_TRANSACT_NMPIPE (MS-CIFS 2.2.5.6).
TRANSACT_NMPIPE = 0x26


@dataclass
class _Session:
    security: ObservedContext = field(default_factory=lambda: ObservedContext(ANONYMOUS, SMB_SESSION))
    info: TokenInfo | None = None  # the most telling client token so far
    kerberos: bool = False
    spnego: bool = False
    frame: int | None = None
    record: SmbSession | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def identity(self) -> tuple[str | None, str | None]:
        acting = self.security.acting()
        if acting is None:
            return None, None
        return acting.user, acting.domain or None


def _data_buffer(data: bytes) -> bytes:
    """The bytes of an SMB_COM_READ response or SMB_COM_WRITE request: BufferFormat 0x01, a
    16-bit length, the bytes (MS-CIFS 2.2.4.11.2, 2.2.4.12.1)."""
    if len(data) < 3 or data[0] != 0x01:
        raise ProtocolError(s1.LAYER, "bad_data_buffer")
    length = int.from_bytes(data[1:3], "little")
    if 3 + length > len(data):
        raise ProtocolError(s1.LAYER, "data_buffer_exceeds_bytes")
    return data[3:3 + length]


class SmbWalker:
    """Consumes whole SMB messages (NetBIOS framing already removed) from one TCP stream."""

    def __init__(self, stream: int, client: str, server: str,
                 on_connection: Callable[[ObservedRpcConnection], None], keyring: Any = None) -> None:
        self.stream, self.client, self.server = stream, client, server
        self._keyring = keyring
        self._on_connection = on_connection
        self.common_events: list[dict[str, Any]] = []
        self.dropped = 0
        self.dialect: str | None = None
        self._sessions: dict[int, _Session] = {}
        self.sessions: list[SmbSession] = []  # every session setup exchange that ended
        self._trees: dict[int, tuple[str, bool]] = {}  # tid -> (path, is_ipc)
        self._tree_events: dict[int, list[dict[str, Any]]] = {}
        self._files: dict[Any, ObservedRpcConnection] = {}
        self._pending: dict[Any, dict[str, Any]] = {}
        self.partial = False
        self._smb3 = Smb3Reader(keyring)  # SMB3 decryption, given a user's key

    # -- helpers -----------------------------------------------------------------------------

    def _event(self, frame: int, kind: str, direction: str, session: _Session | None = None,
               **fields: Any) -> None:
        ev = {"frame": frame, "kind": kind, "dir": direction, **fields}
        if session is not None:
            session.events.append(ev)
        else:
            self.note(ev)

    def note(self, ev: dict[str, Any]) -> None:
        """An event for every pipe opened later on this stream (within the MAX_EVENTS cap for
        events outside the auth skeleton)."""
        if len(self.common_events) >= MAX_EVENTS and ev["kind"] not in AUTH_EVENT_KINDS:
            self.dropped += 1
        else:
            self.common_events.append(ev)

    def _session(self, key: int) -> _Session:
        sess = self._sessions.get(key)
        if sess is None:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            sess = self._sessions[key] = _Session()
        return sess

    def _request(self, key: Any, frame: int) -> dict[str, Any]:
        if key not in self._pending and len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))  # requests never answered in the capture
        return self._pending.setdefault(key, {"frame": frame})

    def _open_pipe(self, key: Any, name: str, session_key: int, frame: int, tree: str | None,
                   tid: int | None = None) -> None:
        sess = self._sessions.get(session_key)
        pipe = name.replace("\\", "/").split("/")[-1] if name else name
        conn = Connection(self.stream, "ncacn_np", self.client, self.server, partial=self.partial)
        conn.pipes.append(pipe)
        history = list(self.common_events)
        if sess is not None:
            history += sess.events
        history += self._tree_events.get(tid, []) if tid is not None else []
        conn.events.extend(sorted(history, key=lambda e: e["frame"]))
        conn.events_dropped = self.dropped
        user, domain = sess.identity() if sess is not None else (None, None)
        record = sess.record if sess is not None else None
        mechanism = "none" if record is None else "anonymous" if record.anonymous else record.mechanism
        info = SmbSessionInfo(user, domain, sess.frame if sess else None, [], mechanism=mechanism,
                              principal=record.principal if record is not None else None)
        rpc = ObservedRpcConnection(conn, info, keyring=self._keyring)
        rpc.event(frame, "smb.pipe_open", "s2c", pipe=pipe, tree=tree, session_user=info.user)
        self._files[key] = rpc
        self._on_connection(rpc)

    def _setup_request(self, frame: int, blob: bytes, key: Any) -> None:
        """A session setup request's security blob."""
        info = inspect_token(blob)
        req = self._request(key, frame)
        req["token"] = info
        if info.message == "ap_req" and self._keyring is not None and self._keyring.kerberos:
            self._read_ticket(info, frame)
        if info.message == "authenticate":
            self._event(frame, "ntlm.authenticate", "c2s", None, leg="session_setup", user=info.user,
                        domain=info.domain, ntlm_version=info.ntlm_version)

    def _read_ticket(self, info: TokenInfo, frame: int) -> None:
        """With a keytab, the session setup's ticket names its client (capture/kerberos_keys.py).
        SMB needs no more of the exchange: the reader does not check SMB signatures."""
        from .kerberos_keys import KerberosExchange

        ticket = KerberosExchange(self._keyring.kerberos).ap_req(info.raw)
        self.note({"frame": frame, "kind": "kerberos.ticket", "dir": "c2s", "leg": "session_setup",
                   "result": ticket.result, "service": ticket.service, "enctype": ticket.enctype,
                   "principal": ticket.client, "user": ticket.user, "domain": ticket.domain})
        if ticket.result == "ok":
            info.user, info.domain, info.principal = ticket.user, ticket.domain, ticket.client

    def _setup_result(self, frame: int, status: int, session_key: int, key: Any,
                      null_session: bool = False) -> None:
        """A session setup response: the server's verdict on the exchange under way."""
        req = self._pending.get(key, {})
        sess = self._session(session_key)
        info: TokenInfo | None = req.get("token")
        plain: TokenInfo | None = req.get("plain")
        if sess.security.state is not State.PENDING:
            if info is None and plain is None:
                return  # a response to a request the capture does not hold
            sess.info, sess.kerberos, sess.spnego, sess.record = None, False, False, None
            sess.security.begin("unknown")
        if info is not None:
            sess.kerberos = sess.kerberos or info.mechanism == "kerberos"
            sess.spnego = sess.spnego or info.spnego
            if info.mechanism in ("ntlm", "kerberos") and (
                    sess.info is None or info.message == "authenticate" or sess.info.mechanism != "ntlm"):
                sess.info = info
        if plain is not None:
            sess.info = plain
        mech = sess.security.mechanism
        if mech is not None and sess.info is not None:
            mech.claim(sess.info)
            mech.mechanism = self._mechanism(sess)
        if status == STATUS_MORE_PROCESSING_REQUIRED:
            return
        ok = status == STATUS_SUCCESS
        sess.security.conclude(ok, "ok" if ok else f"0x{status:08x}")
        claimed = sess.info
        anonymous = null_session or (claimed is not None and claimed.anonymous) or (
            plain is not None and not plain.user)
        user, domain = sess.identity()
        if not ok:  # a failed logon grants nothing, but the capture shows whom it tried
            user = claimed.user if claimed is not None else None
            domain = claimed.domain if claimed is not None else None
        mechanism = self._mechanism(sess)
        sess.frame = frame if ok else sess.frame
        record = SmbSession(self.stream, self.client, self.server, session_key, self.dialect,
                            mechanism, None if anonymous else user, domain, anonymous,
                            f"0x{status:08x}", ok, frame,
                            claimed.ntlm_version if claimed is not None else None,
                            principal=claimed.principal if claimed is not None else None)
        sess.record = record
        if len(self.sessions) < MAX_SESSION_RECORDS:
            self.sessions.append(record)
        self._event(frame, "smb.session_setup", "s2c", sess, dialect=self.dialect or "SMB",
                    mechanism=mechanism, user=record.user, domain=domain,
                    ntlm_version=record.ntlm_version, anonymous=anonymous,
                    **({"principal": record.principal} if record.principal else {}),
                    result="ok" if ok else f"0x{status:08x}", request_frame=req.get("frame"))

    @staticmethod
    def _mechanism(sess: _Session) -> str:
        info = sess.info
        if info is not None and info.mechanism == "plain":
            return "plain"
        name = mechanism_name(info, sess.kerberos)
        if sess.spnego and not name.startswith("spnego-") and name in ("ntlm", "kerberos"):
            name = f"spnego-{name}"
        return name

    def encrypted(self, msg: bytes, frame: int, from_client: bool) -> None:
        """An SMB3 TRANSFORM message: read as if clear when the session's key is known and the
        message verifies (capture/smb3_keys.py); otherwise counted against its session."""
        opened = self._smb3.open(msg, from_client)
        sess = self._sessions.get(opened.session_id)
        record = sess.record if sess is not None else None
        direction = "c2s" if from_client else "s2c"
        if record is not None:
            # A message that fails verification was tried under a known key: the key is
            # "ok", the message is not (counted in failed_messages).
            record.cipher = opened.cipher
            record.decryption = "ok" if opened.failed_verification else opened.reason
        if opened.plain is not None:
            if record is not None:
                record.decrypted_messages += 1
            if record is None or record.decrypted_messages == 1:
                self.note({"frame": frame, "kind": "smb.decrypted", "dir": direction,
                           "session_id": opened.session_id, "cipher": opened.cipher})
            self.smb2(opened.plain, frame)
            return
        if opened.failed_verification:  # a key was at hand: the message is not authentic
            if record is not None:
                record.failed_messages += 1
            self.note({"frame": frame, "kind": "smb.decrypt_failed", "dir": direction,
                       "session_id": opened.session_id, "cipher": opened.cipher, "reason": opened.reason})
            return
        if record is not None:
            record.encrypted_messages += 1
        if record is None or record.encrypted_messages == 1:
            self.note({"frame": frame, "kind": "smb.encrypted", "dir": direction,
                       "session_id": opened.session_id, "reason": opened.reason})

    def release(self) -> None:
        for rpc in self._files.values():
            rpc.release()
        self._files.clear()
        self._pending.clear()

    def gap(self) -> None:
        self.partial = True
        for rpc in self._files.values():
            rpc.conn.partial = True

    def _pipe_data(self, key: Any, from_client: bool, data: bytes, frame: int) -> None:
        rpc = self._files.get(key)
        if rpc is not None and data:
            rpc.feed(from_client, data, frame)

    # -- SMB1 (MS-CIFS 2.2.3.1 header, 2.2.4 commands) ----------------------------------------

    def smb1(self, msg: bytes, frame: int) -> None:
        h = s1.parse_observed_header(msg)
        reply = bool(h.flags & s1.FLAGS_REPLY)
        key = ("smb1", h.pid, h.mid)
        try:
            for block in s1.parse_chain(msg, h.command):
                self._smb1_command(block, h, reply, frame, key, msg)
        finally:
            if reply and h.status != STATUS_PENDING:
                self._pending.pop(key, None)

    def _smb1_command(self, b: s1.Block, h: s1.Header, reply: bool, frame: int, key: Any,
                      msg: bytes) -> None:
        cmd, status, unicode = b.command, h.status, h.unicode
        end = b.data_offset + len(b.data)
        if cmd == s1.COM_NEGOTIATE and reply:
            self.dialect = s1.DIALECT if b.word_count >= 17 else "SMB1"
            self._event(frame, "smb.negotiate", "s2c", dialect=self.dialect)
        elif cmd == s1.COM_SESSION_SETUP_ANDX:
            if reply:
                self._setup_result(frame, status, h.uid, key)
            elif b.word_count == 12:  # extended security (MS-SMB 2.2.4.6.1)
                blob_len = s1.unpack_words("<BBHHHHIHII", b)[7]
                self._setup_request(frame, b.data[:blob_len], key)
            elif b.word_count in (10, 13):  # the account name in clear (MS-CIFS 2.2.4.53.1)
                self._plain_setup(b, h, frame, key, msg, end)
        elif cmd == s1.COM_TREE_CONNECT_ANDX:
            if not reply:
                password_len = s1.unpack_words("<BBHHH", b)[4]
                path, _ = s1.read_string(msg, b.data_offset + password_len, end, unicode)
                self._request(key, frame).update(tree=path)
            elif status == STATUS_SUCCESS:
                path = self._pending.get(key, {}).get("tree")
                if path is not None:
                    self._tree_connected(h.tid, path, path.upper().endswith("IPC$"), frame)
        elif cmd == s1.COM_NT_CREATE_ANDX:
            if not reply:
                name_len = s1.unpack_words("<BBHBH", b)[4]
                start = b.data_offset
                name, _ = s1.read_string(msg, start, end, unicode,
                                         name_len if name_len <= end - start else None)
                self._request(key, frame).update(create=name, tid=h.tid)
            elif status == STATUS_SUCCESS and b.word_count >= 3:
                req = self._pending.get(key, {})
                fid = s1.unpack_words("<BBHBH", b)[4]
                self._created(("smb1", fid), req, h.uid, frame, h.tid)
        elif cmd == s1.COM_WRITE_ANDX and not reply:
            (_c, _r, _o, fid, _off, _timeout, mode, _remaining, high, length,
             offset) = s1.unpack_words("<BBHHIIHHHHH", b)
            payload = s1.bytes_at(msg, offset, length | (high << 16), "write_data")
            if mode & 0x000C == 0x000C:  # a raw message-mode write starts with its length
                payload = payload[2:]
            self._pipe_data(("smb1", fid), True, payload, frame)
        elif cmd == s1.COM_READ_ANDX:
            if not reply:
                self._request(key, frame)["fid"] = s1.unpack_words("<BBHH", b)[3]
            elif status in DATA_STATUSES and b.word_count >= 12:
                fid = self._pending.get(key, {}).get("fid")
                length, offset = s1.unpack_words("<BBHHHHHH", b)[6:8]
                if fid is not None:
                    self._pipe_data(("smb1", fid), False, s1.bytes_at(msg, offset, length, "read_data"), frame)
        elif cmd == s1.COM_TRANSACTION:
            if not reply:
                values = s1.unpack_words("<HHHHBBHIHHHHHBB", b)
                count, offset, setup_count = values[11], values[12], values[13]
                setup = b.words[28:28 + 2 * setup_count]
                if setup_count >= 2 and int.from_bytes(setup[:2], "little") == TRANSACT_NMPIPE:
                    fid = int.from_bytes(setup[2:4], "little")
                    self._request(key, frame)["fid"] = fid
                    self._pipe_data(("smb1", fid), True, s1.bytes_at(msg, offset, count, "trans_data"), frame)
            elif status in DATA_STATUSES and b.word_count >= 10:
                fid = self._pending.get(key, {}).get("fid")
                count, offset = s1.unpack_words("<HHHHHHHHHBB", b)[6:8]
                if fid is not None:
                    self._pipe_data(("smb1", fid), False, s1.bytes_at(msg, offset, count, "trans_data"), frame)
        elif cmd == s1.COM_WRITE and not reply:
            fid = s1.unpack_words("<HHIH", b)[0]
            self._pipe_data(("smb1", fid), True, _data_buffer(b.data), frame)
        elif cmd == s1.COM_READ:
            if not reply:
                self._request(key, frame)["fid"] = s1.unpack_words("<HHIH", b)[0]
            elif status in DATA_STATUSES:
                fid = self._pending.get(key, {}).get("fid")
                if fid is not None:
                    self._pipe_data(("smb1", fid), False, _data_buffer(b.data), frame)
        elif cmd == s1.COM_CLOSE and not reply and b.word_count >= 1:
            self._files.pop(("smb1", s1.unpack_words("<H", b)[0]), None)

    def _plain_setup(self, b: s1.Block, h: s1.Header, frame: int, key: Any, msg: bytes,
                     end: int) -> None:
        if b.word_count == 13:  # NT LM 0.12: OEM and Unicode passwords, then the account
            oem_len, uni_len = s1.unpack_words("<BBHHHHIHHII", b)[7:9]
            skip, unicode = oem_len + uni_len, h.unicode
        else:  # LANMAN: one password, OEM strings
            skip, unicode = s1.unpack_words("<BBHHHHIH", b)[7], False
        account, after = s1.read_string(msg, b.data_offset + skip, end, unicode)
        domain, _ = s1.read_string(msg, after, end, unicode) if after < end else ("", end)
        req = self._request(key, frame)
        req["plain"] = TokenInfo("plain", "authenticate", account, domain, anonymous=not account)

    def _tree_connected(self, tid: int, path: str, is_ipc: bool, frame: int) -> None:
        self._trees[tid] = (path, is_ipc)
        self._tree_events[tid] = [{"frame": frame, "kind": "smb.tree_connect", "dir": "s2c",
                                   "path": path, "result": "ok"}]

    def _created(self, file_key: Any, req: dict[str, Any], session_key: int, frame: int,
                 tid: int | None) -> None:
        if "create" not in req:
            return
        tid = req.get("tid", tid)
        tree = self._trees.get(tid) if tid is not None else None
        if tree is None or tree[1]:
            self._open_pipe(file_key, req["create"], session_key, frame,
                            tree[0] if tree else None, tid)

    # -- SMB2 (MS-SMB2 2.2.1 header, 2.2.3 onwards) ------------------------------------------

    def smb2(self, msg: bytes, frame: int) -> None:
        last_file = None
        for element in s2.split_compound(msg):  # a compound chain (MS-SMB2 3.2.4.1.4)
            last_file = self._smb2_one(element, frame, last_file)

    def _smb2_one(self, m: bytes, frame: int, last_file: bytes | None) -> bytes | None:
        h = s2.parse_header(m)
        self._smb3.observe(m, h)
        reply = bool(h.flags & s2.FLAGS_SERVER_TO_REDIR)
        if reply and h.status == STATUS_PENDING:
            return last_file  # an interim response; the final one follows
        key = ("smb2", h.message_id)
        tid = None if h.is_async else h.tree_id
        cmd, status, sid = h.command, h.status, h.session_id
        req = self._pending.get(key, {}) if reply else self._request(key, frame)
        try:
            if cmd == NEGOTIATE and reply and status == STATUS_SUCCESS:
                dialect = s2.parse_negotiate_response(m).dialect
                self.dialect = SMB2_DIALECTS.get(dialect, f"0x{dialect:04x}")
                self._event(frame, "smb.negotiate", "s2c", dialect=self.dialect)
            elif cmd == SESSION_SETUP:
                if not reply:
                    self._setup_request(frame, s2.parse_session_setup(m).token, key)
                else:
                    null = False
                    if status == STATUS_SUCCESS:
                        flags, _token = s2.parse_session_setup_response(m)
                        null = bool(flags & s2.SESSION_FLAG_IS_NULL)
                    self._setup_result(frame, status, sid, key, null_session=null)
            elif cmd == TREE_CONNECT:
                if not reply:
                    req["tree"] = s2.parse_tree_connect(m)
                elif status == STATUS_SUCCESS and "tree" in req and tid is not None:
                    share_type = s2.parse_tree_connect_response(m)
                    self._tree_connected(tid, req["tree"], share_type == s2.SHARE_TYPE_PIPE
                                         or req["tree"].upper().endswith("IPC$"), frame)
            elif cmd == CREATE:
                if not reply:
                    req["create"], req["tid"] = s2.parse_create(m).name, tid
                elif status == STATUS_SUCCESS and "create" in req:
                    file_id = s2.parse_create_response(m)
                    self._created(("smb2", file_id), req, sid, frame, tid)
                    return file_id
            elif cmd == WRITE and not reply:
                wr = s2.parse_write(m)
                self._pipe_data(("smb2", self._related(wr.file_id, last_file)), True, wr.data, frame)
            elif cmd == READ:
                if not reply:
                    req["fid"] = self._related(s2.parse_read(m).file_id, last_file)
                elif status in DATA_STATUSES and "fid" in req:
                    self._pipe_data(("smb2", req["fid"]), False, s2.parse_read_response(m), frame)
            elif cmd == IOCTL:
                if not reply:
                    io = s2.parse_ioctl(m)
                    if io.ctl_code == s2.FSCTL_PIPE_TRANSCEIVE:
                        fid = self._related(io.file_id, last_file)
                        req["fid"] = fid
                        self._pipe_data(("smb2", fid), True, io.input, frame)
                elif status in DATA_STATUSES:
                    code, file_id, output = s2.parse_ioctl_response(m)
                    if code == s2.FSCTL_PIPE_TRANSCEIVE:
                        self._pipe_data(("smb2", req.get("fid", file_id)), False, output, frame)
            elif cmd == CLOSE and not reply:
                self._files.pop(("smb2", self._related(s2.parse_close(m), last_file)), None)
        finally:
            if reply:
                self._pending.pop(key, None)
        return last_file

    @staticmethod
    def _related(fid: bytes, last_file: bytes | None) -> bytes:
        # MS-SMB2 3.2.4.1.4: in a related compound, FileId all-ones means "the file the previous
        # operation opened".
        return last_file if fid == s2.FILE_ID_ANY and last_file is not None else fid

