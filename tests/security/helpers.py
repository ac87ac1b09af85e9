"""Raw peers for the negative authentication matrix: a DCE/RPC client that speaks over a real
loopback socket but lets a test choose every byte (which PDU, which ids, which NTLM message,
which signature), and the lab and event helpers. The raw SMB1 and SMB2 clients and the NTLM
crafting live in tests/harness (shared with the other tests) and are re-exported here.

impacket's own clients refuse to send most of what these tests need (an AUTH3 without a bind, a
TreeId from another connection, a MIC that does not match), so the PDUs are assembled here from
the specs; impacket provides the NTLM responses and crypto primitives and the SMB2 structures.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from impacket.uuid import uuidtup_to_bin

from emulator.config import LabConfig, default_config_with
from emulator.interfaces.emsmdb import (EMSMDB_UUID, EcDoConnect, EcDoDisconnect,
                                        EcDummyRpc)
# The raw SMB clients, the socket and the NTLM crafting are shared with the other tests.
from harness.ntlm_messages import (Authenticate, WIN10_VERSION, announce_mic,  # noqa: F401
                                   anonymous_authenticate, authenticate_message, negotiate_message,
                                   with_av_pairs)
from harness.smb_client import (RawSmb1, RawSmb2, Smb1Reply, Smb2Reply, file_id_of, nb,  # noqa: F401
                                smb1_fid, smb1_signature, spnego_init, spnego_resp)
from harness.wire import HOST, Wire  # noqa: F401

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
