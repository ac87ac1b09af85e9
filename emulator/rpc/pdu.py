"""Connection-oriented DCE/RPC PDUs (C706 chapter 12, MS-RPCE 2.2.2): framing, typed decoding
and the encoders a server needs.

Decoding is pure and bounds-checked so the capture reader can run it on bytes from any pcap:
the only exception that leaves this module on bad input is `ProtocolError`.
"""

from __future__ import annotations

import functools
import struct
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Union

from ..sansio import ProtocolError

LAYER = "rpc"

# C706 12.6.4.x packet types.
REQUEST, RESPONSE, FAULT = 0, 2, 3
BIND, BIND_ACK, BIND_NAK = 11, 12, 13
ALTER_CONTEXT, ALTER_CONTEXT_RESP, AUTH3 = 14, 15, 16
SHUTDOWN, CO_CANCEL, ORPHANED = 17, 18, 19

PTYPE_NAMES = {
    REQUEST: "request", RESPONSE: "response", FAULT: "fault", BIND: "bind", BIND_ACK: "bind_ack",
    BIND_NAK: "bind_nak", ALTER_CONTEXT: "alter_context", ALTER_CONTEXT_RESP: "alter_context_resp",
    AUTH3: "auth3", SHUTDOWN: "shutdown", CO_CANCEL: "co_cancel", ORPHANED: "orphaned",
}

# C706 12.6.3.1 pfc_flags; MS-RPCE 2.2.2.3 reuses 0x04 as PFC_SUPPORT_HEADER_SIGN in binds.
PFC_FIRST_FRAG = 0x01
PFC_LAST_FRAG = 0x02
PFC_PENDING_CANCEL = 0x04
PFC_SUPPORT_HEADER_SIGN = 0x04
PFC_CONC_MPX = 0x10
PFC_DID_NOT_EXECUTE = 0x20
PFC_MAYBE = 0x40
PFC_OBJECT_UUID = 0x80

HEADER_SIZE = 16
SEC_TRAILER_SIZE = 8
# Little-endian integers, ASCII characters, IEEE floats: the only representation we send.
DREP_LE = b"\x10\x00\x00\x00"

NDR32 = ("8a885d04-1ceb-11c9-9fe8-08002b104860", (2, 0))
NDR64 = ("71710533-beba-4937-8319-b5dbef9ccc36", (1, 0))
# MS-RPCE 3.3.1.5.3: a transfer syntax 6cb71c2c-9812-4540-XXXX-000000000000 is not a syntax but
# a bitmask of bind-time features carried in the fourth UUID field.
BTFN_PREFIX = "6cb71c2c-9812-4540-"
BTFN_SECURITY_CONTEXT_MULTIPLEXING = 0x01
BTFN_KEEP_CONNECTION_ON_ORPHAN = 0x02

# Presentation context results (C706 p_cont_def_result_t; MS-RPCE adds negotiate_ack).
RESULT_ACCEPTANCE, RESULT_USER_REJECTION, RESULT_PROVIDER_REJECTION, RESULT_NEGOTIATE_ACK = 0, 1, 2, 3
# p_provider_reason_t
REASON_NOT_SPECIFIED = 0
REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED = 1
REASON_TRANSFER_SYNTAXES_NOT_SUPPORTED = 2
REASON_LOCAL_LIMIT_EXCEEDED = 3
# p_reject_reason_t for bind_nak (C706 12.6.3.1, MS-RPCE 2.2.2.5).
NAK_REASON_NOT_SPECIFIED = 0
NAK_LOCAL_LIMIT_EXCEEDED = 2
NAK_PROTOCOL_VERSION_NOT_SUPPORTED = 4
NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED = 8
NAK_INVALID_CHECKSUM = 9


def _fail(reason: str) -> ProtocolError:
    return ProtocolError(LAYER, reason)


# ------------------------------------------------------------------------------ dataclasses

@dataclass(frozen=True)
class Header:
    rpc_vers: int
    rpc_vers_minor: int
    ptype: int
    pfc_flags: int
    drep: bytes
    frag_length: int
    auth_length: int
    call_id: int

    @property
    def little_endian(self) -> bool:
        return bool(self.drep[0] & 0x10)

    @property
    def ascii_ieee(self) -> bool:
        """ASCII characters and IEEE floats (C706 14.1: low nibble of octet 0, octet 1)."""
        return self.drep[0] & 0x0F == 0 and self.drep[1] == 0


@dataclass(frozen=True)
class AuthVerifier:
    """sec_trailer plus auth_value (MS-RPCE 2.2.2.11). The token may carry NTLM responses."""
    auth_type: int
    auth_level: int
    pad_length: int
    context_id: int
    token: bytes = field(repr=False)


@dataclass(frozen=True)
class SyntaxId:
    uuid: str
    version: tuple[int, int]


@dataclass(frozen=True)
class PresentationContext:
    context_id: int
    abstract: SyntaxId
    transfer_syntaxes: tuple[SyntaxId, ...]

    # The tuple view promised to callers: (context_id, uuid, (major, minor), [transfers]).
    def as_tuple(self) -> tuple[int, str, tuple[int, int], list[SyntaxId]]:
        return (self.context_id, self.abstract.uuid, self.abstract.version, list(self.transfer_syntaxes))


@dataclass(frozen=True)
class ContextResult:
    result: int
    reason: int
    transfer: SyntaxId


@dataclass(frozen=True)
class _Base:
    header: Header
    auth: AuthVerifier | None
    # The whole fragment as received, needed to verify a signature over the PDU.
    raw: bytes = field(repr=False, compare=False)

    @property
    def call_id(self) -> int:
        return self.header.call_id


@dataclass(frozen=True)
class Bind(_Base):
    max_xmit_frag: int = 0
    max_recv_frag: int = 0
    assoc_group_id: int = 0
    contexts: tuple[PresentationContext, ...] = ()


@dataclass(frozen=True)
class AlterContext(Bind):
    pass


@dataclass(frozen=True)
class BindAck(_Base):
    max_xmit_frag: int = 0
    max_recv_frag: int = 0
    assoc_group_id: int = 0
    secondary_address: str = ""
    results: tuple[ContextResult, ...] = ()


@dataclass(frozen=True)
class AlterContextResp(BindAck):
    pass


@dataclass(frozen=True)
class BindNak(_Base):
    reject_reason: int = 0
    versions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Request(_Base):
    alloc_hint: int = 0
    context_id: int = 0
    opnum: int = 0
    object_uuid: str | None = None
    # Offset of the stub in `raw`; the stub is still sealed at privacy level.
    stub_offset: int = 0
    stub: bytes = field(default=b"", repr=False)
    pad: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Response(_Base):
    alloc_hint: int = 0
    context_id: int = 0
    cancel_count: int = 0
    stub_offset: int = 0
    stub: bytes = field(default=b"", repr=False)
    pad: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Fault(_Base):
    alloc_hint: int = 0
    context_id: int = 0
    cancel_count: int = 0
    status: int = 0


@dataclass(frozen=True)
class Auth3(_Base):
    pass


@dataclass(frozen=True)
class Shutdown(_Base):
    pass


@dataclass(frozen=True)
class CoCancel(_Base):
    pass


@dataclass(frozen=True)
class Orphaned(_Base):
    pass


Pdu = Union[Bind, AlterContext, BindAck, AlterContextResp, BindNak, Request, Response, Fault,
            Auth3, Shutdown, CoCancel, Orphaned]


# ------------------------------------------------------------------------------ framing

class FragmentTooLarge(ProtocolError):
    """A fragment longer than the configured limit: bad input, and also a `limit` to report."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(LAYER, f"frag_length {size} exceeds {limit}")
        self.size, self.limit = size, limit


class FrameBuffer:
    """Cuts a byte stream into fragments by frag_length (C706 12.6.3.1), whatever the split."""

    def __init__(self, max_fragment_size: int = 65535) -> None:
        self.max_fragment_size = max_fragment_size
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self.append(data)
        out: list[bytes] = []
        while (frag := self.pop()) is not None:
            out.append(frag)
        return out

    def append(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        """The next complete fragment, or None. Checked against the limit in force now, so
        an engine that lowers it after a bind applies it to the very next fragment."""
        buf = self._buf
        have = len(buf)
        if have >= 2:
            self._check_version(buf)
        if have < 10:
            return None
        # frag_length in the sender's byte order (drep[0] bit 0x10: little-endian).
        frag_length = buf[8] | buf[9] << 8 if buf[4] & 0x10 else buf[8] << 8 | buf[9]
        if frag_length < HEADER_SIZE:
            raise _fail(f"frag_length {frag_length} is smaller than the header")
        if frag_length > self.max_fragment_size:
            raise FragmentTooLarge(frag_length, self.max_fragment_size)
        if have < frag_length:
            return None
        if have == frag_length:  # the common case: the buffer holds exactly one fragment
            frag = bytes(buf)
            buf.clear()
            return frag
        frag = bytes(buf[:frag_length])
        del buf[:frag_length]
        return frag

    @staticmethod
    def _check_version(buf: bytearray) -> None:
        # C706 12.6.3.1: rpc_vers 5; minor 0 or 1 (1 adds nothing the server must act on).
        if buf[0] != 5 or buf[1] not in (0, 1):
            raise _fail(f"rpc version {buf[0]}.{buf[1]} is not 5.0/5.1")

    @staticmethod
    def _frag_length(buf: bytearray) -> int:
        fmt = "<H" if buf[4] & 0x10 else ">H"
        return struct.unpack_from(fmt, buf, 8)[0]


# ------------------------------------------------------------------------------ decoding

@functools.lru_cache(maxsize=512)
def _uuid_text(raw: bytes, little_endian: bool) -> str:
    # UUIDs are NDR-encoded with the first three fields in the sender's byte order. Every bind
    # and alter_context carries the same few syntaxes (the interface, NDR, NDR64, the feature
    # negotiation one), and uuid.UUID plus str() was a visible part of decoding them in the
    # capture reader's profile: their text is remembered, in a bounded cache a client cannot grow.
    return str(_uuid.UUID(bytes_le=raw) if little_endian else _uuid.UUID(bytes=raw))


class _Reader:
    """Bounds-checked reads within [start, end) of a fragment."""

    def __init__(self, data: bytes, pos: int, end: int, endian: str) -> None:
        self.data, self.pos, self.end, self.e = data, pos, end, endian

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _fail(f"truncated {what}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack(self.e + "H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack(self.e + "I", self.take(4, what))[0]

    def uuid(self, what: str) -> str:
        return _uuid_text(self.take(16, what), self.e == "<")

    def syntax(self, what: str) -> SyntaxId:
        u = self.uuid(what)
        # p_syntax_id_t.if_version is one u_int32, major in the low 16 bits and minor in the
        # high 16 bits (C706 12.6.3.1): read as a whole, so a big-endian sender's order works.
        version = self.u32(what)
        return SyntaxId(u, (version & 0xFFFF, version >> 16))

    def align(self, n: int) -> None:
        self.pos = min(self.end, (self.pos + n - 1) // n * n)


def decode_header(fragment: bytes) -> Header:
    if len(fragment) < HEADER_SIZE:
        raise _fail("truncated header")
    vers, minor, ptype, flags = fragment[0], fragment[1], fragment[2], fragment[3]
    if vers != 5 or minor not in (0, 1):
        raise _fail(f"rpc version {vers}.{minor} is not 5.0/5.1")
    drep = bytes(fragment[4:8])
    e = "<" if drep[0] & 0x10 else ">"
    frag_length, auth_length, call_id = struct.unpack_from(e + "HHI", fragment, 8)
    if frag_length != len(fragment):
        raise _fail(f"frag_length {frag_length} does not match the fragment size {len(fragment)}")
    return Header(vers, minor, ptype, flags, drep, frag_length, auth_length, call_id)


def _decode_auth(fragment: bytes, h: Header, body_start: int, e: str) -> tuple[AuthVerifier | None, int]:
    """Return the verifier and where the body ends (the start of the sec_trailer)."""
    if h.auth_length == 0:
        return None, h.frag_length
    trailer = h.frag_length - h.auth_length - SEC_TRAILER_SIZE
    if trailer < body_start:
        raise _fail(f"auth_length {h.auth_length} overruns the fragment")
    r = _Reader(fragment, trailer, h.frag_length, e)
    auth_type, level, pad, _reserved = r.u8("sec_trailer"), r.u8("sec_trailer"), r.u8("sec_trailer"), r.u8("sec_trailer")
    ctx = r.u32("sec_trailer")
    token = fragment[trailer + SEC_TRAILER_SIZE:h.frag_length]
    if pad > trailer - body_start:
        raise _fail(f"auth_pad_length {pad} is longer than the body")
    return AuthVerifier(auth_type, level, pad, ctx, token), trailer


def _decode_contexts(r: _Reader) -> tuple[PresentationContext, ...]:
    n = r.u8("p_context_elem")
    r.take(3, "p_context_elem")
    out = []
    for _ in range(n):
        cid = r.u16("p_cont_elem")
        n_ts = r.u8("p_cont_elem")
        r.take(1, "p_cont_elem")
        abstract = r.syntax("abstract_syntax")
        transfers = tuple(r.syntax("transfer_syntax") for _ in range(n_ts))
        out.append(PresentationContext(cid, abstract, transfers))
    return tuple(out)


def _decode_results(r: _Reader) -> tuple[ContextResult, ...]:
    n = r.u8("p_result_list")
    r.take(3, "p_result_list")
    out = []
    for _ in range(n):
        result = r.u16("p_result")
        reason = r.u16("p_result")
        out.append(ContextResult(result, reason, r.syntax("transfer_syntax")))
    return tuple(out)


def decode(fragment: bytes) -> Pdu:
    """One complete fragment to a typed PDU. Raises only ProtocolError."""
    try:
        return _decode(bytes(fragment))
    except ProtocolError:
        raise
    except (struct.error, ValueError, IndexError) as exc:  # defence in depth: never leak others
        raise _fail(f"undecodable PDU ({type(exc).__name__})") from None


def _decode(fragment: bytes) -> Pdu:
    h = decode_header(fragment)
    e = "<" if h.little_endian else ">"
    pt = h.ptype
    if pt in (REQUEST, RESPONSE, FAULT):
        body_start = HEADER_SIZE + 8
        if pt == REQUEST and h.pfc_flags & PFC_OBJECT_UUID:
            body_start += 16
    else:
        body_start = HEADER_SIZE
    if body_start > h.frag_length:
        raise _fail(f"truncated {PTYPE_NAMES.get(pt, 'PDU')} header")
    auth, body_end = _decode_auth(fragment, h, body_start, e)
    common = dict(header=h, auth=auth, raw=fragment)
    r = _Reader(fragment, HEADER_SIZE, body_end, e)
    if pt == REQUEST:
        alloc_hint, cid, opnum = r.u32("request"), r.u16("request"), r.u16("request")
        obj = r.uuid("object") if h.pfc_flags & PFC_OBJECT_UUID else None
        pad = auth.pad_length if auth else 0
        return Request(**common, alloc_hint=alloc_hint, context_id=cid, opnum=opnum, object_uuid=obj,
                       stub_offset=r.pos, stub=fragment[r.pos:body_end - pad],
                       pad=fragment[body_end - pad:body_end])
    if pt == RESPONSE:
        alloc_hint, cid, cancel = r.u32("response"), r.u16("response"), r.u8("response")
        r.take(1, "response")
        pad = auth.pad_length if auth else 0
        return Response(**common, alloc_hint=alloc_hint, context_id=cid, cancel_count=cancel,
                        stub_offset=r.pos, stub=fragment[r.pos:body_end - pad],
                        pad=fragment[body_end - pad:body_end])
    if pt == FAULT:
        alloc_hint, cid, cancel = r.u32("fault"), r.u16("fault"), r.u8("fault")
        r.take(1, "fault")
        return Fault(**common, alloc_hint=alloc_hint, context_id=cid, cancel_count=cancel,
                     status=r.u32("fault status"))
    if pt in (BIND, ALTER_CONTEXT):
        max_x, max_r, group = r.u16(PTYPE_NAMES[pt]), r.u16(PTYPE_NAMES[pt]), r.u32(PTYPE_NAMES[pt])
        cls = Bind if pt == BIND else AlterContext
        return cls(**common, max_xmit_frag=max_x, max_recv_frag=max_r, assoc_group_id=group,
                   contexts=_decode_contexts(r))
    if pt in (BIND_ACK, ALTER_CONTEXT_RESP):
        max_x, max_r, group = r.u16(PTYPE_NAMES[pt]), r.u16(PTYPE_NAMES[pt]), r.u32(PTYPE_NAMES[pt])
        n = r.u16("sec_addr")
        addr = r.take(n, "sec_addr").split(b"\x00", 1)[0].decode("ascii", "replace")
        r.align(4)
        cls2 = BindAck if pt == BIND_ACK else AlterContextResp
        return cls2(**common, max_xmit_frag=max_x, max_recv_frag=max_r, assoc_group_id=group,
                    secondary_address=addr, results=_decode_results(r))
    if pt == BIND_NAK:
        reason = r.u16("bind_nak")
        versions: list[tuple[int, int]] = []
        if r.pos < r.end:
            n = r.u8("bind_nak versions")
            for _ in range(n):
                versions.append((r.u8("bind_nak versions"), r.u8("bind_nak versions")))
        return BindNak(**common, reject_reason=reason, versions=tuple(versions))
    simple = {AUTH3: Auth3, SHUTDOWN: Shutdown, CO_CANCEL: CoCancel, ORPHANED: Orphaned}
    if pt in simple:
        return simple[pt](**common)
    raise _fail(f"unknown ptype {pt}")


# ------------------------------------------------------------------------------ encoding

def uuid_bytes(u: str) -> bytes:
    return _uuid.UUID(u).bytes_le


def syntax_bytes(s: SyntaxId | tuple[str, tuple[int, int]]) -> bytes:
    u, (major, minor) = (s.uuid, s.version) if isinstance(s, SyntaxId) else s
    return uuid_bytes(u) + struct.pack("<HH", major, minor)


NULL_SYNTAX = SyntaxId("00000000-0000-0000-0000-000000000000", (0, 0))


def header_bytes(ptype: int, flags: int, frag_length: int, auth_length: int, call_id: int) -> bytes:
    return struct.pack("<BBBB4sHHI", 5, 0, ptype, flags, DREP_LE, frag_length, auth_length, call_id)


def sec_trailer_bytes(auth_type: int, auth_level: int, pad_length: int, context_id: int) -> bytes:
    return struct.pack("<BBBBI", auth_type, auth_level, pad_length, 0, context_id)


def assemble(ptype: int, flags: int, call_id: int, body: bytes,
             auth: tuple[int, int, int, bytes] | None = None) -> bytes:
    """A whole PDU. `auth` = (auth_type, auth_level, context_id, token): the body is padded to a
    4-byte boundary so the sec_trailer is aligned (MS-RPCE 2.2.2.11)."""
    if auth is None:
        return header_bytes(ptype, flags, HEADER_SIZE + len(body), 0, call_id) + body
    auth_type, level, ctx, token = auth
    pad = (-(HEADER_SIZE + len(body))) % 4
    trailer = sec_trailer_bytes(auth_type, level, pad, ctx)
    total = HEADER_SIZE + len(body) + pad + SEC_TRAILER_SIZE + len(token)
    return header_bytes(ptype, flags, total, len(token), call_id) + body + b"\x00" * pad + trailer + token


def bind_ack_body(max_xmit: int, max_recv: int, assoc_group: int, secondary_address: str,
                  results: list[ContextResult]) -> bytes:
    addr = secondary_address.encode("ascii", "replace") + b"\x00"
    b = struct.pack("<HHIH", max_xmit, max_recv, assoc_group, len(addr)) + addr
    b += b"\x00" * ((-(HEADER_SIZE + len(b))) % 4)
    b += struct.pack("<B3x", len(results))
    for res in results:
        b += struct.pack("<HH", res.result, res.reason) + syntax_bytes(res.transfer)
    return b


def bind_nak_body(reason: int) -> bytes:
    # p_rt_versions_supported: we speak 5.0 only.
    return struct.pack("<HBBB", reason, 1, 5, 0)


def fault_body(status: int, context_id: int = 0) -> bytes:
    # alloc_hint, p_cont_id, cancel_count, reserved, status, reserved (C706 12.6.4.7).
    return struct.pack("<IHBBII", 32, context_id, 0, 0, status, 0)


def response_prefix(alloc_hint: int, context_id: int) -> bytes:
    return struct.pack("<IHBB", alloc_hint, context_id, 0, 0)


def replace_auth_value(fragment: bytes, token: bytes) -> bytes:
    """`fragment` with its auth_value replaced by `token`: header, body, auth padding and
    sec_trailer kept as they are, frag_length and auth_length set for the new token
    (MS-RPCE 2.2.2.11). Used by replay to put a re-authored NTLM leg into a captured PDU."""
    h = decode_header(fragment)
    if h.auth_length == 0:
        raise _fail("the PDU carries no auth verifier")
    keep = h.frag_length - h.auth_length
    if keep < HEADER_SIZE + SEC_TRAILER_SIZE:
        raise _fail(f"auth_length {h.auth_length} overruns the fragment")
    e = "<" if h.little_endian else ">"
    head = bytearray(fragment[:keep])
    struct.pack_into(e + "HH", head, 8, keep + len(token), len(token))
    return bytes(head) + token
