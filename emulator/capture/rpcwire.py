"""A read-only view of connection-oriented DCE/RPC PDUs (MS-RPCE 2.2.2, C706 chapter 12) for
capture analysis: the fields that tell who authenticated, how, and for which interface.

It tolerates what real captures contain (big-endian data representation, object UUIDs,
fragments) and raises ProtocolError for anything that does not parse.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ..sansio import ProtocolError

# C706 12.6.4 packet types.
REQUEST, RESPONSE, FAULT, BIND, BIND_ACK, BIND_NAK = 0, 2, 3, 11, 12, 13
ALTER_CONTEXT, ALTER_CONTEXT_RESP, AUTH3, SHUTDOWN, CO_CANCEL, ORPHANED = 14, 15, 16, 17, 18, 19
PFC_FIRST_FRAG, PFC_LAST_FRAG, PFC_OBJECT_UUID = 0x01, 0x02, 0x80
CLIENT_TYPES = {REQUEST, BIND, ALTER_CONTEXT, AUTH3, CO_CANCEL, ORPHANED}

MAX_FRAGMENT = 1 << 20


@dataclass
class AuthTrailer:
    auth_type: int
    auth_level: int
    pad_length: int
    context_id: int
    token: bytes

    def __repr__(self) -> str:  # the token may carry NTLM responses
        return (f"AuthTrailer(type={self.auth_type}, level={self.auth_level}, "
                f"token=<{len(self.token)} bytes>)")


@dataclass
class Fragment:
    ptype: int
    flags: int
    call_id: int
    endian: str
    body: bytes  # between the 16-byte header and the auth trailer
    auth: AuthTrailer | None
    raw_len: int

    @property
    def from_client(self) -> bool:
        return self.ptype in CLIENT_TYPES


class FrameBuffer:
    """Cuts a byte stream into whole fragments using frag_length (C706 12.6.3.1)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 10:
            if self._buf[0] != 5 or self._buf[1] not in (0, 1):
                self._buf.clear()
                raise ProtocolError("dcerpc", "not a DCE/RPC version 5 PDU")
            endian = "<" if self._buf[4] & 0x10 else ">"
            (frag_len,) = struct.unpack(endian + "H", self._buf[8:10])
            if frag_len < 16:
                self._buf.clear()
                raise ProtocolError("dcerpc", f"frag_length {frag_len} is shorter than a header")
            if len(self._buf) < frag_len:
                break
            out.append(bytes(self._buf[:frag_len]))
            del self._buf[:frag_len]
        return out

    def reset(self) -> None:
        self._buf.clear()


def decode(frag: bytes) -> Fragment:
    if len(frag) < 16 or frag[0] != 5:
        raise ProtocolError("dcerpc", "truncated or foreign PDU")
    endian = "<" if frag[4] & 0x10 else ">"
    ptype, flags = frag[2], frag[3]
    frag_len, auth_len, call_id = struct.unpack(endian + "HHI", frag[8:16])
    if frag_len != len(frag):
        raise ProtocolError("dcerpc", "frag_length disagrees with the fragment")
    auth = None
    end = frag_len
    if auth_len:
        start = frag_len - auth_len - 8
        if start < 16:
            raise ProtocolError("dcerpc", "auth_length exceeds the fragment")
        a_type, a_level, pad, _res, ctx = struct.unpack(endian + "BBBBI", frag[start:start + 8])
        auth = AuthTrailer(a_type, a_level, pad, ctx, frag[start + 8:])
        end = max(16, start - pad) if ptype in (REQUEST, RESPONSE) else start
    return Fragment(ptype, flags, call_id, endian, frag[16:end], auth, frag_len)


def _uuid(b: bytes, endian: str) -> str:
    return str(uuid.UUID(bytes_le=b) if endian == "<" else uuid.UUID(bytes=b))


def bind_contexts(f: Fragment) -> list[tuple[int, str, str]]:
    """(context id, abstract syntax uuid, "major.minor") of a bind or alter_context."""
    e, b = f.endian, f.body
    try:
        n = b[8]
        pos, out = 12, []
        for _ in range(n):
            ctx_id, n_ts = struct.unpack(e + "HB", b[pos:pos + 3])
            iface = _uuid(b[pos + 4:pos + 20], e)
            major, minor = struct.unpack(e + "HH", b[pos + 20:pos + 24])
            out.append((ctx_id, iface, f"{major}.{minor}"))
            pos += 24 + 20 * n_ts
            if pos > len(b):
                raise ProtocolError("dcerpc", "bind context list overruns the PDU")
        return out
    except (IndexError, struct.error):
        raise ProtocolError("dcerpc", "truncated bind context list") from None


def bind_ack_results(f: Fragment) -> list[int]:
    """Per-context results of a bind_ack or alter_context_resp (0 = acceptance)."""
    e, b = f.endian, f.body
    try:
        (sec_len,) = struct.unpack(e + "H", b[8:10])
        pos = 10 + sec_len
        pos += (-(pos + 16)) % 4  # align to 4 from the start of the PDU
        n = b[pos]
        return [struct.unpack(e + "H", b[pos + 4 + 24 * i:pos + 6 + 24 * i])[0] for i in range(n)]
    except (IndexError, struct.error):
        raise ProtocolError("dcerpc", "truncated bind_ack result list") from None


def request_fields(f: Fragment) -> tuple[int, int, bytes]:
    """(context id, opnum, stub) of a request."""
    if len(f.body) < 8:
        raise ProtocolError("dcerpc", "truncated request")
    _alloc, ctx, opnum = struct.unpack(f.endian + "IHH", f.body[:8])
    stub = f.body[24:] if f.flags & PFC_OBJECT_UUID else f.body[8:]
    return ctx, opnum, stub


def response_stub(f: Fragment) -> bytes:
    if len(f.body) < 8:
        raise ProtocolError("dcerpc", "truncated response")
    return f.body[8:]


def fault_status(f: Fragment) -> int:
    if len(f.body) < 12:
        raise ProtocolError("dcerpc", "truncated fault")
    return struct.unpack(f.endian + "I", f.body[8:12])[0]
