"""Raw peers for the negative authentication matrix: a DCE/RPC client and an SMB2 client that
speak over real loopback sockets but let a test choose every byte (which PDU, which ids, which
NTLM message, which signature), plus NTLM message crafting on top of impacket.ntlm.

impacket's own clients refuse to send most of what these tests need (an AUTH3 without a bind, a
TreeId from another connection, a MIC that does not match), so the PDUs are assembled here from
the specs; impacket provides the NTLM responses and crypto primitives and the SMB2 structures.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from impacket import ntlm
from impacket import nt_errors
from impacket import smb
from impacket import smb3structs as s3
from impacket.spnego import SPNEGO_NegTokenInit, SPNEGO_NegTokenResp, TypesMech
from impacket.uuid import uuidtup_to_bin

from emulator.config import LabConfig, default_config_with
from emulator.interfaces.emsmdb import (EMSMDB_UUID, EcDoConnect, EcDoDisconnect,
                                        EcDummyRpc)

HOST = "127.0.0.1"
EMSMDB_SYNTAX = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
NDR32_SYNTAX = uuidtup_to_bin(("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0"))

# C706 12.6.4: PDU types a client sends or receives.
REQUEST, RESPONSE, FAULT, BIND, BIND_ACK, BIND_NAK = 0, 2, 3, 11, 12, 13
ALTER_CONTEXT, ALTER_CONTEXT_RESP, AUTH3 = 14, 15, 16
PFC_FIRST_LAST = 0x03
AUTHN_SPNEGO, AUTHN_WINNT, AUTHN_KERBEROS = 9, 10, 16
LEVEL_NONE, LEVEL_CONNECT, LEVEL_PKT, LEVEL_INTEGRITY, LEVEL_PRIVACY = 1, 2, 4, 5, 6
OP_EC_DO_CONNECT, OP_EC_DO_DISCONNECT, OP_EC_DUMMY_RPC = 0, 1, 6
NCA_S_UNK_IF = 0x1C010003
NCA_S_PROTO_ERROR = 0x1C01000B


def lab_config(**policy: Any) -> LabConfig:
    """The embedded KB lab (its users and mailboxes) with some policy keys changed."""
    return default_config_with({"policy": policy})


def dn(user: str) -> str:
    return f"/o=Corp/ou=Site/cn=Recipients/cn={user}"


# ---------------------------------------------------------------------- events

def wait_records(lab: Any, kind: str, *, timeout: float = 5.0, **match: Any) -> list[dict]:
    """Records of `kind` once at least one exists (the listener logs an engine's events before it
    writes the answer, but a close or a silent PDU has no answer to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        found = lab.records(kind, **match)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def conn_of(lab: Any, sock: socket.socket) -> str:
    peer = "%s:%d" % sock.getsockname()[:2]
    found = wait_records(lab, "conn.open", peer=peer)
    assert found, f"no conn.open for {peer}"
    return found[-1]["conn"]


def wait_closed(lab: Any, conn: str) -> dict:
    found = wait_records(lab, "conn.close", conn=conn)
    assert found, f"{conn} was not closed by the server"
    return found[-1]


def granted_connects(lab: Any, conn: str) -> list[dict]:
    return [r for r in lab.records("emsmdb.connect", conn=conn) if r.get("status_name") == "ecSuccess"]


def opened_pipes(lab: Any, conn: str) -> list[dict]:
    return [r for r in lab.records("smb.pipe_open", conn=conn) if r.get("result", "ok") == "ok"]


def connected_trees(lab: Any, conn: str) -> list[dict]:
    return [r for r in lab.records("smb.tree_connect", conn=conn) if r.get("result") == "ok"]


# ---------------------------------------------------------------------- sockets

class Wire:
    """A blocking loopback socket with exact reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def peer_closed(self) -> bool:
        """True once the server has closed its side (EOF or reset, with nothing more to read)."""
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- DCE/RPC PDUs (C706 12.6)

def sec_trailer(auth_type: int, level: int, pad: int, ctx_id: int = 0) -> bytes:
    # MS-RPCE 2.2.2.11: auth_type, auth_level, auth_pad_length, reserved, auth_context_id.
    return struct.pack("<BBBBI", auth_type, level, pad, 0, ctx_id)


def pdu(ptype: int, call_id: int, body: bytes, auth: tuple[int, int, bytes] | None = None,
        flags: int = PFC_FIRST_LAST, ctx_id: int = 0) -> bytes:
    """One fragment. `auth` = (auth_type, auth_level, token): the body is padded to 4 so the
    sec_trailer is aligned (C706 13.2.6.1)."""
    trailer = b""
    token = b""
    if auth is not None:
        pad = (-len(body)) % 4
        body += b"\x00" * pad
        trailer = sec_trailer(auth[0], auth[1], pad, ctx_id)
        token = auth[2]
    frag_len = 16 + len(body) + len(trailer) + len(token)
    head = struct.pack("<BBBB4sHHI", 5, 0, ptype, flags, b"\x10\x00\x00\x00", frag_len, len(token), call_id)
    return head + body + trailer + token


def bind_body(contexts: list[tuple[int, bytes]], max_frag: int = 4280) -> bytes:
    body = struct.pack("<HHIB3x", max_frag, max_frag, 0, len(contexts))
    for ctx_id, syntax in contexts:
        body += struct.pack("<HBx", ctx_id, 1) + syntax + NDR32_SYNTAX
    return body


def request_body(opnum: int, stub: bytes, ctx_id: int = 0) -> bytes:
    return struct.pack("<IHH", len(stub), ctx_id, opnum) + stub


def ec_do_connect_stub(user_dn: str) -> bytes:
    req = EcDoConnect()
    req["szUserDN"] = user_dn + "\x00"
    req["ulFlags"] = 0
    req["ulConMod"] = 0
    req["cbLimit"] = 0
    req["ulCpid"] = 1252
    req["ulLcidString"] = 1033
    req["ulLcidSort"] = 1033
    req["ulIcxrLink"] = 0xFFFFFFFF
    req["usFCanConvertCodePages"] = 1
    v = req.fields["rgwClientVersion"]
    v["Major"], v["Minor"], v["Build"] = 5, 3144, 0
    req["pulTimeStamp"] = 0
    return req.getData()


def ec_do_disconnect_stub(handle: bytes) -> bytes:
    req = EcDoDisconnect()
    req.fields["pcxh"]["Data"] = handle
    return req.getData()


def ec_dummy_stub() -> bytes:
    return EcDummyRpc().getData()


@dataclass
class Pdu:
    raw: bytes

    @property
    def ptype(self) -> int:
        return self.raw[2]

    @property
    def auth_token(self) -> bytes:
        n = struct.unpack_from("<H", self.raw, 10)[0]
        return self.raw[len(self.raw) - n:] if n else b""

    @property
    def fault_status(self) -> int:
        assert self.ptype == FAULT, f"expected a fault, got ptype {self.ptype}"
        return struct.unpack_from("<I", self.raw, 24)[0]

    @property
    def stub(self) -> bytes:
        assert self.ptype == RESPONSE
        n = struct.unpack_from("<H", self.raw, 10)[0]
        end = len(self.raw) - (n + 8 if n else 0)
        return self.raw[24:end]


class RawRpc(Wire):
    """A DCE/RPC client over ncacn_ip_tcp that sends exactly the PDUs a test builds."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.call_id = 0

    def next_call(self) -> int:
        self.call_id += 1
        return self.call_id

    def recv_pdu(self) -> Pdu | None:
        head = self.recv_exact(16)
        if head is None:
            return None
        frag_len = struct.unpack_from("<H", head, 8)[0]
        rest = self.recv_exact(frag_len - 16)
        return None if rest is None else Pdu(head + rest)

    def exchange(self, data: bytes) -> Pdu | None:
        self.send(data)
        return self.recv_pdu()

    def bind(self, auth: tuple[int, int, bytes] | None = None, syntax: bytes = EMSMDB_SYNTAX,
             ctx_id: int = 0) -> Pdu | None:
        return self.exchange(pdu(BIND, self.next_call(), bind_body([(ctx_id, syntax)]), auth))

    def auth3(self, auth_type: int, level: int, token: bytes) -> None:
        # C706 12.6.4.1 / MS-RPCE 2.2.2.10: four bytes of padding, then the verifier; no answer.
        self.send(pdu(AUTH3, self.next_call(), b"\x00" * 4, (auth_type, level, token)))

    def call(self, opnum: int, stub: bytes, ctx_id: int = 0) -> Pdu | None:
        return self.exchange(pdu(REQUEST, self.next_call(), request_body(opnum, stub, ctx_id)))


# ---------------------------------------------------------------------- NTLM crafting (MS-NLMP 2.2.1)

MIC_OFFSET = 72            # after the fixed fields and the 8-byte Version (MS-NLMP 2.2.1.3)
WIN10_VERSION = b"\x0a\x00\x63\x45\x00\x00\x00\x0f"


def negotiate_message(signing: bool = True, ntlmv2: bool = True) -> ntlm.NTLMAuthNegotiate:
    return ntlm.getNTLMSSPType1("WS01", "", signingRequired=signing, use_ntlmv2=ntlmv2,
                                version=WIN10_VERSION)


def with_av_pairs(challenge: bytes, change: Callable[[ntlm.AV_PAIRS], None]) -> bytes:
    """The CHALLENGE with its target info edited, so impacket computes an NTLMv2 response that
    echoes the edited pairs (MS-NLMP 3.1.5.1.2)."""
    ch = ntlm.NTLMAuthChallenge(challenge)
    pairs = ntlm.AV_PAIRS(ch["TargetInfoFields"])
    change(pairs)
    ch["TargetInfoFields"] = pairs.getData()
    ch["TargetInfoFields_len"] = len(ch["TargetInfoFields"])
    ch["TargetInfoFields_max_len"] = len(ch["TargetInfoFields"])
    return ch.getData()


def announce_mic(pairs: ntlm.AV_PAIRS) -> None:
    # MS-NLMP 2.2.2.1: MsvAvFlags bit 0x2 says the AUTHENTICATE carries a MIC.
    pairs[ntlm.NTLMSSP_AV_FLAGS] = struct.pack("<I", 0x2)


@dataclass
class Authenticate:
    raw: bytes = field(repr=False)
    exported_key: bytes = field(repr=False)

    @property
    def nt_response_offset(self) -> int:
        return struct.unpack_from("<I", self.raw, 24)[0]

    @property
    def session_key_offset(self) -> int:
        return struct.unpack_from("<I", self.raw, 56)[0]

    @property
    def session_key_len(self) -> int:
        return struct.unpack_from("<H", self.raw, 52)[0]

    def flipped(self, offset: int) -> bytes:
        data = bytearray(self.raw)
        data[offset] ^= 0x01
        return bytes(data)


def authenticate_message(negotiate: ntlm.NTLMAuthNegotiate, challenge: bytes, user: str, password: str,
                         domain: str = "CORP", *, mic: bool = True, ntlmv2: bool = True,
                         edit_pairs: Callable[[ntlm.AV_PAIRS], None] | None = None) -> Authenticate:
    """An AUTHENTICATE for `challenge`, with a correct MIC (MS-NLMP 3.1.5.1.2) unless mic=False."""
    edited = challenge
    if ntlmv2 and (mic or edit_pairs):
        def change(pairs: ntlm.AV_PAIRS) -> None:
            if mic:
                announce_mic(pairs)
            if edit_pairs:
                edit_pairs(pairs)
        edited = with_av_pairs(challenge, change)
    t3, exported = ntlm.getNTLMSSPType3(negotiate, edited, user, password, domain, use_ntlmv2=ntlmv2)
    if t3["flags"] & ntlm.NTLMSSP_NEGOTIATE_VERSION:
        t3["Version"] = WIN10_VERSION
        t3["MIC"] = b"\x00" * 16
    raw = t3.getData()
    if mic and t3["flags"] & ntlm.NTLMSSP_NEGOTIATE_VERSION:
        # The MIC covers the three messages as the server saw them, with the MIC zeroed.
        value = hmac.new(exported, negotiate.getData() + challenge + raw, hashlib.md5).digest()
        raw = raw[:MIC_OFFSET] + value + raw[MIC_OFFSET + 16:]
    return Authenticate(raw, exported)


def anonymous_authenticate(negotiate: ntlm.NTLMAuthNegotiate, challenge: bytes) -> bytes:
    """MS-NLMP 3.2.5.1.2: empty user, empty NT response, a one-byte zero LM response."""
    t3, _ = ntlm.getNTLMSSPType3(negotiate, challenge, "", "", "")
    if t3["flags"] & ntlm.NTLMSSP_NEGOTIATE_VERSION:
        t3["Version"] = WIN10_VERSION
        t3["MIC"] = b"\x00" * 16
    return t3.getData()


def ntlm_bind(rpc: RawRpc, user: str, password: str, level: int = LEVEL_CONNECT, *,
              tamper: Callable[[Authenticate], bytes] | None = None, mic: bool = True,
              ntlmv2: bool = True) -> tuple[Pdu | None, bytes]:
    """bind(NEGOTIATE) -> bind_ack(CHALLENGE) -> auth3(AUTHENTICATE). Returns the bind answer
    and the AUTHENTICATE as sent."""
    neg = negotiate_message(ntlmv2=ntlmv2)
    ack = rpc.bind((AUTHN_WINNT, level, neg.getData()))
    assert ack is not None and ack.ptype == BIND_ACK, "the NEGOTIATE leg must be acknowledged"
    auth = authenticate_message(neg, ack.auth_token, user, password, mic=mic, ntlmv2=ntlmv2)
    token = tamper(auth) if tamper else auth.raw
    rpc.auth3(AUTHN_WINNT, level, token)
    return ack, token


# ---------------------------------------------------------------------- SMB2 (MS-SMB2 2.2)

def nb(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(3, "big") + message


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
        self.send(nb(bytes(message)))
        head = self.recv_exact(4)
        if head is None:
            return None
        body = self.recv_exact(int.from_bytes(head[1:4], "big"))
        return None if body is None else Smb1Reply(body)

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
