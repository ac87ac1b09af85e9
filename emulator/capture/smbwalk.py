"""Follow SMB1 (MS-CIFS) and SMB2 (MS-SMB2) on one TCP stream far enough to know who set up
each session and which named pipes carried DCE/RPC, and feed the pipe bytes into one
RpcConnection per open pipe.

Only headers and the few commands that matter are read: negotiate, session setup, tree
connect, create, read, write, ioctl (FSCTL_PIPE_TRANSCEIVE), transaction (TransactNmPipe),
close. Requests and responses are matched by MID (SMB1) or MessageId (SMB2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from ..sansio import ProtocolError
from .authtokens import inspect_token
from .model import AUTH_EVENT_KINDS, MAX_EVENTS, Connection
from .rpcconn import RpcConnection, SmbSessionInfo

STATUS_SUCCESS = 0
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
STATUS_BUFFER_OVERFLOW = 0x80000005
STATUS_PENDING = 0x00000103
FSCTL_PIPE_TRANSCEIVE = 0x0011C017
MAX_PENDING = 4096
SMB1_FLAGS2_UNICODE = 0x8000
SMB1_REPLY = 0x80
SMB2_FLAGS_SERVER_TO_REDIR = 0x1
SMB2_FLAGS_ASYNC = 0x2

SMB2_DIALECTS = {0x0202: "2.0.2", 0x0210: "2.1", 0x0300: "3.0", 0x0302: "3.0.2", 0x0311: "3.1.1",
                 0x02FF: "2.??? (SMB1 negotiate offered SMB2)"}


@dataclass
class _Session:
    user: str | None = None
    domain: str | None = None
    frame: int | None = None
    ntlm_version: str | None = None
    mechanism: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _utf16z(b: bytes) -> str:
    out = b.decode("utf-16-le", "replace")
    return out.split("\x00", 1)[0]


def _asciiz(b: bytes) -> str:
    return b.split(b"\x00", 1)[0].decode("latin-1")


class SmbWalker:
    """Consumes whole SMB messages (NetBIOS framing already removed) from one TCP stream."""

    def __init__(self, stream: int, client: str, server: str,
                 on_connection: Callable[[RpcConnection], None], keyring: Any = None) -> None:
        self.stream, self.client, self.server = stream, client, server
        self._keyring = keyring
        self._on_connection = on_connection
        self.common_events: list[dict[str, Any]] = []
        self.dropped = 0
        self._sessions: dict[int, _Session] = {}
        self._trees: dict[int, tuple[str, bool]] = {}  # tid -> (path, is_ipc)
        self._tree_events: dict[int, list[dict[str, Any]]] = {}
        self._files: dict[Any, RpcConnection] = {}
        self._pending: dict[Any, dict[str, Any]] = {}
        self.partial = False

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
        return self._sessions.setdefault(key, _Session())

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
        info = SmbSessionInfo(sess.user if sess else None, sess.domain if sess else None,
                              sess.frame if sess else None, [])
        rpc = RpcConnection(conn, info, keyring=self._keyring)
        rpc.event(frame, "smb.pipe_open", "s2c", pipe=pipe, tree=tree,
                  session_user=info.user)
        self._files[key] = rpc
        self._on_connection(rpc)

    def _security_blob(self, frame: int, blob: bytes, session_key: int, is_request: bool,
                       mid: Any) -> None:
        info = inspect_token(blob)
        if is_request and info.message == "authenticate":
            self._pending.setdefault(mid, {})["auth"] = info
            self._event(frame, "ntlm.authenticate", "c2s", self._session(session_key),
                        leg="session_setup", user=info.user, domain=info.domain,
                        ntlm_version=info.ntlm_version)
        elif is_request and info.mechanism == "kerberos":
            self._pending.setdefault(mid, {})["auth"] = info

    def _session_result(self, frame: int, status: int, session_key: int, mid: Any,
                        dialect: str) -> None:
        req = self._pending.get(mid, {})
        info = req.get("auth")
        if info is None and status == STATUS_MORE_PROCESSING_REQUIRED:
            return
        sess = self._session(session_key)
        result = "ok" if status == STATUS_SUCCESS else f"0x{status:08x}"
        if info is not None:
            if status == STATUS_SUCCESS:
                sess.user, sess.domain = info.user, info.domain
                sess.frame, sess.ntlm_version, sess.mechanism = frame, info.ntlm_version, info.mechanism
            self._event(frame, "smb.session_setup", "s2c", sess, dialect=dialect,
                        mechanism=info.mechanism, user=info.user, domain=info.domain,
                        ntlm_version=info.ntlm_version, result=result, request_frame=req.get("frame"))
        elif req.get("plain_user") is not None:
            if status == STATUS_SUCCESS:
                sess.user, sess.domain, sess.frame = req["plain_user"], req.get("plain_domain"), frame
            self._event(frame, "smb.session_setup", "s2c", sess, dialect=dialect,
                        mechanism="plain", user=req["plain_user"], domain=req.get("plain_domain"),
                        result=result, request_frame=req.get("frame"))

    def release(self) -> None:
        for rpc in self._files.values():
            rpc.release()
        self._files.clear()
        self._pending.clear()

    def gap(self) -> None:
        self.partial = True
        for rpc in self._files.values():
            rpc.conn.partial = True

    # -- SMB1 (MS-CIFS 2.2.3.1 header, 2.2.4 commands) ----------------------------------------

    def smb1(self, msg: bytes, frame: int) -> None:
        if len(msg) < 33:
            raise ProtocolError("smb", "SMB1 message shorter than its header")
        cmd = msg[4]
        status, flags, flags2 = struct.unpack("<IBH", msg[5:12])
        tid, pid, uid, mid = struct.unpack("<HHHH", msg[24:32])
        reply = bool(flags & SMB1_REPLY)
        unicode = bool(flags2 & SMB1_FLAGS2_UNICODE)
        key = ("smb1", pid, mid)
        off = 32
        seen = 0
        while cmd != 0xFF and off < len(msg) and seen < 8:
            seen += 1
            wc = msg[off]
            words = msg[off + 1:off + 1 + 2 * wc]
            bpos = off + 1 + 2 * wc
            bc = struct.unpack("<H", msg[bpos:bpos + 2])[0] if bpos + 2 <= len(msg) else 0
            data = msg[bpos + 2:bpos + 2 + bc]
            self._smb1_command(cmd, reply, status, frame, tid, uid, key, words, data, bpos + 2,
                               msg, unicode)
            if cmd not in (0x73, 0x75, 0xA2, 0x2E, 0x2F, 0x74, 0x2D, 0x24) or wc < 2:
                break
            cmd, next_off = words[0], struct.unpack("<H", words[2:4])[0]
            if next_off <= off:
                break
            off = next_off
        if reply and status != STATUS_PENDING:
            self._pending.pop(key, None)

    def _smb1_command(self, cmd: int, reply: bool, status: int, frame: int, tid: int, uid: int,
                      key: Any, words: bytes, data: bytes, data_off: int, msg: bytes,
                      unicode: bool) -> None:
        d = "s2c" if reply else "c2s"
        if cmd == 0x72 and reply:
            self._event(frame, "smb.negotiate", d, dialect="NT LM 0.12" if len(words) >= 34 else "SMB1")
        elif cmd == 0x73:
            if not reply:
                req = self._pending.setdefault(key, {})
                req["frame"] = frame
                if len(words) == 24:  # extended security: SecurityBlobLength at word 7
                    blob_len = struct.unpack("<H", words[14:16])[0]
                    self._security_blob(frame, data[:blob_len], uid, True, key)
                elif len(words) == 26:  # MS-CIFS 2.2.4.53.1: account name in clear
                    oem_len, uni_len = struct.unpack("<HH", words[14:18])
                    rest = data[oem_len + uni_len:]
                    if unicode:
                        if (data_off + oem_len + uni_len) % 2:
                            rest = rest[1:]
                        parts = rest.decode("utf-16-le", "replace").split("\x00")
                    else:
                        parts = rest.decode("latin-1").split("\x00")
                    req["plain_user"] = parts[0] if parts else ""
                    req["plain_domain"] = parts[1] if len(parts) > 1 else ""
            else:
                self._session_result(frame, status, uid, key, "NT LM 0.12")
        elif cmd == 0x75:
            if not reply:
                if len(words) >= 8:
                    pw_len = struct.unpack("<H", words[6:8])[0]
                    rest = data[pw_len:]
                    if unicode:
                        if (data_off + pw_len) % 2:
                            rest = rest[1:]
                        path = _utf16z(rest)
                    else:
                        path = _asciiz(rest)
                    self._pending.setdefault(key, {}).update(tree=path, frame=frame)
            else:
                path = self._pending.get(key, {}).get("tree")
                if path is not None:
                    if status == STATUS_SUCCESS:
                        self._trees[tid] = (path, path.upper().endswith("IPC$"))
                        self._tree_events[tid] = [{"frame": frame, "kind": "smb.tree_connect", "dir": d,
                                                   "path": path, "result": "ok"}]
        elif cmd == 0xA2:
            if not reply:
                if len(words) >= 48:
                    name_len = struct.unpack("<H", words[5:7])[0]
                    if unicode:
                        raw = data[1:] if data_off % 2 else data
                        name = _utf16z(raw[:name_len + 2])
                    else:
                        name = _asciiz(data[:name_len + 1])
                    self._pending.setdefault(key, {}).update(create=name, tid=tid, frame=frame)
            else:
                req = self._pending.get(key, {})
                tree = self._trees.get(req.get("tid", tid))
                if "create" in req and status == STATUS_SUCCESS and len(words) >= 7 and \
                        (tree is None or tree[1]):
                    fid = struct.unpack("<H", words[5:7])[0]
                    self._open_pipe(("smb1", fid), req["create"], uid, frame,
                                    tree[0] if tree else None, req.get("tid", tid))
        elif cmd == 0x2F and not reply:
            if len(words) >= 24:
                fid, = struct.unpack("<H", words[4:6])
                mode, = struct.unpack("<H", words[14:16])
                length, offset = struct.unpack("<HH", words[20:24])
                high = struct.unpack("<H", words[18:20])[0]
                payload = msg[offset:offset + length + (high << 16)]
                if mode & 0x000C == 0x000C:  # raw message-mode write starts with its length
                    payload = payload[2:]
                self._pipe_data(("smb1", fid), True, payload, frame)
        elif cmd == 0x2E:
            if not reply:
                if len(words) >= 6:
                    self._pending.setdefault(key, {})["read_fid"] = struct.unpack("<H", words[4:6])[0]
            elif status in (STATUS_SUCCESS, STATUS_BUFFER_OVERFLOW) and len(words) >= 14:
                fid = self._pending.get(key, {}).get("read_fid")
                length, offset = struct.unpack("<HH", words[10:14])
                if fid is not None:
                    self._pipe_data(("smb1", fid), False, msg[offset:offset + length], frame)
        elif cmd == 0x25:
            if not reply:
                if len(words) >= 32:
                    count, offset = struct.unpack("<HH", words[22:26])
                    setup_count = words[26]
                    setup = words[28:28 + 2 * setup_count]
                    if setup_count >= 2 and struct.unpack("<H", setup[:2])[0] == 0x26:
                        fid = struct.unpack("<H", setup[2:4])[0]
                        self._pending.setdefault(key, {})["trans_fid"] = fid
                        self._pipe_data(("smb1", fid), True, msg[offset:offset + count], frame)
            elif status in (STATUS_SUCCESS, STATUS_BUFFER_OVERFLOW) and len(words) >= 16:
                fid = self._pending.get(key, {}).get("trans_fid")
                count, offset = struct.unpack("<HH", words[12:16])
                if fid is not None:
                    self._pipe_data(("smb1", fid), False, msg[offset:offset + count], frame)
        elif cmd == 0x04 and not reply and len(words) >= 2:
            self._files.pop(("smb1", struct.unpack("<H", words[:2])[0]), None)

    def _pipe_data(self, key: Any, from_client: bool, data: bytes, frame: int) -> None:
        rpc = self._files.get(key)
        if rpc is not None and data:
            rpc.feed(from_client, data, frame)

    # -- SMB2 (MS-SMB2 2.2.1 header, 2.2.3 onwards) ------------------------------------------

    def smb2(self, msg: bytes, frame: int) -> None:
        pos, last_file = 0, None
        for _ in range(32):  # a compound chain (MS-SMB2 3.2.4.1.4)
            hdr = msg[pos:]
            if len(hdr) < 64 or hdr[:4] != b"\xfeSMB":
                raise ProtocolError("smb2", "SMB2 message shorter than its header")
            last_file = self._smb2_one(hdr, frame, last_file)
            nxt = struct.unpack("<I", hdr[20:24])[0]
            if not nxt:
                return
            pos += nxt

    def _smb2_one(self, m: bytes, frame: int, last_file: bytes | None) -> bytes | None:
        status, cmd = struct.unpack("<IH", m[8:14])
        flags, _next, mid = struct.unpack("<IIQ", m[16:32])
        reply = bool(flags & SMB2_FLAGS_SERVER_TO_REDIR)
        tid = struct.unpack("<I", m[36:40])[0] if not flags & SMB2_FLAGS_ASYNC else None
        sid = struct.unpack("<Q", m[40:48])[0]
        body = m[64:]
        key = ("smb2", mid)
        d = "s2c" if reply else "c2s"
        if reply and status == STATUS_PENDING:
            return last_file  # an interim response; the final one follows
        if not reply and len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))  # requests never answered in the capture
        req = self._pending.get(key, {}) if reply else self._pending.setdefault(key, {"frame": frame})
        req.setdefault("cmd", cmd)
        try:
            if cmd == 0 and reply and len(body) >= 6:
                dialect = struct.unpack("<H", body[4:6])[0]
                self.dialect = SMB2_DIALECTS.get(dialect, f"0x{dialect:04x}")
                self._event(frame, "smb.negotiate", d, dialect=self.dialect)
            elif cmd == 1:
                if not reply and len(body) >= 16:
                    off, ln = struct.unpack("<HH", body[12:16])
                    self._security_blob(frame, m[off:off + ln], sid, True, key)
                elif reply:
                    self._session_result(frame, status, sid, key, getattr(self, "dialect", "SMB2"))
            elif cmd == 3:
                if not reply and len(body) >= 8:
                    off, ln = struct.unpack("<HH", body[4:8])
                    req["tree"] = m[off:off + ln].decode("utf-16-le", "replace")
                elif reply and "tree" in req:
                    is_pipe = len(body) >= 3 and body[2] == 0x02
                    if status == 0 and tid is not None:
                        self._trees[tid] = (req["tree"], is_pipe or req["tree"].upper().endswith("IPC$"))
                        self._tree_events[tid] = [{"frame": frame, "kind": "smb.tree_connect", "dir": d,
                                                   "path": req["tree"], "result": "ok"}]
            elif cmd == 5:
                if not reply and len(body) >= 48:
                    off, ln = struct.unpack("<HH", body[44:48])
                    req["create"] = m[off:off + ln].decode("utf-16-le", "replace")
                    req["tid"] = tid
                elif reply and "create" in req and status == 0 and len(body) >= 80:
                    tree = self._trees.get(req.get("tid"))
                    if tree is None or tree[1]:
                        self._open_pipe(("smb2", body[64:80]), req["create"], sid, frame,
                                        tree[0] if tree else None, req.get("tid"))
                    return body[64:80]
            elif cmd == 9 and not reply and len(body) >= 32:
                off, ln = struct.unpack("<HI", body[2:8])
                fid = self._related(body[16:32], last_file)
                self._pipe_data(("smb2", fid), True, m[off:off + ln], frame)
            elif cmd == 8:
                if not reply and len(body) >= 32:
                    req["fid"] = self._related(body[16:32], last_file)
                elif reply and status in (0, STATUS_BUFFER_OVERFLOW) and len(body) >= 8 and "fid" in req:
                    off, ln = body[2], struct.unpack("<I", body[4:8])[0]
                    self._pipe_data(("smb2", req["fid"]), False, m[off:off + ln], frame)
            elif cmd == 11 and len(body) >= 40:
                ctl = struct.unpack("<I", body[4:8])[0]
                if ctl == FSCTL_PIPE_TRANSCEIVE:
                    fid = self._related(body[8:24], last_file)
                    if not reply:
                        off, ln = struct.unpack("<II", body[24:32])
                        req["fid"] = fid
                        self._pipe_data(("smb2", fid), True, m[off:off + ln], frame)
                    elif status in (0, STATUS_BUFFER_OVERFLOW):
                        off, ln = struct.unpack("<II", body[32:40])
                        self._pipe_data(("smb2", req.get("fid", fid)), False, m[off:off + ln], frame)
            elif cmd == 6 and not reply and len(body) >= 24:
                self._files.pop(("smb2", self._related(body[8:24], last_file)), None)
        finally:
            if reply:
                self._pending.pop(key, None)
        return last_file

    @staticmethod
    def _related(fid: bytes, last_file: bytes | None) -> bytes:
        # MS-SMB2 3.2.4.1.4: in a related compound, FileId all-ones means "the file the previous
        # operation opened".
        return last_file if fid == b"\xff" * 16 and last_file is not None else fid
