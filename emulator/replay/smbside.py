"""One SMB connection (SMB1 NT LM 0.12 or SMB2/3) as replay drives it.

Our server hands out its own SessionIds, TreeIds, FileIds and credits (SMB2) and Uids, Tids and
Fids (SMB1). Each is learned from the pair (original answer, our answer) to the same request and
put in place of the original in later requests. SMB2 MessageIds are taken from the credits our
server granted, lowest first, as a client does (MS-SMB2 3.2.4.1.3); CANCEL names the MessageId
of the request it cancels.

Named pipes carry DCE/RPC: the data of WRITE, IOCTL FSCTL_PIPE_TRANSCEIVE and TRANSACTION
(TransactNmPipe) requests goes through the pipe's `RpcChannel`, and the data of READ, IOCTL and
TRANSACTION responses comes back through it.

Session setup: the captured security blobs are sent unchanged unless the captured user's
password is known; then the AUTHENTICATE leg is recomputed over our CHALLENGE and, where the
captured client signed, every later request is signed with the new session's key (SMB2: the
dialect's algorithm and key derivation, with the 3.1.1 preauth hash of what we really sent and
received; SMB1: MD5 with sequence numbers). Without it the captured signatures go out as they
are, and our server rejects them: they were computed with a key it never shared.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from ..capture.authtokens import inspect_token
from ..sansio import ProtocolError
from ..smb import ntstatus
from ..smb import smb1_wire as w1
from ..smb import smb2_wire as w2
from ..smb.smb2_signing import Signer, session_key_16, signing_key
from .framing import NB_KEEPALIVE, NB_SESSION_REQUEST
from .rpcside import Outgoing, RpcChannel, Said, token_label
from .standin import Authored, Unauthorable, reauthor, server_challenge
from .state import Learned

STATUS_PENDING = 0x00000103
SMB1_NAMES = {0x04: "close", 0x25: "transaction", 0x2B: "echo", 0x2E: "read_andx", 0x2F: "write_andx",
              0x71: "tree_disconnect", 0x72: "negotiate", 0x73: "session_setup_andx",
              0x74: "logoff_andx", 0x75: "tree_connect_andx", 0xA2: "nt_create_andx",
              0xA4: "nt_cancel"}
TRANSACT_NM_PIPE = 0x26


def _nb(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(3, "big") + message


@dataclass(eq=False)      # identity: one object per exchange, kept in several tables
class _Setup:
    """One session setup exchange, as captured and as replayed."""
    negotiate: bytes | None = None
    captured_challenge: bytes | None = None
    our_challenge: bytes | None = None
    authored: Authored | None = None
    preauth: bytes = b""
    deterministic: bool = False


@dataclass
class _Pending:
    command: int
    orig_mid: int
    our_mid: int | None = None
    fid: bytes | int | None = None
    name: str | None = None
    orig_answer: Any = None      # the id the original server answered with (session, tree, file)
    setup: _Setup | None = None


class SmbSide:
    def __init__(self, learned: Learned) -> None:
        self.learned = learned
        self.dialect: int | None = None
        self.smb1 = False
        self.notes: list[str] = []             # caveats for the whole connection (signing)
        self.deterministic = False             # our CHALLENGE repeated the captured one
        # SMB2
        self._available = {0}
        self._next_grant = 1
        self._sessions: dict[int, int] = {}
        self._trees: dict[int, int] = {}
        self._files: dict[bytes, bytes] = {}
        self._orig: dict[int, _Pending] = {}        # by original MessageId / SMB1 (pid, mid)
        self._ours: dict[int, _Pending] = {}        # by our MessageId
        self._mid_map: dict[int, int] = {}
        self._signers: dict[int, Signer] = {}       # by our SessionId
        self._signing_alg: int | None = None
        self._preauth = b""
        self._negotiate_sent = b""
        self._setups: dict[int, _Setup] = {}        # by original SessionId (0: a new one)
        # SMB1
        self._orig1: dict[int, _Pending] = {}       # by (Pid << 16) | Mid
        self._uids: dict[int, int] = {}
        self._tids: dict[int, int] = {}
        self._fids: dict[int, int] = {}
        self._smb1_key: bytes | None = None
        self._smb1_seq = 0
        self._smb1_setup: _Setup | None = None
        self._unicode = True
        # Pipes: one RPC channel per FileId the capture opened.
        self.channels: dict[Any, RpcChannel] = {}
        self.pipe_names: dict[Any, str] = {}
        self._warned_signature = False

    # ================================================================== client messages

    def client_message(self, raw: bytes) -> Outgoing:
        kind = raw[0]
        if kind == NB_SESSION_REQUEST:
            return Outgoing(raw, "NetBIOS session request", expects_answer=True)
        if kind == NB_KEEPALIVE:
            return Outgoing(raw, "NetBIOS keep-alive", expects_answer=False)
        msg = raw[4:]
        try:
            if msg[:4] == w2.PROTOCOL_ID:
                return self._smb2_request(msg)
            if msg[:4] == w2.SMB1_PROTOCOL_ID:
                return self._smb1_request(msg)
            if msg[:4] == w2.TRANSFORM_PROTOCOL_ID:
                return Outgoing(raw, "SMB3 encrypted message", expects_answer=True,
                                notes=[("encrypted with the capture's session key: replay cannot "
                                        "read or re-encrypt it")])
        except ProtocolError as exc:
            return Outgoing(raw, f"undecodable SMB message ({exc.reason})", expects_answer=True)
        return Outgoing(raw, "not an SMB message", expects_answer=True)

    # ------------------------------------------------------------------ SMB2 requests

    def _take_mid(self, charge: int) -> int | None:
        """The lowest run of `charge` MessageIds our server granted and we have not used."""
        for start in sorted(self._available):
            run = range(start, start + charge)
            if all(i in self._available for i in run):
                for i in run:
                    self._available.discard(i)
                return start
        return None

    def _smb2_request(self, msg: bytes) -> Outgoing:
        elements = w2.split_compound(msg)
        out_elements: list[bytes] = []
        labels: list[str] = []
        out = Outgoing(b"", "", expects_answer=False)
        finals = 0
        for el in elements:
            h = w2.parse_header(el)
            el = bytearray(el)
            name = w2.COMMAND_NAMES.get(h.command, f"command 0x{h.command:x}")
            label = name
            if h.command == w2.CANCEL:
                our_mid = self._mid_map.get(h.message_id, h.message_id)
            else:
                charge = max(1, h.credit_charge) if self.dialect not in (None, w2.DIALECT_202, w2.DIALECT_WILDCARD) else 1
                taken = self._take_mid(charge)
                if taken is None:
                    out.notes.append(f"our server granted no credit for MessageId {h.message_id}: "
                                     f"sent with the captured id")
                    taken = h.message_id
                our_mid = taken
                self._mid_map[h.message_id] = our_mid
                finals += 1
            struct.pack_into("<Q", el, 24, our_mid)
            if h.session_id:
                struct.pack_into("<Q", el, 40, self._sessions.get(h.session_id, h.session_id))
            if not h.is_async and h.tree_id in self._trees:
                struct.pack_into("<I", el, 36, self._trees[h.tree_id])
            pending = _Pending(h.command, h.message_id, our_mid)
            self._swap_file_ids(el)
            fid = self._request_file_id(h.command, bytes(el))
            pending.fid = self._orig_fid(fid)
            if h.command == w2.NEGOTIATE:
                req = w2.parse_negotiate(bytes(el))
                label = "negotiate (" + ", ".join(_dialect(d) for d in req.dialects) + ")"
            elif h.command == w2.SESSION_SETUP:
                el, label = self._session_setup_request(el, h, pending, out)
            elif h.command == w2.TREE_CONNECT:
                label = f"tree_connect {w2.parse_tree_connect(bytes(el))}"
            elif h.command == w2.CREATE:
                pending.name = w2.parse_create(bytes(el)).name
                label = f"create {pending.name}"
            elif h.command == w2.WRITE:
                el, label = self._pipe_request(el, pending, out, "write")
            elif h.command == w2.IOCTL:
                el, label = self._pipe_request(el, pending, out, "ioctl")
            elif h.command == w2.READ:
                label = f"read {self._pipe_name(pending.fid)}"
            self._orig[h.message_id] = pending
            self._ours[our_mid] = pending
            labels.append(label)
            out_elements.append(self._sign2(bytes(el), h))
        out.data = _nb(_compound(out_elements))
        out.expects_answer, out.answers = finals > 0, finals
        if elements and w2.parse_header(elements[0]).command == w2.NEGOTIATE:
            self._negotiate_sent = out.data[4:]
        out.label = "SMB2 " + " + ".join(labels)
        return out

    def _sign2(self, el: bytes, h: w2.Header) -> bytes:
        if not h.flags & w2.FLAGS_SIGNED:
            return el
        our_sid = struct.unpack_from("<Q", el, 40)[0]
        signer = self._signers.get(our_sid)
        if signer is not None:
            return signer.sign(el)
        if not self._warned_signature:
            self._warned_signature = True
            self.notes.append("SMB signing: the captured requests are signed with the capture's "
                              "session key; our server cannot verify them")
        return el

    def _swap_file_ids(self, el: bytearray) -> None:
        """Put our FileIds in place of the original ones in the fixed part of a request body."""
        if not self._files or len(el) < w2.HEADER_SIZE + 2:
            return
        size = struct.unpack_from("<H", el, w2.HEADER_SIZE)[0] & ~1
        end = min(len(el), w2.HEADER_SIZE + size)
        fixed = bytes(el[w2.HEADER_SIZE:end])
        for old, new in self._files.items():
            fixed = fixed.replace(old, new)
        el[w2.HEADER_SIZE:end] = fixed

    @staticmethod
    def _request_file_id(command: int, el: bytes) -> bytes | None:
        at = {w2.CLOSE: 8, w2.READ: 16, w2.WRITE: 16, w2.IOCTL: 8, w2.QUERY_INFO: 24, w2.FLUSH: 8}.get(command)
        if at is None or len(el) < w2.HEADER_SIZE + at + 16:
            return None
        return el[w2.HEADER_SIZE + at:w2.HEADER_SIZE + at + 16]

    def _orig_fid(self, fid: bytes | None) -> bytes | None:
        """The capture's FileId for one we may already have swapped in."""
        if fid is None:
            return None
        for old, new in self._files.items():
            if new == fid:
                return old
        return fid

    def _pipe_name(self, fid: Any) -> str:
        return self.pipe_names.get(fid, "file")

    def _session_setup_request(self, el: bytearray, h: w2.Header, pending: _Pending,
                               out: Outgoing) -> tuple[bytearray, str]:
        req = w2.parse_session_setup(bytes(el))
        if h.session_id == 0 or h.session_id not in self._setups:
            # SessionId 0 starts a new session: a new exchange.
            self._setups[h.session_id] = _Setup(preauth=self._preauth)
        setup = self._setups[h.session_id]
        pending.setup = setup
        info = inspect_token(req.token)
        label = f"session_setup: {token_label(info, 9)}"
        if info.message == "negotiate" or (info.mechanism == "ntlm" and setup.negotiate is None
                                           and info.message != "authenticate"):
            setup.negotiate = req.token
        if info.mechanism == "kerberos":
            out.auth = "kerberos"
            out.notes.append("a captured Kerberos AP-REQ: our server must find it in its replay cache "
                             "or fail to decrypt it; replay cannot re-author Kerberos")
        elif info.message:
            out.auth = info.message
        if info.message == "authenticate":
            captured, ours = self._challenges(setup)
            if captured and ours and captured == ours:
                setup.deterministic = self.deterministic = True
            token = self._reauthor(req.token, setup, out, captured, ours)
            if token is not None:
                off = struct.unpack_from("<H", el, w2.HEADER_SIZE + 12)[0]
                el = bytearray(bytes(el[:off]) + token + bytes(el[off + len(req.token):]))
                struct.pack_into("<H", el, w2.HEADER_SIZE + 14, len(token))
        if self.dialect == w2.DIALECT_311:
            setup.preauth = hashlib.sha512(setup.preauth + bytes(el)).digest()
        return el, label

    @staticmethod
    def _challenges(setup: _Setup) -> tuple[bytes | None, bytes | None]:
        c = server_challenge(setup.captured_challenge) if setup.captured_challenge else None
        o = server_challenge(setup.our_challenge) if setup.our_challenge else None
        return c, o

    def _reauthor(self, token: bytes, setup: _Setup, out: Outgoing, captured: bytes | None,
                  ours: bytes | None) -> bytes | None:
        keyring = self.learned.keyring
        if keyring and setup.our_challenge is not None:
            try:
                authored = reauthor(token, setup.negotiate, setup.our_challenge, keyring)
            except Unauthorable as exc:
                out.notes.append(f"not re-authored: {exc}")
            else:
                setup.authored = authored
                out.reauthored = (f"NTLM{authored.ntlm_version} AUTHENTICATE recomputed as "
                                  f"{authored.domain}\\{authored.user} for our server's challenge")
                return authored.token
        out.notes.append("captured AUTHENTICATE sent as captured: it answers the capture's challenge"
                         + (f" {captured.hex()}" if captured else "")
                         + (f", not ours ({ours.hex()})" if ours and ours != captured else
                            ", and ours is the same one" if ours else ""))
        return None

    def _pipe_request(self, el: bytearray, pending: _Pending, out: Outgoing, verb: str) -> tuple[bytearray, str]:
        body = w2.HEADER_SIZE
        channel = self.channels.get(pending.fid)
        name = self._pipe_name(pending.fid)
        if verb == "write":
            off = struct.unpack_from("<H", el, body + 2)[0]
            length = struct.unpack_from("<I", el, body + 4)[0]
            len_at, len_fmt = body + 4, "<I"
        else:
            ctl = struct.unpack_from("<I", el, body + 4)[0]
            if ctl != w2.FSCTL_PIPE_TRANSCEIVE:
                return el, f"ioctl 0x{ctl:08x}"
            off, length = struct.unpack_from("<II", el, body + 24)
            len_at, len_fmt = body + 28, "<I"
        data = bytes(el[off:off + length])
        if channel is None:
            return el, f"{verb} {name} ({length} bytes)"
        new, label = _pipe_out(channel, data, out)
        if new != data:
            el = bytearray(bytes(el[:off]) + new + bytes(el[off + length:]))
            struct.pack_into(len_fmt, el, len_at, len(new))
            if verb == "ioctl":
                out_off = struct.unpack_from("<I", el, body + 32)[0]
                if out_off > off:
                    struct.pack_into("<I", el, body + 32, out_off + len(new) - length)
        return el, f"{verb} {name}: {label}"

    # ------------------------------------------------------------------ SMB1 requests

    def _smb1_request(self, msg: bytes) -> Outgoing:
        self.smb1 = True
        dialects = w2.smb1_negotiate_dialects(msg)
        if len(msg) < w1.HEADER_SIZE + 3:
            raise ProtocolError("smb", "SMB1 message shorter than its header")
        if dialects is not None:
            # A multi-protocol negotiate: should the server answer in SMB2, its response is
            # MessageId 0 (MS-SMB2 3.3.5.3.1).
            self._available.discard(0)
            _tid, pid, _uid, mid = struct.unpack_from("<HHHH", msg, 24)
            self._orig1[(pid << 16) | mid] = _Pending(w1.COM_NEGOTIATE, (pid << 16) | mid, 0)
            self._orig[0] = self._ours[0] = _Pending(w2.NEGOTIATE, 0, 0)
            return Outgoing(_nb(msg), "SMB1 negotiate (" + ", ".join(dialects) + ")", expects_answer=True)
        m = bytearray(msg)
        command = m[4]
        flags2 = struct.unpack_from("<H", m, 10)[0]
        self._unicode = bool(flags2 & w1.FLAGS2_UNICODE)
        tid, pid, uid, mid = struct.unpack_from("<HHHH", m, 24)
        if uid in self._uids:
            struct.pack_into("<H", m, 28, self._uids[uid])
        if tid in self._tids:
            struct.pack_into("<H", m, 24, self._tids[tid])
        pending = _Pending(command, (pid << 16) | mid)
        out = Outgoing(b"", "", expects_answer=command != w1.COM_NT_CANCEL)
        labels = []
        blocks = w1.parse_chain(bytes(m), command)
        for block in reversed(blocks):      # data may change length: work from the end
            m, label = self._smb1_block(m, block, pending, out)
            labels.append(label)
        self._orig1[pending.orig_mid] = pending
        if flags2 & w1.FLAGS2_SMB_SECURITY_SIGNATURE and command != w1.COM_SESSION_SETUP_ANDX or self._smb1_key:
            m = bytearray(self._sign1(bytes(m), command, flags2))
        out.data = _nb(bytes(m))
        out.label = "SMB1 " + " + ".join(reversed(labels))
        return out

    def _sign1(self, m: bytes, command: int, flags2: int) -> bytes:
        if self._smb1_key is None:
            if flags2 & w1.FLAGS2_SMB_SECURITY_SIGNATURE and not self._warned_signature and self._uids:
                self._warned_signature = True
                self.notes.append("SMB signing: the captured requests are signed with the capture's "
                                  "session key; our server cannot verify them")
            return m
        seq = self._smb1_seq
        self._smb1_seq += 1 if command == w1.COM_NT_CANCEL else 2
        flags2 |= w1.FLAGS2_SMB_SECURITY_SIGNATURE
        m = m[:10] + struct.pack("<H", flags2) + m[12:]
        return w1.sign(self._smb1_key, m, seq)

    def _smb1_block(self, m: bytearray, block: w1.Block, pending: _Pending,
                    out: Outgoing) -> tuple[bytearray, str]:
        cmd = block.command
        name = SMB1_NAMES.get(cmd, f"command 0x{cmd:02x}")
        words_at = block.offset + 1
        if cmd in (w1.COM_CLOSE, w1.COM_READ_ANDX, w1.COM_WRITE_ANDX):
            at = words_at + (0 if cmd == w1.COM_CLOSE else 4)
            if len(block.words) >= at - words_at + 2:
                fid = struct.unpack_from("<H", m, at)[0]
                pending.fid = fid
                if fid in self._fids:
                    struct.pack_into("<H", m, at, self._fids[fid])
        if cmd == w1.COM_SESSION_SETUP_ANDX:
            return self._smb1_session_setup(m, block, pending, out)
        if cmd == w1.COM_TREE_CONNECT_ANDX and len(block.words) >= 8:
            pw_len = struct.unpack_from("<H", block.words, 6)[0]
            path, _ = w1.read_string(bytes(m), block.data_offset + pw_len,
                                     block.data_offset + len(block.data), self._unicode)
            return m, f"{name} {path}"
        if cmd == w1.COM_NT_CREATE_ANDX and len(block.words) >= 48:
            name_len = struct.unpack_from("<H", block.words, 5)[0]
            text, _ = w1.read_string(bytes(m), block.data_offset, block.data_offset + len(block.data),
                                     self._unicode)
            pending.name = text or f"({name_len} bytes)"
            return m, f"{name} {pending.name}"
        if cmd == w1.COM_WRITE_ANDX and len(block.words) >= 24:
            length, offset = struct.unpack_from("<HH", block.words, 20)
            return self._smb1_pipe(m, block, pending, out, offset, length, words_at + 20, name)
        if cmd == w1.COM_TRANSACTION and len(block.words) >= 32:
            setup_count = block.words[26]
            setup = block.words[28:28 + 2 * setup_count]
            if setup_count >= 2 and struct.unpack_from("<H", setup, 0)[0] == TRANSACT_NM_PIPE:
                fid_at = words_at + 30
                fid = struct.unpack_from("<H", m, fid_at)[0]
                pending.fid = fid
                if fid in self._fids:
                    struct.pack_into("<H", m, fid_at, self._fids[fid])
                count, offset = struct.unpack_from("<HH", block.words, 22)
                return self._smb1_pipe(m, block, pending, out, offset, count, words_at + 22, name,
                                       total_at=words_at + 2)
        if cmd == w1.COM_READ_ANDX:
            return m, f"{name} {self._pipe_name(pending.fid)}"
        return m, name

    def _smb1_pipe(self, m: bytearray, block: w1.Block, pending: _Pending, out: Outgoing, offset: int,
                   length: int, len_at: int, name: str, total_at: int | None = None) -> tuple[bytearray, str]:
        channel = self.channels.get(pending.fid)
        if channel is None:
            return m, f"{name} {self._pipe_name(pending.fid)} ({length} bytes)"
        data = bytes(m[offset:offset + length])
        if pending.command == w1.COM_WRITE_ANDX:
            mode = struct.unpack_from("<H", block.words, 14)[0]
            if mode & 0x000C == 0x000C and len(data) >= 2:   # raw message mode: a length first
                new, label = _pipe_out(channel, data[2:], out)
                new = struct.pack("<H", len(new)) + new
            else:
                new, label = _pipe_out(channel, data, out)
        else:
            new, label = _pipe_out(channel, data, out)
        if new != data:
            delta = len(new) - len(data)
            m = bytearray(bytes(m[:offset]) + new + bytes(m[offset + length:]))
            struct.pack_into("<H", m, len_at, len(new))
            if total_at is not None:
                total = struct.unpack_from("<H", m, total_at)[0]
                struct.pack_into("<H", m, total_at, total + delta)
            bc_at = block.data_offset - 2
            struct.pack_into("<H", m, bc_at, struct.unpack_from("<H", m, bc_at)[0] + delta)
        return m, f"{name} {self._pipe_name(pending.fid)}: {label}"

    def _smb1_session_setup(self, m: bytearray, block: w1.Block, pending: _Pending,
                            out: Outgoing) -> tuple[bytearray, str]:
        if block.word_count != 12:
            out.notes.append("SMB1 session setup without extended security: the challenge was in "
                             "the captured negotiate response; sent as captured")
            return m, "session_setup_andx (LM/NTLM responses in the clear, not extended security)"
        blob_len = struct.unpack_from("<H", block.words, 14)[0]
        blob = block.data[:blob_len]
        setup = self._smb1_setup if self._smb1_setup is not None else _Setup()
        self._smb1_setup = setup
        pending.setup = setup
        info = inspect_token(blob)
        label = f"session_setup_andx: {token_label(info, 9)}"
        if info.message == "negotiate":
            setup.negotiate = blob
        if info.mechanism == "kerberos":
            out.auth = "kerberos"
        elif info.message:
            out.auth = info.message
        if info.message != "authenticate":
            return m, label
        captured, ours = self._challenges(setup)
        if captured and ours and captured == ours:
            setup.deterministic = self.deterministic = True
        token = self._reauthor(blob, setup, out, captured, ours)
        if token is None:
            return m, label
        start = block.data_offset
        rest = bytes(m[start + blob_len:start + len(block.data)])
        if self._unicode:
            # The strings after the blob start on an even offset (MS-CIFS 2.2.1.1).
            if (start + blob_len) % 2:
                rest = rest[1:]
            if (start + len(token)) % 2:
                rest = b"\x00" + rest
        data = token + rest
        m = bytearray(bytes(m[:start]) + data + bytes(m[start + len(block.data):]))
        struct.pack_into("<H", m, block.offset + 1 + 14, len(token))
        struct.pack_into("<H", m, start - 2, len(data))
        return m, label

    # ================================================================== answers

    def original_answer(self, raw: bytes) -> list[Said]:
        return self._answer(raw, ours=False)

    def our_answer(self, raw: bytes) -> list[Said]:
        return self._answer(raw, ours=True)

    def _answer(self, raw: bytes, ours: bool) -> list[Said]:
        kind = raw[0]
        if kind in (0x82, 0x83):
            return [Said("NetBIOS positive session response" if kind == 0x82 else
                         "NetBIOS negative session response", ("netbios", kind))]
        if kind == NB_KEEPALIVE:
            return [Said("NetBIOS keep-alive", ("netbios", kind), final=False)]
        msg = raw[4:]
        try:
            if msg[:4] == w2.PROTOCOL_ID:
                return [self._smb2_answer(el, ours) for el in w2.split_compound(msg)]
            if msg[:4] == w2.SMB1_PROTOCOL_ID:
                return [self._smb1_answer(msg, ours)]
            if msg[:4] == w2.TRANSFORM_PROTOCOL_ID:
                return [Said("SMB3 encrypted message", ("encrypted",))]
        except (ProtocolError, struct.error, IndexError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__
            return [Said(f"undecodable SMB answer ({reason})", ("undecodable",))]
        return [Said("not an SMB message", ("undecodable",))]

    # ------------------------------------------------------------------ SMB2 answers

    def _smb2_answer(self, el: bytes, ours: bool) -> Said:
        h = w2.parse_header(el)
        name = w2.COMMAND_NAMES.get(h.command, f"command 0x{h.command:x}")
        if ours:
            for _ in range(min(h.credits, 8192)):
                self._available.add(self._next_grant)
                self._next_grant += 1
        if h.status == STATUS_PENDING and h.is_async:
            return Said(f"SMB2 {name}: interim STATUS_PENDING", ("interim",), final=False)
        pending = (self._ours if ours else self._orig).get(h.message_id)
        status = ntstatus.status_name(h.status)
        label = f"SMB2 {name}: {status}"
        key: tuple = (h.command, h.status)
        if pending is None:
            return Said(label + " (to no request we know)", key)
        body = w2.HEADER_SIZE
        if h.command == w2.NEGOTIATE and h.status == 0:
            resp = w2.parse_negotiate_response(el)
            label += f", dialect {_dialect(resp.dialect)}"
            key += (resp.dialect,)
            if ours:
                self._negotiated(resp, el)
        elif h.command == w2.SESSION_SETUP:
            label, key = self._session_setup_answer(el, h, pending, ours, label, key)
        elif h.command == w2.TREE_CONNECT and h.status == 0:
            self._pair(pending, h.tree_id, ours, self._trees)
        elif h.command == w2.CREATE and h.status == 0 and len(el) >= body + 80:
            fid = bytes(el[body + 64:body + 80])
            if not ours:
                pending.orig_answer = fid
                self.channels.setdefault(fid, RpcChannel(self.learned, "ncacn_np"))
                self.pipe_names[fid] = _pipe(pending.name)
            elif isinstance(pending.orig_answer, bytes) and pending.orig_answer != fid:
                self._files[pending.orig_answer] = fid
        elif h.command == w2.READ and h.status in (0, w1.STATUS_BUFFER_OVERFLOW) and len(el) >= body + 8:
            off, length = el[body + 2], struct.unpack_from("<I", el, body + 4)[0]
            label, key = self._pipe_in(pending.fid, el[off:off + length], ours, label, key)
        elif h.command == w2.IOCTL and h.status in (0, w1.STATUS_BUFFER_OVERFLOW) and len(el) >= body + 40:
            off, length = struct.unpack_from("<II", el, body + 32)
            label, key = self._pipe_in(pending.fid, el[off:off + length], ours, label, key)
        return Said(label, key)

    def _pair(self, pending: _Pending, value: int, ours: bool, table: dict[int, int]) -> None:
        if not ours:
            pending.orig_answer = value
        elif isinstance(pending.orig_answer, int) and pending.orig_answer != value:
            table[pending.orig_answer] = value

    def _negotiated(self, resp: w2.NegotiateResponse, el: bytes) -> None:
        self.dialect = resp.dialect
        if resp.dialect == w2.DIALECT_311:
            for c in resp.contexts:
                if c.type == w2.SIGNING_CAPABILITIES:
                    algs = w2.parse_id_list_context(c.data, "SIGNING_CAPABILITIES")
                    self._signing_alg = algs[0] if algs else None
            # MS-SMB2 3.2.5.2: the connection's preauth hash starts with this exchange.
            self._preauth = hashlib.sha512(b"\x00" * 64 + self._negotiate_sent).digest()
            self._preauth = hashlib.sha512(self._preauth + el).digest()
            for setup in self._setups.values():
                if not setup.preauth:
                    setup.preauth = self._preauth

    def _session_setup_answer(self, el: bytes, h: w2.Header, pending: _Pending, ours: bool,
                              label: str, key: tuple) -> tuple[str, tuple]:
        setup = pending.setup
        _flags, token = w2.parse_session_setup_response(el) if len(el) >= w2.HEADER_SIZE + 8 else (0, b"")
        if token:
            info = inspect_token(token)
            if info.message:
                label += f": {token_label(info, 9)}"
                key += (info.message,)
            if setup is not None and info.message == "challenge":
                if ours:
                    setup.our_challenge = token
                else:
                    setup.captured_challenge = token
        if setup is None:
            return label, key
        if not ours:
            pending.orig_answer = h.session_id
            if h.status == ntstatus.STATUS_MORE_PROCESSING_REQUIRED:
                # The client's next leg names this SessionId: the same exchange continues.
                self._setups[h.session_id] = setup
            return label, key
        if isinstance(pending.orig_answer, int) and pending.orig_answer and h.session_id:
            self._sessions[pending.orig_answer] = h.session_id
        if h.status == ntstatus.STATUS_MORE_PROCESSING_REQUIRED and self.dialect == w2.DIALECT_311:
            setup.preauth = hashlib.sha512(setup.preauth + el).digest()
        if h.status == 0 and setup.authored is not None and self.dialect is not None:
            key16 = session_key_16(setup.authored.exported_session_key)
            self._signers[h.session_id] = Signer(
                self.dialect, signing_key(self.dialect, key16, setup.preauth),
                self._signing_alg if self.dialect == w2.DIALECT_311 else None)
        return label, key

    def _pipe_in(self, fid: Any, data: bytes, ours: bool, label: str, key: tuple) -> tuple[str, tuple]:
        channel = self.channels.get(fid)
        if channel is None or not data:
            return label, key
        saids = _pipe_answers(channel, data, ours)
        if saids:
            label += ": " + "; ".join(s.label for s in saids)
            key += tuple(s.key for s in saids if s.final)
        return label, key

    # ------------------------------------------------------------------ SMB1 answers

    def _smb1_answer(self, msg: bytes, ours: bool) -> Said:
        if len(msg) < w1.HEADER_SIZE + 3:
            raise ProtocolError("smb", "SMB1 answer shorter than its header")
        command = msg[4]
        status = struct.unpack_from("<I", msg, 5)[0]
        tid, pid, uid, mid = struct.unpack_from("<HHHH", msg, 24)
        name = SMB1_NAMES.get(command, f"command 0x{command:02x}")
        label = f"SMB1 {name}: {ntstatus.status_name(status)}"
        key: tuple = ("smb1", command, status)
        # SMB1 Mids and Pids are the client's own, so ours are the captured ones.
        pending = self._orig1.get((pid << 16) | mid)
        if status == STATUS_PENDING:
            return Said(label, ("interim",), final=False)
        if pending is None:
            return Said(label, key)
        try:
            blocks = w1.parse_chain(msg, command)
        except ProtocolError:
            return Said(label, key)
        for block in blocks:
            label, key = self._smb1_answer_block(msg, block, status, tid, uid, pending, ours, label, key)
        return Said(label, key)

    def _smb1_answer_block(self, msg: bytes, block: w1.Block, status: int, tid: int, uid: int,
                           pending: _Pending, ours: bool, label: str, key: tuple) -> tuple[str, tuple]:
        cmd = block.command
        if cmd == w1.COM_SESSION_SETUP_ANDX and len(block.words) >= 8:
            blob_len = struct.unpack_from("<H", block.words, 6)[0]
            blob = block.data[:blob_len]
            setup = pending.setup
            info = inspect_token(blob) if blob else None
            if info is not None and info.message:
                label += f": {token_label(info, 9)}"
                key += (info.message,)
                if setup is not None and info.message == "challenge":
                    if ours:
                        setup.our_challenge = blob
                    else:
                        setup.captured_challenge = blob
            self._pair(pending, uid, ours, self._uids)
            if ours and status == 0 and setup is not None and setup.authored is not None and self._smb1_key is None:
                self._smb1_key = setup.authored.exported_session_key
                self._smb1_seq = 2
        elif cmd == w1.COM_TREE_CONNECT_ANDX and status == 0:
            self._pair(pending, tid, ours, self._tids)
        elif cmd == w1.COM_NT_CREATE_ANDX and status == 0 and len(block.words) >= 7:
            fid = struct.unpack_from("<H", block.words, 5)[0]
            if not ours:
                pending.orig_answer = fid
                self.channels.setdefault(fid, RpcChannel(self.learned, "ncacn_np"))
                self.pipe_names[fid] = _pipe(pending.name)
            elif isinstance(pending.orig_answer, int) and pending.orig_answer != fid:
                self._fids[pending.orig_answer] = fid
        elif cmd == w1.COM_READ_ANDX and status in (0, w1.STATUS_BUFFER_OVERFLOW) and len(block.words) >= 14:
            length, offset = struct.unpack_from("<HH", block.words, 10)
            label, key = self._pipe_in(pending.fid, msg[offset:offset + length], ours, label, key)
        elif cmd == w1.COM_TRANSACTION and status in (0, w1.STATUS_BUFFER_OVERFLOW) and len(block.words) >= 16:
            count, offset = struct.unpack_from("<HH", block.words, 12)
            label, key = self._pipe_in(pending.fid, msg[offset:offset + count], ours, label, key)
        return label, key

    # ------------------------------------------------------------------ for the report

    def _all_setups(self) -> list[_Setup]:
        setups = list(self._setups.values()) + ([self._smb1_setup] if self._smb1_setup else [])
        return list(dict.fromkeys(setups))

    def challenges(self) -> list[tuple[bytes | None, bytes | None]]:
        return [self._challenges(s) for s in self._all_setups()]


def _dialect(d: int) -> str:
    from ..capture.smbwalk import SMB2_DIALECTS
    return SMB2_DIALECTS.get(d, f"0x{d:04x}").split(" ")[0]


def _pipe(name: str | None) -> str:
    if not name:
        return "pipe"
    return "\\" + name.replace("/", "\\").split("\\")[-1]


def _compound(elements: list[bytes]) -> bytes:
    """Elements 8-byte aligned with NextCommand pointing at the next (MS-SMB2 3.2.4.1.4)."""
    out = []
    for i, el in enumerate(elements):
        el = bytearray(el)
        if i + 1 < len(elements):
            el += b"\x00" * (-len(el) % 8)
            struct.pack_into("<I", el, 20, len(el))
        else:
            struct.pack_into("<I", el, 20, 0)
        out.append(bytes(el))
    return b"".join(out)


def _split_pdus(data: bytes) -> list[bytes] | None:
    """Whole DCE/RPC fragments in a pipe buffer, or None when it does not cut cleanly."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 10 or data[pos] != 5:
            return None
        fmt = "<H" if data[pos + 4] & 0x10 else ">H"
        n = struct.unpack_from(fmt, data, pos + 8)[0]
        if n < 16 or pos + n > len(data):
            return None
        out.append(data[pos:pos + n])
        pos += n
    return out


def _pipe_out(channel: RpcChannel, data: bytes, out: Outgoing) -> tuple[bytes, str]:
    pdus = _split_pdus(data)
    if not pdus:
        return data, f"pipe data ({len(data)} bytes)"
    parts, labels = [], []
    for pdu in pdus:
        o = channel.client_pdu(pdu)
        parts.append(o.data)
        labels.append(o.label)
        out.notes.extend(o.notes)
        if o.reauthored:
            out.reauthored = o.reauthored
        if o.auth and not out.auth:
            out.auth = o.auth
    return b"".join(parts), "; ".join(labels)


def _pipe_answers(channel: RpcChannel, data: bytes, ours: bool) -> list[Said]:
    pdus = _split_pdus(data)
    if not pdus:
        return [Said(f"pipe data ({len(data)} bytes)", ("pipe data",))]
    return [channel.our_answer(p) if ours else channel.original_answer(p) for p in pdus]
