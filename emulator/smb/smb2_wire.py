"""SMB2 wire codec (MS-SMB2 2.2): the 64-byte header, request decoders and response encoders.

Every decoder checks StructureSize, offsets and lengths against the bytes it was given and
raises only `ProtocolError`; the engine answers STATUS_INVALID_PARAMETER (or closes for a broken
header). Offsets in SMB2 bodies are counted from the start of the SMB2 header, so decoders take
the whole message (header included) and the body offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..sansio import ProtocolError

LAYER = "smb"
PROTOCOL_ID = b"\xfeSMB"
SMB1_PROTOCOL_ID = b"\xffSMB"
TRANSFORM_PROTOCOL_ID = b"\xfdSMB"
HEADER_SIZE = 64

# Commands (MS-SMB2 2.2.1.2)
NEGOTIATE, SESSION_SETUP, LOGOFF, TREE_CONNECT, TREE_DISCONNECT = 0, 1, 2, 3, 4
CREATE, CLOSE, FLUSH, READ, WRITE, LOCK, IOCTL, CANCEL, ECHO = 5, 6, 7, 8, 9, 10, 11, 12, 13
QUERY_DIRECTORY, CHANGE_NOTIFY, QUERY_INFO, SET_INFO, OPLOCK_BREAK = 14, 15, 16, 17, 18
COMMAND_NAMES = {
    NEGOTIATE: "negotiate", SESSION_SETUP: "session_setup", LOGOFF: "logoff",
    TREE_CONNECT: "tree_connect", TREE_DISCONNECT: "tree_disconnect", CREATE: "create",
    CLOSE: "close", FLUSH: "flush", READ: "read", WRITE: "write", LOCK: "lock", IOCTL: "ioctl",
    CANCEL: "cancel", ECHO: "echo", QUERY_DIRECTORY: "query_directory",
    CHANGE_NOTIFY: "change_notify", QUERY_INFO: "query_info", SET_INFO: "set_info",
    OPLOCK_BREAK: "oplock_break",
}

# Header flags (MS-SMB2 2.2.1)
FLAGS_SERVER_TO_REDIR = 0x00000001
FLAGS_ASYNC_COMMAND = 0x00000002
FLAGS_RELATED_OPERATIONS = 0x00000004
FLAGS_SIGNED = 0x00000008
FLAGS_DFS_OPERATIONS = 0x10000000

# Dialects (MS-SMB2 2.2.3)
DIALECT_202, DIALECT_210, DIALECT_300, DIALECT_302, DIALECT_311 = 0x0202, 0x0210, 0x0300, 0x0302, 0x0311
DIALECT_WILDCARD = 0x02FF
SUPPORTED_DIALECTS = (DIALECT_202, DIALECT_210, DIALECT_300, DIALECT_302, DIALECT_311)

# Security mode and capabilities
NEGOTIATE_SIGNING_ENABLED = 0x0001
NEGOTIATE_SIGNING_REQUIRED = 0x0002
GLOBAL_CAP_DFS = 0x00000001
GLOBAL_CAP_LEASING = 0x00000002
GLOBAL_CAP_LARGE_MTU = 0x00000004
GLOBAL_CAP_ENCRYPTION = 0x00000040

# Negotiate contexts (MS-SMB2 2.2.3.1)
PREAUTH_INTEGRITY_CAPABILITIES = 0x0001
ENCRYPTION_CAPABILITIES = 0x0002
SIGNING_CAPABILITIES = 0x0008
HASH_SHA512 = 0x0001
SIGNING_HMAC_SHA256, SIGNING_AES_CMAC, SIGNING_AES_GMAC = 0, 1, 2
# Ciphers (MS-SMB2 2.2.3.1.2); 0 in a 3.1.1 answer: none in common.
CIPHER_NONE, CIPHER_AES128_CCM, CIPHER_AES128_GCM, CIPHER_AES256_CCM, CIPHER_AES256_GCM = 0, 1, 2, 3, 4
CIPHER_NAMES = {CIPHER_AES128_CCM: "AES-128-CCM", CIPHER_AES128_GCM: "AES-128-GCM",
                CIPHER_AES256_CCM: "AES-256-CCM", CIPHER_AES256_GCM: "AES-256-GCM"}

# Session flags
SESSION_FLAG_IS_GUEST = 0x0001
SESSION_FLAG_IS_NULL = 0x0002
SESSION_FLAG_ENCRYPT_DATA = 0x0004
SESSION_SETUP_FLAG_BINDING = 0x01

SHARE_TYPE_PIPE = 0x02
FILE_ID_ANY = b"\xff" * 16          # "the FileId of the previous operation" in a related compound

FSCTL_PIPE_TRANSCEIVE = 0x0011C017
FSCTL_VALIDATE_NEGOTIATE_INFO = 0x00140204
IOCTL_IS_FSCTL = 0x00000001

HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
assert HEADER.size == HEADER_SIZE


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise ProtocolError(LAYER, reason)


@dataclass
class Header:
    command: int
    message_id: int = 0
    status: int = 0                 # ChannelSequence in requests (3.x); ignored there
    credit_charge: int = 0
    credits: int = 0                # CreditRequest in requests, CreditResponse in responses
    flags: int = 0
    next_command: int = 0
    tree_id: int = 0
    async_id: int = 0
    session_id: int = 0
    signature: bytes = field(default=b"\x00" * 16, repr=False)

    @property
    def is_async(self) -> bool:
        return bool(self.flags & FLAGS_ASYNC_COMMAND)

    def pack(self) -> bytes:
        if self.is_async:
            lo, hi = self.async_id & 0xFFFFFFFF, self.async_id >> 32
        else:
            lo, hi = 0, self.tree_id
        return HEADER.pack(PROTOCOL_ID, HEADER_SIZE, self.credit_charge, self.status, self.command,
                           self.credits, self.flags, self.next_command, self.message_id, lo, hi,
                           self.session_id, self.signature)


def parse_header(message: bytes) -> Header:
    """The header of one SMB2 message (compound element). A broken header means the stream
    cannot be trusted any more, so the engine closes."""
    _need(len(message) >= HEADER_SIZE, "smb2 message shorter than its header")
    (proto, size, charge, status, command, credits, flags, next_cmd, mid, lo, hi, sid,
     sig) = HEADER.unpack_from(message)
    _need(proto == PROTOCOL_ID, "bad smb2 protocol id")
    _need(size == HEADER_SIZE, "bad smb2 header StructureSize")
    h = Header(command=command, message_id=mid, status=status, credit_charge=charge,
               credits=credits, flags=flags, next_command=next_cmd, session_id=sid, signature=sig)
    if flags & FLAGS_ASYNC_COMMAND:
        h.async_id = lo | (hi << 32)
    else:
        h.tree_id = hi
    return h


def split_compound(message: bytes) -> list[bytes]:
    """Split a compound request on NextCommand (MS-SMB2 3.3.5.2.7): each element starts 8-byte
    aligned and holds at least a header; the last one has NextCommand 0."""
    parts = []
    pos = 0
    while True:
        h = parse_header(message[pos:])
        if h.next_command == 0:
            parts.append(message[pos:])
            return parts
        _need(h.next_command % 8 == 0, "compound NextCommand not 8-byte aligned")
        _need(h.next_command >= HEADER_SIZE, "compound NextCommand inside the header")
        _need(pos + h.next_command < len(message), "compound NextCommand beyond the message")
        parts.append(message[pos:pos + h.next_command])
        pos += h.next_command
        _need(len(parts) < 64, "too many compounded requests")


# ---------------------------------------------------------------- body helpers

class Body:
    """Bounds-checked access to one request body. `msg` is the element including its header."""

    def __init__(self, msg: bytes, structure_size: int, fixed: struct.Struct) -> None:
        self.msg = msg
        _need(len(msg) >= HEADER_SIZE + fixed.size, "request body shorter than its StructureSize")
        (size,) = struct.unpack_from("<H", msg, HEADER_SIZE)
        _need(size == structure_size, f"bad StructureSize {size} (want {structure_size})")
        self.values = fixed.unpack_from(msg, HEADER_SIZE)

    def buffer(self, offset: int, length: int, what: str) -> bytes:
        if length == 0:
            return b""
        _need(offset >= HEADER_SIZE, f"{what} offset points into the header")
        _need(offset + length <= len(self.msg), f"{what} offset/length beyond the message")
        return self.msg[offset:offset + length]


# ---------------------------------------------------------------- NEGOTIATE

NEGOTIATE_REQ = struct.Struct("<HHHHI16sIHH")          # 36 bytes, then Dialects


@dataclass
class NegotiateContext:
    type: int
    data: bytes


@dataclass
class NegotiateRequest:
    security_mode: int
    capabilities: int
    client_guid: bytes
    dialects: list[int]
    contexts: list[NegotiateContext]


def parse_negotiate(msg: bytes) -> NegotiateRequest:
    b = Body(msg, 36, NEGOTIATE_REQ)
    _, count, sec_mode, _, caps, guid, ctx_off, ctx_count, _ = b.values
    _need(1 <= count <= 64, "negotiate DialectCount out of range")
    start = HEADER_SIZE + NEGOTIATE_REQ.size
    _need(start + 2 * count <= len(msg), "negotiate dialects beyond the message")
    dialects = list(struct.unpack_from(f"<{count}H", msg, start))
    contexts: list[NegotiateContext] = []
    if DIALECT_311 in dialects and ctx_count:
        _need(ctx_count <= 32, "too many negotiate contexts")
        _need(ctx_off % 8 == 0 and ctx_off >= start + 2 * count, "bad NegotiateContextOffset")
        pos = ctx_off
        for i in range(ctx_count):
            _need(pos + 8 <= len(msg), "negotiate context beyond the message")
            ctype, dlen = struct.unpack_from("<HH", msg, pos)
            _need(pos + 8 + dlen <= len(msg), "negotiate context data beyond the message")
            contexts.append(NegotiateContext(ctype, msg[pos + 8:pos + 8 + dlen]))
            pos += 8 + dlen
            pos += -pos % 8
    return NegotiateRequest(sec_mode, caps, guid, dialects, contexts)


def parse_preauth_context(data: bytes) -> list[int]:
    _need(len(data) >= 4, "short PREAUTH_INTEGRITY_CAPABILITIES")
    count, salt_len = struct.unpack_from("<HH", data)
    _need(count >= 1 and 4 + 2 * count + salt_len <= len(data), "bad PREAUTH_INTEGRITY_CAPABILITIES")
    return list(struct.unpack_from(f"<{count}H", data, 4))


def parse_id_list_context(data: bytes, what: str) -> list[int]:
    """ENCRYPTION_CAPABILITIES and SIGNING_CAPABILITIES share the Count + UINT16[] shape."""
    _need(len(data) >= 2, f"short {what}")
    (count,) = struct.unpack_from("<H", data)
    _need(count >= 1 and 2 + 2 * count <= len(data), f"bad {what}")
    return list(struct.unpack_from(f"<{count}H", data, 2))


def build_negotiate_context(ctype: int, data: bytes) -> bytes:
    return struct.pack("<HHI", ctype, len(data), 0) + data


NEGOTIATE_RESP = struct.Struct("<HHHH16sIIIIQQHHI")      # 64 bytes, then Buffer


def build_negotiate_response(*, security_mode: int, dialect: int, server_guid: bytes,
                             capabilities: int, max_size: int, system_time: int,
                             security_blob: bytes, contexts: list[bytes]) -> bytes:
    buf_off = HEADER_SIZE + NEGOTIATE_RESP.size
    body_tail = security_blob
    ctx_off = 0
    if contexts:
        pad = -(buf_off + len(body_tail)) % 8
        body_tail += b"\x00" * pad
        ctx_off = buf_off + len(body_tail)
        for i, c in enumerate(contexts):
            body_tail += c
            if i + 1 < len(contexts):
                body_tail += b"\x00" * (-len(c) % 8)
    fixed = NEGOTIATE_RESP.pack(65, security_mode, dialect, len(contexts), server_guid,
                                capabilities, max_size, max_size, max_size, system_time, 0,
                                buf_off, len(security_blob), ctx_off)
    return fixed + (body_tail or b"\x00")


@dataclass
class NegotiateResponse:
    security_mode: int
    dialect: int
    contexts: list[NegotiateContext]


def parse_negotiate_response(msg: bytes) -> NegotiateResponse:
    """A NEGOTIATE response as a client reads it: the dialect and, for 3.1.1, the negotiate
    contexts (MS-SMB2 2.2.4). Used by replay to sign as the server will verify."""
    b = Body(msg, 65, NEGOTIATE_RESP)
    (_, sec_mode, dialect, ctx_count, _, _, _, _, _, _, _, _, _, ctx_off) = b.values
    contexts: list[NegotiateContext] = []
    if dialect == DIALECT_311 and ctx_count:
        _need(ctx_count <= 32, "too many negotiate contexts")
        pos = ctx_off
        for _ in range(ctx_count):
            _need(pos + 8 <= len(msg), "negotiate context beyond the message")
            ctype, dlen = struct.unpack_from("<HH", msg, pos)
            _need(pos + 8 + dlen <= len(msg), "negotiate context data beyond the message")
            contexts.append(NegotiateContext(ctype, msg[pos + 8:pos + 8 + dlen]))
            pos += 8 + dlen
            pos += -pos % 8
    return NegotiateResponse(sec_mode, dialect, contexts)


# ---------------------------------------------------------------- SESSION_SETUP

SESSION_SETUP_REQ = struct.Struct("<HBBIIHHQ")            # 24 bytes


@dataclass
class SessionSetupRequest:
    flags: int
    security_mode: int
    previous_session_id: int
    token: bytes = field(repr=False)


def parse_session_setup(msg: bytes) -> SessionSetupRequest:
    b = Body(msg, 25, SESSION_SETUP_REQ)
    _, flags, sec_mode, _, _, off, length, prev = b.values
    return SessionSetupRequest(flags, sec_mode, prev, b.buffer(off, length, "security buffer"))


def parse_session_setup_response(msg: bytes) -> tuple[int, bytes]:
    """(SessionFlags, security buffer) of a SESSION_SETUP response (MS-SMB2 2.2.6), as a client
    reads it. An error response (StructureSize 9 too) has no buffer."""
    _need(len(msg) >= HEADER_SIZE + 8, "session setup response shorter than its body")
    size, flags, off, length = struct.unpack_from("<HHHH", msg, HEADER_SIZE)
    _need(size == 9, f"bad StructureSize {size} (want 9)")
    if length == 0:
        return flags, b""
    _need(off >= HEADER_SIZE and off + length <= len(msg), "security buffer beyond the message")
    return flags, msg[off:off + length]


def build_session_setup_response(session_flags: int, token: bytes) -> bytes:
    off = HEADER_SIZE + 8
    return struct.pack("<HHHH", 9, session_flags, off if token else 0, len(token)) + (token or b"\x00")


# ---------------------------------------------------------------- small fixed bodies

SIMPLE_REQ = struct.Struct("<HH")                         # LOGOFF, TREE_DISCONNECT, ECHO, CANCEL


def parse_simple(msg: bytes) -> None:
    Body(msg, 4, SIMPLE_REQ)


def build_simple_response() -> bytes:
    return struct.pack("<HH", 4, 0)


def build_error_response() -> bytes:
    # MS-SMB2 2.2.2: StructureSize 9, no error contexts, ByteCount 0, one byte of ErrorData.
    return struct.pack("<HBBI", 9, 0, 0, 0) + b"\x00"


# ---------------------------------------------------------------- TREE_CONNECT

TREE_CONNECT_REQ = struct.Struct("<HHHH")


def parse_tree_connect(msg: bytes) -> str:
    b = Body(msg, 9, TREE_CONNECT_REQ)
    _, _, off, length = b.values
    _need(length % 2 == 0 and 0 < length <= 1024, "bad tree connect path length")
    raw = b.buffer(off, length, "tree connect path")
    try:
        return raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise ProtocolError(LAYER, "tree connect path is not UTF-16") from None


def build_tree_connect_response(share_type: int, share_flags: int, capabilities: int,
                                maximal_access: int) -> bytes:
    return struct.pack("<HBBIII", 16, share_type, 0, share_flags, capabilities, maximal_access)


# ---------------------------------------------------------------- CREATE

CREATE_REQ = struct.Struct("<HBBIQQIIIIIHHII")           # 56 bytes


@dataclass
class CreateRequest:
    desired_access: int
    create_disposition: int
    create_options: int
    name: str


def parse_create(msg: bytes) -> CreateRequest:
    b = Body(msg, 57, CREATE_REQ)
    (_, _, _, _, _, _, access, _, _, disposition, options, name_off, name_len,
     ctx_off, ctx_len) = b.values
    _need(name_len % 2 == 0 and name_len <= 2048, "bad create name length")
    raw = b.buffer(name_off, name_len, "create name")
    if ctx_len:
        b.buffer(ctx_off, ctx_len, "create contexts")     # bounds check only; we grant none
    try:
        name = raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise ProtocolError(LAYER, "create name is not UTF-16") from None
    return CreateRequest(access, disposition, options, name)


CREATE_RESP = struct.Struct("<HBBIQQQQQQII16sII")        # 88 bytes
FILE_ATTRIBUTE_NORMAL = 0x00000080
FILE_OPENED = 0x00000001


def build_create_response(file_id: bytes, end_of_file: int = 0, allocation: int = 0) -> bytes:
    return CREATE_RESP.pack(89, 0, 0, FILE_OPENED, 0, 0, 0, 0, allocation, end_of_file,
                            FILE_ATTRIBUTE_NORMAL, 0, file_id, 0, 0) + b"\x00"


# ---------------------------------------------------------------- CLOSE

CLOSE_REQ = struct.Struct("<HHI16s")                      # 24 bytes


def parse_close(msg: bytes) -> bytes:
    return Body(msg, 24, CLOSE_REQ).values[3]


def build_close_response() -> bytes:
    return struct.pack("<HHIQQQQQQI", 60, 0, 0, 0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------- READ / WRITE

READ_REQ = struct.Struct("<HBBIQ16sIIIHH")                # 48 bytes


@dataclass
class ReadRequest:
    length: int
    offset: int
    file_id: bytes
    minimum: int


def parse_read(msg: bytes) -> ReadRequest:
    b = Body(msg, 49, READ_REQ)
    _, _, _, length, offset, file_id, minimum, _, _, ci_off, ci_len = b.values
    if ci_len:
        b.buffer(ci_off, ci_len, "read channel info")
    return ReadRequest(length, offset, file_id, minimum)


def build_read_response(data: bytes) -> bytes:
    off = HEADER_SIZE + 16
    return struct.pack("<HBBIII", 17, off, 0, len(data), 0, 0) + (data or b"\x00")


WRITE_REQ = struct.Struct("<HHIQ16sIIHHI")                # 48 bytes


@dataclass
class WriteRequest:
    offset: int
    file_id: bytes
    data: bytes = field(repr=False)


def parse_write(msg: bytes) -> WriteRequest:
    b = Body(msg, 49, WRITE_REQ)
    _, data_off, length, offset, file_id, _, _, ci_off, ci_len, _ = b.values
    if ci_len:
        b.buffer(ci_off, ci_len, "write channel info")
    return WriteRequest(offset, file_id, b.buffer(data_off, length, "write data"))


def build_write_response(count: int) -> bytes:
    return struct.pack("<HHIIHH", 17, 0, count, 0, 0, 0) + b"\x00"


# ---------------------------------------------------------------- IOCTL

IOCTL_REQ = struct.Struct("<HHI16sIIIIIIII")              # 56 bytes


@dataclass
class IoctlRequest:
    ctl_code: int
    file_id: bytes
    input: bytes = field(repr=False)
    max_output: int
    flags: int


def parse_ioctl(msg: bytes) -> IoctlRequest:
    b = Body(msg, 57, IOCTL_REQ)
    (_, _, code, file_id, in_off, in_count, _max_in, out_off, out_count, max_out, flags,
     _) = b.values
    data = b.buffer(in_off, in_count, "ioctl input")
    if out_count:
        b.buffer(out_off, out_count, "ioctl output")
    return IoctlRequest(code, file_id, data, max_out, flags)


IOCTL_RESP = struct.Struct("<HHI16sIIIIII")               # 48 bytes


def build_ioctl_response(ctl_code: int, file_id: bytes, output: bytes) -> bytes:
    off = HEADER_SIZE + IOCTL_RESP.size
    return IOCTL_RESP.pack(49, 0, ctl_code, file_id, off, 0, off, len(output), 0, 0) + output


# ---------------------------------------------------------------- QUERY_INFO

QUERY_INFO_REQ = struct.Struct("<HBBIHHIII16s")           # 40 bytes


@dataclass
class QueryInfoRequest:
    info_type: int
    info_class: int
    output_length: int
    file_id: bytes


def parse_query_info(msg: bytes) -> QueryInfoRequest:
    b = Body(msg, 41, QUERY_INFO_REQ)
    _, info_type, info_class, out_len, in_off, _, in_len, _, _, file_id = b.values
    b.buffer(in_off, in_len, "query info input")
    return QueryInfoRequest(info_type, info_class, out_len, file_id)


def build_query_info_response(data: bytes) -> bytes:
    off = HEADER_SIZE + 8
    return struct.pack("<HHI", 9, off, len(data)) + (data or b"\x00")


# ---------------------------------------------------------------- FSCTL_VALIDATE_NEGOTIATE_INFO

@dataclass
class ValidateNegotiateInfo:
    capabilities: int
    guid: bytes
    security_mode: int
    dialects: list[int]


def parse_validate_negotiate(data: bytes) -> ValidateNegotiateInfo:
    _need(len(data) >= 24, "short VALIDATE_NEGOTIATE_INFO")
    caps, guid, mode, count = struct.unpack_from("<I16sHH", data)
    _need(1 <= count <= 64 and 24 + 2 * count <= len(data), "bad VALIDATE_NEGOTIATE_INFO dialects")
    return ValidateNegotiateInfo(caps, guid, mode, list(struct.unpack_from(f"<{count}H", data, 24)))


def build_validate_negotiate_response(capabilities: int, guid: bytes, security_mode: int,
                                      dialect: int) -> bytes:
    return struct.pack("<I16sHH", capabilities, guid, security_mode, dialect)


# ---------------------------------------------------------------- SMB1 multi-protocol negotiate

SMB1_COM_NEGOTIATE = 0x72


# ---------------------------------------------------------------- transform header (MS-SMB2 2.2.41)

TRANSFORM_HEADER = struct.Struct("<4s16s16sIHHQ")
TRANSFORM_HEADER_SIZE = TRANSFORM_HEADER.size         # 52
TRANSFORM_AAD_OFFSET = 20        # the AEAD's associated data: the header from Nonce to its end
TRANSFORM_FLAG_ENCRYPTED = 0x0001   # Flags (3.1.1) / EncryptionAlgorithm (3.0, 3.0.2): AES


@dataclass
class TransformHeader:
    signature: bytes = field(repr=False)       # the AEAD tag
    nonce: bytes
    original_size: int
    flags: int
    session_id: int

    def pack(self) -> bytes:
        return TRANSFORM_HEADER.pack(TRANSFORM_PROTOCOL_ID, self.signature, self.nonce, self.original_size,
                                     0, self.flags, self.session_id)


def parse_transform_header(message: bytes) -> TransformHeader:
    _need(len(message) >= TRANSFORM_HEADER_SIZE, "transform message shorter than its header")
    proto, sig, nonce, size, _reserved, flags, sid = TRANSFORM_HEADER.unpack_from(message)
    _need(proto == TRANSFORM_PROTOCOL_ID, "bad transform protocol id")
    return TransformHeader(sig, nonce, size, flags, sid)


def smb1_negotiate_dialects(message: bytes) -> list[str] | None:
    """The dialect strings of an SMB1 NEGOTIATE (MS-CIFS 2.2.4.52.1), or None when the message
    is some other SMB1 command. Raises ProtocolError when it is a NEGOTIATE but malformed."""
    if len(message) < 32 or message[:4] != SMB1_PROTOCOL_ID or message[4] != SMB1_COM_NEGOTIATE:
        return None
    _need(len(message) >= 35, "short SMB1 negotiate")
    word_count = message[32]
    pos = 33 + 2 * word_count
    _need(pos + 2 <= len(message), "SMB1 negotiate words beyond the message")
    (byte_count,) = struct.unpack_from("<H", message, pos)
    data = message[pos + 2:pos + 2 + byte_count]
    _need(len(data) == byte_count, "SMB1 negotiate ByteCount beyond the message")
    dialects = []
    i = 0
    while i < len(data):
        _need(data[i] == 0x02, "SMB1 negotiate dialect without BufferFormat 0x02")
        end = data.find(b"\x00", i + 1)
        _need(end != -1, "SMB1 negotiate dialect not NUL-terminated")
        dialects.append(data[i + 1:end].decode("latin-1"))
        i = end + 1
    return dialects


# ---------------------------------------------------------------- responses as a client or observer reads them
#
# The server builds these; the capture reader (and a client) reads them. Each checks its
# StructureSize and keeps every buffer inside the message, like the request parsers above.

TREE_CONNECT_RESP = struct.Struct("<HBBIII")              # 16 bytes


def parse_tree_connect_response(msg: bytes) -> int:
    """ShareType of a successful TREE_CONNECT response (MS-SMB2 2.2.10)."""
    return Body(msg, 16, TREE_CONNECT_RESP).values[1]


def parse_create_response(msg: bytes) -> bytes:
    """The FileId of a successful CREATE response (MS-SMB2 2.2.14)."""
    return Body(msg, 89, CREATE_RESP).values[12]


READ_RESP = struct.Struct("<HBBIII")                      # 16 bytes


def parse_read_response(msg: bytes) -> bytes:
    """The data of a READ response (MS-SMB2 2.2.20); DataOffset is a single byte."""
    b = Body(msg, 17, READ_RESP)
    _, off, _, length, _, _ = b.values
    return b.buffer(off, length, "read data")


def parse_ioctl_response(msg: bytes) -> tuple[int, bytes, bytes]:
    """(CtlCode, FileId, output) of an IOCTL response (MS-SMB2 2.2.32)."""
    b = Body(msg, 49, IOCTL_RESP)
    _, _, code, file_id, _in_off, _in_count, out_off, out_count, _, _ = b.values
    return code, file_id, b.buffer(out_off, out_count, "ioctl output")


TRANSFORM_HEADER = struct.Struct("<4s16s16sIHHQ")        # 52 bytes (MS-SMB2 2.2.41)


def parse_transform_session(message: bytes) -> int:
    """The SessionId of an SMB2 TRANSFORM_HEADER (an encrypted message): all that can be read
    of it without the session's keys."""
    _need(len(message) >= TRANSFORM_HEADER.size, "transform header shorter than 52 bytes")
    proto, _sig, _nonce, _size, _reserved, _flags, session_id = TRANSFORM_HEADER.unpack_from(message)
    _need(proto == TRANSFORM_PROTOCOL_ID, "bad transform protocol id")
    return session_id
