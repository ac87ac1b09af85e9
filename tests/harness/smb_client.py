"""The raw SMB clients of the tests: an SMB2 client (dialect 2.1, HMAC-SHA256 signing) and an
SMB1 client (NT LM 0.12, extended security, MD5 signing) whose every header field a test may set
(SessionId / Uid, TreeId / Tid, FileId / Fid, signed, unsigned or signed with a wrong key).

Both build their messages with impacket's structures (smb3structs, NewSMBPacket) and NTLM with
harness.ntlm_messages. `RawSmb1` sends over a loopback socket; `send_raw` is the one place a
message leaves, so a subclass can hand it to an engine instead (harness.smb_raw.EngineClient).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any, Callable

from impacket import nt_errors
from impacket import smb
from impacket import smb3structs as s3
from impacket.spnego import SPNEGO_NegTokenInit, SPNEGO_NegTokenResp, TypesMech

from emulator.smb.session_core import netbios_frame

from .ntlm_messages import Authenticate, anonymous_authenticate, authenticate_message, negotiate_message
from .wire import HOST, Wire


def nb(message: bytes) -> bytes:
    return netbios_frame(message)


def spnego_init(token: bytes) -> bytes:
    init = SPNEGO_NegTokenInit()
    init["MechTypes"] = [TypesMech["NTLMSSP - Microsoft NTLM Security Support Provider"]]
    init["MechToken"] = token
    return init.getData()


def spnego_resp(token: bytes) -> bytes:
    resp = SPNEGO_NegTokenResp()
    resp["ResponseToken"] = token
    return resp.getData()


@dataclass
class Smb2Reply:
    packet: s3.SMB2Packet

    @property
    def status(self) -> int:
        return self.packet["Status"]

    @property
    def data(self) -> bytes:
        return self.packet["Data"]


class RawSmb2(Wire):
    """An SMB2 client (dialect 2.1, HMAC-SHA256 signing, MS-SMB2 3.1.4.1) whose every header
    field a test may set: SessionId, TreeId, FileId, signed or not."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.mid = 0
        self.session_id = 0
        self.signing_key: bytes | None = None

    def request(self, command: int, body: Any, *, sid: int | None = None, tid: int = 0,
                sign: bool | None = None, raw_hook: Callable[[bytes], bytes] | None = None) -> Smb2Reply | None:
        p = s3.SMB2Packet()
        p["Command"] = command
        p["MessageID"] = self.mid
        self.mid += 1
        p["SessionID"] = self.session_id if sid is None else sid
        p["TreeID"] = tid
        p["CreditRequestResponse"] = 8
        p["CreditCharge"] = 1
        p["Flags"] = 0
        p["Data"] = body if isinstance(body, bytes) else body.getData()
        do_sign = (self.signing_key is not None) if sign is None else sign
        if do_sign:
            p["Flags"] = s3.SMB2_FLAGS_SIGNED
            p["Signature"] = b"\x00" * 16
            data = p.getData()
            mac = hmac.new(self.signing_key or b"\x00" * 16, data, hashlib.sha256).digest()[:16]
            data = data[:48] + mac + data[64:]
        else:
            data = p.getData()
        if raw_hook:
            data = raw_hook(data)
        self.send(nb(data))
        head = self.recv_exact(4)
        if head is None:
            return None
        body_bytes = self.recv_exact(int.from_bytes(head[1:4], "big"))
        return None if body_bytes is None else Smb2Reply(s3.SMB2Packet(body_bytes))

    def negotiate(self, signing_required: bool = False) -> Smb2Reply:
        n = s3.SMB2Negotiate()
        n["SecurityMode"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED | (
            s3.SMB2_NEGOTIATE_SIGNING_REQUIRED if signing_required else 0)
        n["Capabilities"] = 0
        n["ClientGuid"] = b"S" * 16
        n["Dialects"] = [s3.SMB2_DIALECT_21]
        n["DialectCount"] = 1
        r = self.request(s3.SMB2_NEGOTIATE, n, sid=0)
        assert r is not None and r.status == 0
        return r

    def session_setup(self, token: bytes, sid: int = 0) -> Smb2Reply | None:
        ss = s3.SMB2SessionSetup()
        ss["SecurityMode"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED
        ss["Buffer"] = token
        ss["SecurityBufferLength"] = len(token)
        return self.request(s3.SMB2_SESSION_SETUP, ss, sid=sid, sign=False)

    def login(self, user: str, password: str, domain: str = "CORP", *,
              tamper: Callable[[Authenticate], bytes] | None = None, ntlmv2: bool = True,
              anonymous: bool = False) -> Smb2Reply | None:
        """Negotiate (if not yet) and run the two SESSION_SETUP legs; on success the session id
        and signing key are kept for later requests."""
        if self.mid == 0:
            self.negotiate()
        neg = negotiate_message(ntlmv2=ntlmv2)
        r = self.session_setup(spnego_init(neg.getData()))
        assert r is not None and r.status == nt_errors.STATUS_MORE_PROCESSING_REQUIRED
        sid = r.packet["SessionID"]
        challenge = SPNEGO_NegTokenResp(s3.SMB2SessionSetup_Response(r.data)["Buffer"])["ResponseToken"]
        if anonymous:
            token, key = anonymous_authenticate(neg, challenge), b""
        else:
            # Without an NTLM MIC, so SPNEGO needs no mechListMIC (MS-SPNG 3.3.5.1); the MIC
            # cases run over raw NTLM in the RPC bind.
            auth = authenticate_message(neg, challenge, user, password, domain, mic=False, ntlmv2=ntlmv2)
            token, key = (tamper(auth) if tamper else auth.raw), auth.exported_key
        r = self.session_setup(spnego_resp(token), sid=sid)
        if r is not None and r.status == 0:
            self.session_id = sid
            self.signing_key = key[:16] if key else None
        return r

    def tree_connect(self, share: str = "IPC$", **kw: Any) -> Smb2Reply | None:
        t = s3.SMB2TreeConnect()
        t["Buffer"] = f"\\\\{HOST}\\{share}".encode("utf-16-le")
        t["PathLength"] = len(t["Buffer"])
        return self.request(s3.SMB2_TREE_CONNECT, t, **kw)

    def create(self, tid: int, name: str = "emsmdb", **kw: Any) -> Smb2Reply | None:
        cr = s3.SMB2Create()
        cr["Buffer"] = name.encode("utf-16-le")
        cr["NameLength"] = len(cr["Buffer"])
        cr["DesiredAccess"] = 0x0012019F
        cr["ShareAccess"] = 3
        cr["CreateDisposition"] = s3.FILE_OPEN
        cr["ImpersonationLevel"] = s3.SMB2_IL_IMPERSONATION
        return self.request(s3.SMB2_CREATE, cr, tid=tid, **kw)

    def write(self, tid: int, file_id: bytes, data: bytes, **kw: Any) -> Smb2Reply | None:
        wr = s3.SMB2Write()
        wr["FileID"] = file_id
        wr["Buffer"] = data
        wr["Length"] = len(data)
        wr["Offset"] = 0
        return self.request(s3.SMB2_WRITE, wr, tid=tid, **kw)

    def logoff(self) -> Smb2Reply | None:
        return self.request(s3.SMB2_LOGOFF, s3.SMB2Logoff())


def file_id_of(reply: Smb2Reply) -> bytes:
    fid = s3.SMB2Create_Response(reply.data)["FileID"]
    return fid.getData() if hasattr(fid, "getData") else bytes(fid)


# ---------------------------------------------------------------------- SMB1 (MS-CIFS 2.2, MS-SMB 2.2)

def smb1_signature(key: bytes, message: bytes, sequence: int) -> bytes:
    """MS-CIFS 3.1.4.1: MD5 over the key and the message whose SecuritySignature holds the
    sequence number; the first 8 bytes are the signature. With extended security the key is the
    GSS session key alone (MS-SMB 3.2.5.3.1)."""
    m = bytearray(message)
    m[14:22] = struct.pack("<Q", sequence)
    return hashlib.md5(key + bytes(m)).digest()[:8]


@dataclass
class Smb1Reply:
    raw: bytes

    @property
    def status(self) -> int:
        return struct.unpack_from("<I", self.raw, 5)[0]

    @property
    def tid(self) -> int:
        return struct.unpack_from("<H", self.raw, 24)[0]

    @property
    def uid(self) -> int:
        return struct.unpack_from("<H", self.raw, 28)[0]

    @property
    def words(self) -> bytes:
        # The first command block starts right after the 32-byte header (MS-CIFS 2.2.3.2).
        return self.raw[33:33 + 2 * self.raw[32]]

    @property
    def data(self) -> bytes:
        end = 33 + 2 * self.raw[32]
        (count,) = struct.unpack_from("<H", self.raw, end)
        return self.raw[end + 2:end + 2 + count]


class RawSmb1(Wire):
    """An SMB1 client (NT LM 0.12, extended security, OEM strings) built on impacket's
    NewSMBPacket and SMBCommand structures, whose every header field a test may set: Uid, Tid,
    Fid, signed, unsigned or signed with a wrong key."""

    SMB1_FLAGS2 = (smb.SMB.FLAGS2_EXTENDED_SECURITY | smb.SMB.FLAGS2_NT_STATUS | smb.SMB.FLAGS2_LONG_NAMES)

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.mid = 1
        self.uid = 0
        self.signing_key: bytes | None = None
        self.sequence = 0     # of the next request once signing runs (MS-CIFS 3.2.4.1.1)

    def message(self, command: int, params: bytes, data: bytes, *, uid: int | None = None,
                tid: int = 0, flags2: int | None = None) -> bytes:
        pkt = smb.NewSMBPacket()
        pkt["Flags1"] = smb.SMB.FLAGS1_PATHCASELESS
        pkt["Flags2"] = self.SMB1_FLAGS2 if flags2 is None else flags2
        pkt["Uid"] = self.uid if uid is None else uid
        pkt["Tid"], pkt["Mid"] = tid, self.mid
        self.mid += 1
        cmd = smb.SMBCommand(command)
        cmd["Parameters"] = params
        cmd["Data"] = data
        pkt.addCommand(cmd)
        return pkt.getData()

    def request(self, command: int, params: bytes, data: bytes, *, sign: bool | None = None,
                key: bytes | None = None, **kw: Any) -> Smb1Reply | None:
        """One request and its answer. Once signing runs every request takes two sequence
        numbers, signed or not, because the server counts them so (MS-CIFS 3.3.5.2)."""
        message = bytearray(self.message(command, params, data, **kw))
        sequence = self.sequence
        if self.signing_key is not None:
            self.sequence += 2
        if (self.signing_key is not None) if sign is None else sign:
            struct.pack_into("<H", message, 10, struct.unpack_from("<H", message, 10)[0]
                             | smb.SMB.FLAGS2_SMB_SECURITY_SIGNATURE)
            message[14:22] = smb1_signature(key or self.signing_key or b"\x00" * 16, bytes(message), sequence)
        body = self.send_raw(bytes(message))
        return None if body is None else Smb1Reply(body)

    def send_raw(self, message: bytes) -> bytes | None:
        """Send one SMB1 message as it is; its first answer, or None once the server closed."""
        self.sock.sendall(nb(message))
        head = self.recv_exact(4)
        if head is None:
            return None
        return self.recv_exact(int.from_bytes(head[1:4], "big"))

    def negotiate(self) -> Smb1Reply:
        r = self.request(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00")
        assert r is not None and r.status == 0 and r.words[:2] == b"\x00\x00"
        return r

    def session_setup(self, blob: bytes, *, uid: int = 0, signing: bool = True) -> Smb1Reply | None:
        p = smb.SMBSessionSetupAndX_Extended_Parameters()
        p["MaxBufferSize"], p["MaxMpxCount"], p["VcNumber"], p["SessionKey"] = 61440, 2, 1, 0
        p["Capabilities"] = smb.SMB.CAP_EXTENDED_SECURITY | smb.SMB.CAP_USE_NT_ERRORS
        p["SecurityBlobLength"] = len(blob)
        d = smb.SMBSessionSetupAndX_Extended_Data()
        d["SecurityBlob"], d["NativeOS"], d["NativeLanMan"] = blob, "Unix", "Samba"
        # FLAGS2_SMB_SECURITY_SIGNATURE in the setup asks the server to start signing (MS-SMB 3.3.5.3).
        flags2 = self.SMB1_FLAGS2 | (smb.SMB.FLAGS2_SMB_SECURITY_SIGNATURE if signing else 0)
        return self.request(smb.SMB.SMB_COM_SESSION_SETUP_ANDX, p.getData(), d.getData(), uid=uid,
                            flags2=flags2, sign=False)

    def login(self, user: str, password: str, domain: str = "CORP", *,
              signing: bool = True) -> tuple[Smb1Reply, Smb1Reply | None]:
        """Negotiate (if not yet) and both SESSION_SETUP_ANDX legs. Returns (challenge leg,
        final answer); on success the Uid and, when signing started, the key are kept."""
        if self.mid == 1:
            self.negotiate()
        neg = negotiate_message()
        first = self.session_setup(spnego_init(neg.getData()), signing=signing)
        assert first is not None and first.status == nt_errors.STATUS_MORE_PROCESSING_REQUIRED
        blob_len = struct.unpack_from("<H", first.words, 6)[0]
        challenge = SPNEGO_NegTokenResp(first.data[:blob_len])["ResponseToken"]
        auth = authenticate_message(neg, challenge, user, password, domain, mic=False)
        final = self.session_setup(spnego_resp(auth.raw), uid=first.uid, signing=signing)
        if final is not None and final.status == 0:
            self.uid = final.uid
            flags2 = struct.unpack_from("<H", final.raw, 10)[0]
            if flags2 & smb.SMB.FLAGS2_SMB_SECURITY_SIGNATURE:
                # Signing started: the setup answer was signed with sequence 1, so the next
                # request carries 2 (MS-CIFS 3.3.5.3).
                assert final.raw[14:22] == smb1_signature(auth.exported_key, final.raw, 1)
                self.signing_key, self.sequence = auth.exported_key, 2
        return first, final

    def tree_connect(self, share: str = "IPC$", **kw: Any) -> Smb1Reply | None:
        p = smb.SMBTreeConnectAndX_Parameters()
        p["PasswordLength"] = 1
        data = b"\x00" + f"\\\\{HOST}\\{share}".encode("ascii") + b"\x00" + b"?????\x00"
        return self.request(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, p.getData(), data, **kw)

    def nt_create(self, tid: int, name: str = "\\emsmdb", **kw: Any) -> Smb1Reply | None:
        p = smb.SMBNtCreateAndX_Parameters()
        p["FileNameLength"], p["AccessMask"], p["ShareAccess"], p["Disposition"] = len(name), 0x2019F, 3, 1
        p["CreateFlags"], p["CreateOptions"], p["Impersonation"], p["SecurityFlags"] = 0, 0, 2, 0
        d = smb.SMBNtCreateAndX_Data(flags=0)
        d["FileName"] = name
        return self.request(smb.SMB.SMB_COM_NT_CREATE_ANDX, p.getData(), d.getData(), tid=tid, **kw)

    def write_andx(self, tid: int, fid: int, payload: bytes, **kw: Any) -> Smb1Reply | None:
        p = smb.SMBWriteAndX_Parameters_Short()
        # WriteMode 0x0008: the start of a message on a message-mode pipe (MS-CIFS 2.2.4.43.1).
        p["Fid"], p["Offset"], p["WriteMode"], p["Remaining"] = fid, 0, 0x0008, len(payload)
        p["DataLength"] = len(payload)
        # Header 32 + WordCount 1 + 12 words 24 + ByteCount 2 + one pad byte.
        p["DataOffset"] = 32 + 1 + 24 + 2 + 1
        return self.request(smb.SMB.SMB_COM_WRITE_ANDX, p.getData(), b"\x00" + payload, tid=tid, **kw)

    def transact_pipe(self, tid: int, fid: int, payload: bytes, **kw: Any) -> Smb1Reply | None:
        """TRANSACTION with TransactNmPipe (MS-CIFS 2.2.5.6) on \\PIPE\\."""
        name = b"\\PIPE\\\x00"
        # Header 32 + WordCount 1 + 16 words 32 + ByteCount 2, then the name, padded to 4.
        data_at = 32 + 1 + 32 + 2 + len(name)
        pad = (-data_at) % 4
        words = struct.pack("<HHHHBBHIHHHHHBBHH", 0, len(payload), 0, 1024, 0, 0, 0, 0, 0,
                            0, data_at + pad, len(payload), data_at + pad, 2, 0, 0x0026, fid)
        return self.request(smb.SMB.SMB_COM_TRANSACTION, words, name + b"\x00" * pad + payload, tid=tid, **kw)

    def logoff(self, **kw: Any) -> Smb1Reply | None:
        # Two parameter words: the AndX link only (MS-CIFS 2.2.4.54.1).
        return self.request(smb.SMB.SMB_COM_LOGOFF_ANDX, b"\xff\x00\x00\x00", b"", **kw)


def smb1_fid(reply: Smb1Reply) -> int:
    """The Fid of an NT_CREATE_ANDX answer: after the AndX link and the OplockLevel byte
    (MS-CIFS 2.2.4.64.2)."""
    return struct.unpack_from("<H", reply.words, 5)[0]
