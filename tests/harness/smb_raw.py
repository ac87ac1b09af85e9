"""Raw SMB for tests, where the test chooses every byte: NetBIOS framing, SMB2 packets built with
impacket's smb3structs, and an SMB1 request builder on impacket's NewSMBPacket that talks to a
socket (`RawClient`) or straight to an engine (`EngineClient`).

The SMB engines answer with an `Output` whose data is NetBIOS-framed; `unframe` splits it back
into SMB messages, `exchange` gives a test the (messages, events, close) of one request.
"""

from __future__ import annotations

import struct
from typing import Any

from impacket import smb
from impacket import smb3structs as s3

from emulator.events import Event
from emulator.sansio import Output
from emulator.smb import ntstatus as st
from emulator.smb import smb1_wire as w
from emulator.smb.connection import SmbConnection
from emulator.smb.smb1 import Smb1Engine

from .smb_client import RawSmb1, nb
from .smb_engines import ALICE_PW, smb_connection


def unframe(data: bytes) -> list[bytes]:
    """The SMB messages of a stream of NetBIOS session messages."""
    out = []
    while data:
        if data[0] != 0:
            raise ValueError(f"NetBIOS type {data[0]:#x} where a session message was expected")
        n = int.from_bytes(data[1:4], "big")
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def exchange(engine, message: bytes) -> tuple[list[bytes], list[Event], bool]:
    """Hand one SMB message to an SMB1 or SMB2 engine: its answers, events and close flag."""
    out = engine.handle(message)
    return unframe(out.data), out.events, out.close


# ---------------------------------------------------------------- SMB2 (MS-SMB2 2.2)

def packet(command: int, body, *, mid: int, sid: int = 0, tid: int = 0, credits: int = 8,
           flags: int = 0, charge: int = 1) -> bytes:
    p = s3.SMB2Packet()
    p["Command"] = command
    p["MessageID"] = mid
    p["SessionID"] = sid
    p["TreeID"] = tid
    p["CreditRequestResponse"] = credits
    p["CreditCharge"] = charge
    p["Flags"] = flags
    p["Data"] = body
    return p.getData()


def negotiate_body(dialects=(0x0202, 0x0210, 0x0300, 0x0302)) -> Any:
    n = s3.SMB2Negotiate()
    n["SecurityMode"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED
    n["Capabilities"] = 0
    n["ClientGuid"] = b"G" * 16
    n["Dialects"] = list(dialects)
    n["DialectCount"] = len(dialects)
    return n


def responses(out: Output) -> list[s3.SMB2Packet]:
    return [s3.SMB2Packet(m) for m in unframe(out.data)]


def negotiated(dialects=(0x0202, 0x0210, 0x0300, 0x0302)) -> SmbConnection:
    conn = smb_connection()
    out = conn.receive(nb(packet(s3.SMB2_NEGOTIATE, negotiate_body(dialects), mid=0)))
    if responses(out)[0]["Status"] != st.STATUS_SUCCESS:
        raise AssertionError("NEGOTIATE refused")
    return conn


def tree_connect_body(path: str) -> Any:
    t = s3.SMB2TreeConnect()
    t["Buffer"] = path.encode("utf-16-le")
    t["PathLength"] = len(t["Buffer"])
    return t


def ntlm_login(conn: SmbConnection, user: str, password: str, domain: str = "CORP",
               first_mid: int = 1) -> tuple[int, int, list[Event]]:
    """A two-leg raw SESSION_SETUP with impacket's NTLM messages wrapped in SPNEGO.
    Returns (status, session_id, events)."""
    from impacket import ntlm as intlm
    from impacket.spnego import SPNEGO_NegTokenInit, SPNEGO_NegTokenResp, TypesMech

    events: list[Event] = []
    t1 = intlm.getNTLMSSPType1("WS", domain, True)
    init = SPNEGO_NegTokenInit()
    init["MechTypes"] = [TypesMech["NTLMSSP - Microsoft NTLM Security Support Provider"]]
    init["MechToken"] = t1.getData()
    ss = s3.SMB2SessionSetup()
    ss["SecurityMode"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED
    ss["Buffer"] = init.getData()
    ss["SecurityBufferLength"] = len(ss["Buffer"])
    out = conn.receive(nb(packet(s3.SMB2_SESSION_SETUP, ss, mid=first_mid)))
    events += out.events
    r = responses(out)[0]
    assert r["Status"] == st.STATUS_MORE_PROCESSING_REQUIRED
    sid = r["SessionID"]
    resp = SPNEGO_NegTokenResp(s3.SMB2SessionSetup_Response(r["Data"])["Buffer"])
    t3, _key = intlm.getNTLMSSPType3(t1, resp["ResponseToken"], user, password, domain)
    tr = SPNEGO_NegTokenResp()
    tr["ResponseToken"] = t3.getData()
    ss = s3.SMB2SessionSetup()
    ss["SecurityMode"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED
    ss["Buffer"] = tr.getData()
    ss["SecurityBufferLength"] = len(ss["Buffer"])
    out = conn.receive(nb(packet(s3.SMB2_SESSION_SETUP, ss, mid=first_mid + 1, sid=sid)))
    events += out.events
    return responses(out)[0]["Status"], sid, events




# ---------------------------------------------------------------- SMB1 (MS-CIFS 2.2, MS-SMB 2.2)

class RawClient(RawSmb1):
    """The SMB1 client seen as bytes: each request answers the raw message, so a test can read
    any field of it; nothing is signed and the client never asks the server to sign.
    (`EngineClient` hands the same requests to an engine directly.)"""

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def packet(self, command: int, params: bytes, data: bytes, *, uid: int = 0, tid: int = 0,
               flags2: int | None = None) -> bytes:
        return self.message(command, params, data, uid=uid, tid=tid, flags2=flags2)

    def send(self, command: int, params: bytes, data: bytes, **kw: Any) -> bytes | None:
        return self.send_raw(self.packet(command, params, data, **kw))

    def negotiate(self) -> bytes:
        reply = self.send(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00")
        if status_of(reply) != 0:
            raise AssertionError("NEGOTIATE refused")
        return reply

    def session_setup(self, blob: bytes, uid: int = 0) -> bytes | None:
        reply = super().session_setup(blob, uid=uid, signing=False)
        return None if reply is None else reply.raw


def status_of(reply: bytes | None) -> int | None:
    if reply is None:
        return None
    return struct.unpack_from("<I", reply, 5)[0]


def uid_of(reply: bytes) -> int:
    return struct.unpack_from("<H", reply, 28)[0]


def tree_connect_params() -> bytes:
    p = smb.SMBTreeConnectAndX_Parameters()
    p["PasswordLength"] = 1
    return p.getData()


def tree_connect_data(path="\\\\127.0.0.1\\IPC$") -> bytes:
    return b"\x00" + path.encode("ascii") + b"\x00" + b"?????\x00"


def spnego_negotiate() -> bytes:
    from impacket import ntlm
    from impacket.spnego import SPNEGO_NegTokenInit, TypesMech
    blob = SPNEGO_NegTokenInit()
    blob["MechTypes"] = [TypesMech["NTLMSSP - Microsoft NTLM Security Support Provider"]]
    blob["MechToken"] = ntlm.getNTLMSSPType1("WS", "CORP").getData()
    return blob.getData()


def spnego_authenticate(challenge_reply: bytes, password: str) -> bytes:
    from impacket import ntlm
    from impacket.spnego import SPNEGO_NegTokenResp
    body = w.parse_block(challenge_reply, w.HEADER_SIZE, w.COM_SESSION_SETUP_ANDX)
    blob_len = struct.unpack_from("<H", body.words, 6)[0]
    resp = SPNEGO_NegTokenResp(body.data[:blob_len])
    type1 = ntlm.getNTLMSSPType1("WS", "CORP")
    type3, _ = ntlm.getNTLMSSPType3(type1, resp["ResponseToken"], "alice", password, "CORP")
    token = SPNEGO_NegTokenResp()
    token["ResponseToken"] = type3.getData()
    return token.getData()


class EngineClient(RawClient):
    """The same requests, handed to an engine directly (no socket)."""

    def __init__(self, engine: Smb1Engine):
        self.engine, self.mid, self.events, self.extra = engine, 1, [], []
        self.uid, self.signing_key, self.sequence = 0, None, 0

    def send_raw(self, message: bytes) -> bytes | None:
        responses, events, close = exchange(self.engine, message)
        self.events.extend(events)
        self.extra = responses[1:]
        return responses[0] if responses else None

    def login(self, password=ALICE_PW) -> int:
        self.negotiate()
        challenge = self.session_setup(spnego_negotiate())
        ok = self.session_setup(spnego_authenticate(challenge, password), uid=uid_of(challenge))
        assert status_of(ok) == 0
        return uid_of(ok)

    def tree_connect(self, uid: int) -> int:
        reply = self.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data(), uid=uid)
        assert status_of(reply) == 0
        return struct.unpack_from("<H", reply, 24)[0]

    def open_pipe(self, uid: int, tid: int, name="\\echo") -> int:
        p = smb.SMBNtCreateAndX_Parameters()
        p["FileNameLength"], p["AccessMask"], p["ShareAccess"], p["Disposition"] = len(name), 0x2019F, 3, 1
        p["CreateFlags"], p["CreateOptions"], p["Impersonation"], p["SecurityFlags"] = 0, 0, 2, 0
        d = smb.SMBNtCreateAndX_Data(flags=0)
        d["FileName"] = name
        reply = self.send(smb.SMB.SMB_COM_NT_CREATE_ANDX, p.getData(), d.getData(), uid=uid, tid=tid)
        assert status_of(reply) == 0, hex(status_of(reply))
        return struct.unpack_from("<H", reply, 32 + 1 + 5)[0]


