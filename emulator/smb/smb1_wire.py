"""SMB1 (NT LM 0.12) wire format: the header, command blocks, AndX chains, error codes and
signing, for the IPC$ subset the emulator serves.

Every decoder checks word counts, byte counts and offsets against the message before it reads,
and raises only `ProtocolError`; the engine turns that into an NT status or a closed
connection. References are to MS-CIFS (the base protocol) and MS-SMB (extended security and
the NT LM 0.12 extensions).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..sansio import ProtocolError
# NT status values live in ntstatus.py; re-exported here for the SMB1 engine and its tests.
from .ntstatus import (  # noqa: F401  (re-exported)
    STATUS_ACCESS_DENIED, STATUS_BAD_DEVICE_TYPE, STATUS_BAD_NETWORK_NAME, STATUS_BUFFER_OVERFLOW,
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER, STATUS_INVALID_SMB,
    STATUS_LOGON_FAILURE, STATUS_MORE_PROCESSING_REQUIRED, STATUS_NOT_SUPPORTED,
    STATUS_OBJECT_NAME_NOT_FOUND, STATUS_PIPE_DISCONNECTED, STATUS_SMB_BAD_FID, STATUS_SMB_BAD_TID,
    STATUS_SMB_BAD_UID, STATUS_SUCCESS, STATUS_USER_SESSION_DELETED)

LAYER = "smb"
MAGIC = b"\xffSMB"
DIALECT = "NT LM 0.12"

# ---------------------------------------------------------------- commands (MS-CIFS 2.2.2.1)
COM_CLOSE = 0x04
COM_TRANSACTION = 0x25
COM_TRANSACTION_SECONDARY = 0x26
COM_ECHO = 0x2B
COM_READ_ANDX = 0x2E
COM_WRITE_ANDX = 0x2F
COM_TREE_DISCONNECT = 0x71
COM_NEGOTIATE = 0x72
COM_SESSION_SETUP_ANDX = 0x73
COM_LOGOFF_ANDX = 0x74
COM_TREE_CONNECT_ANDX = 0x75
COM_NT_CREATE_ANDX = 0xA2
COM_NT_CANCEL = 0xA4
COM_NO_ANDX = 0xFF

# Commands whose first four parameter bytes are an AndX link (MS-CIFS 2.2.3.4).
ANDX_COMMANDS = frozenset({COM_READ_ANDX, COM_WRITE_ANDX, COM_SESSION_SETUP_ANDX, COM_LOGOFF_ANDX,
                           COM_TREE_CONNECT_ANDX, COM_NT_CREATE_ANDX})

# ---------------------------------------------------------------- header flags (MS-CIFS 2.2.3.1)
FLAGS_CASE_INSENSITIVE = 0x08
FLAGS_CANONICALIZED_PATHS = 0x10
FLAGS_REPLY = 0x80

FLAGS2_LONG_NAMES = 0x0001
FLAGS2_EAS = 0x0002
FLAGS2_SMB_SECURITY_SIGNATURE = 0x0004
FLAGS2_SMB_SECURITY_SIGNATURE_REQUIRED = 0x0010
FLAGS2_IS_LONG_NAME = 0x0040
FLAGS2_EXTENDED_SECURITY = 0x0800
FLAGS2_NT_STATUS = 0x4000
FLAGS2_UNICODE = 0x8000

# ---------------------------------------------------------------- negotiate (MS-CIFS 2.2.4.52, MS-SMB 2.2.4.5)
SECURITY_USER = 0x01
SECURITY_ENCRYPT_PASSWORDS = 0x02
SECURITY_SIGNATURES_ENABLED = 0x04
SECURITY_SIGNATURES_REQUIRED = 0x08

CAP_UNICODE = 0x00000004
CAP_LARGE_FILES = 0x00000008
CAP_NT_SMBS = 0x00000010
CAP_RPC_REMOTE_APIS = 0x00000020
CAP_STATUS32 = 0x00000040
CAP_LEVEL_II_OPLOCKS = 0x00000080
CAP_NT_FIND = 0x00000200
CAP_LARGE_READX = 0x00004000
CAP_LARGE_WRITEX = 0x00008000
CAP_EXTENDED_SECURITY = 0x80000000

SERVER_CAPABILITIES = (CAP_EXTENDED_SECURITY | CAP_NT_SMBS | CAP_UNICODE | CAP_LARGE_FILES | CAP_STATUS32
                       | CAP_LEVEL_II_OPLOCKS | CAP_NT_FIND | CAP_LARGE_READX | CAP_LARGE_WRITEX
                       | CAP_RPC_REMOTE_APIS)

# A client that did not set FLAGS2_NT_STATUS gets the old (class, code) pair instead
# (MS-CIFS 2.2.2.4 lists the mapping; these are the ones this server can produce).
ERRDOS, ERRSRV = 0x01, 0x02
_DOS_ERRORS = {
    STATUS_SUCCESS: (0, 0),
    STATUS_BUFFER_OVERFLOW: (ERRDOS, 234),          # ERRmoredata
    STATUS_INVALID_SMB: (ERRSRV, 1),                # ERRerror
    STATUS_SMB_BAD_TID: (ERRSRV, 5),                # ERRinvtid
    STATUS_SMB_BAD_FID: (ERRDOS, 6),                # ERRbadfid
    STATUS_INVALID_HANDLE: (ERRDOS, 6),
    STATUS_SMB_BAD_UID: (ERRSRV, 91),               # ERRbaduid
    STATUS_USER_SESSION_DELETED: (ERRSRV, 91),
    STATUS_INVALID_PARAMETER: (ERRDOS, 87),         # ERRinvalidparam
    STATUS_ACCESS_DENIED: (ERRDOS, 5),              # ERRnoaccess
    STATUS_OBJECT_NAME_NOT_FOUND: (ERRDOS, 2),      # ERRbadfile
    STATUS_LOGON_FAILURE: (ERRSRV, 2),              # ERRbadpw
    STATUS_INSUFFICIENT_RESOURCES: (ERRSRV, 89),    # ERRnoresource
    STATUS_PIPE_DISCONNECTED: (ERRDOS, 233),        # ERRnotconnected
    STATUS_NOT_SUPPORTED: (ERRSRV, 0xFFFF),         # ERRnosupport
    STATUS_BAD_DEVICE_TYPE: (ERRSRV, 67),           # ERRbadtype
    STATUS_BAD_NETWORK_NAME: (ERRSRV, 6),           # ERRinvnetname
}


def status_field(status: int, nt_status: bool) -> int:
    """The 32-bit Status header field: the NT status, or ErrorClass/Reserved/ErrorCode."""
    if nt_status:
        return status
    cls, code = _DOS_ERRORS.get(status, (ERRSRV, 1))
    return cls | (code << 16)


# ---------------------------------------------------------------- header

_HEADER = struct.Struct("<4sBIBHH8sHHHHH")
HEADER_SIZE = _HEADER.size  # 32
SIGNATURE_OFFSET = 14


@dataclass
class Header:
    command: int
    status: int = 0
    flags: int = 0
    flags2: int = 0
    pid_high: int = 0
    signature: bytes = field(default=b"\0" * 8, repr=False)
    tid: int = 0
    pid: int = 0
    uid: int = 0
    mid: int = 0

    @property
    def unicode(self) -> bool:
        return bool(self.flags2 & FLAGS2_UNICODE)

    @property
    def nt_status(self) -> bool:
        return bool(self.flags2 & FLAGS2_NT_STATUS)

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.command, self.status, self.flags, self.flags2, self.pid_high,
                            self.signature, 0, self.tid, self.pid, self.uid, self.mid)


def parse_header(message: bytes) -> Header:
    """The header of a client's request (the engine's side): a reply is refused."""
    header = parse_observed_header(message)
    if header.flags & FLAGS_REPLY:
        # A client never sends a reply; bouncing it back would confuse a reflecting peer.
        raise ProtocolError(LAYER, "reply_flag_in_request")
    return header


# ---------------------------------------------------------------- command blocks

@dataclass(frozen=True)
class Block:
    """One command's parameter words and data bytes, located within the whole message."""

    command: int
    offset: int          # of the WordCount byte, from the start of the header
    words: bytes
    data: bytes
    data_offset: int     # of the first data byte, from the start of the header

    @property
    def word_count(self) -> int:
        return len(self.words) // 2

    def andx(self) -> tuple[int, int]:
        """(next command, offset of its block) for an AndX command (MS-CIFS 2.2.3.4)."""
        if self.command not in ANDX_COMMANDS or len(self.words) < 4:
            return COM_NO_ANDX, 0
        cmd, _reserved, off = struct.unpack_from("<BBH", self.words)
        return cmd, off


def parse_block(message: bytes, offset: int, command: int) -> Block:
    """The block at `offset`: WordCount, words, ByteCount, bytes (MS-CIFS 2.2.3.2, 2.2.3.3)."""
    if offset + 1 > len(message):
        raise ProtocolError(LAYER, "block_outside_message")
    wc = message[offset]
    words_end = offset + 1 + 2 * wc
    if words_end + 2 > len(message):
        raise ProtocolError(LAYER, "word_count_exceeds_message")
    (bc,) = struct.unpack_from("<H", message, words_end)
    data_start = words_end + 2
    if data_start + bc > len(message):
        raise ProtocolError(LAYER, "byte_count_exceeds_message")
    return Block(command, offset, bytes(message[offset + 1:words_end]),
                 bytes(message[data_start:data_start + bc]), data_start)


MAX_CHAIN = 8


def parse_chain(message: bytes, first_command: int) -> list[Block]:
    """All blocks of an AndX chain. Each AndXOffset must point strictly forward, so a hostile
    chain cannot loop, and the chain length is bounded."""
    blocks = [parse_block(message, HEADER_SIZE, first_command)]
    while True:
        nxt, off = blocks[-1].andx()
        if nxt == COM_NO_ANDX:
            return blocks
        if len(blocks) >= MAX_CHAIN:
            raise ProtocolError(LAYER, "andx_chain_too_long")
        prev = blocks[-1]
        if off <= prev.offset:
            raise ProtocolError(LAYER, "andx_offset_backwards")
        blocks.append(parse_block(message, off, nxt))


def require_words(block: Block, *counts: int) -> None:
    if block.word_count not in counts:
        raise ProtocolError(LAYER, f"bad_word_count_{block.command:02x}")


def unpack_words(fmt: str, block: Block) -> tuple:
    s = struct.Struct(fmt)
    if s.size > len(block.words):
        raise ProtocolError(LAYER, f"short_parameters_{block.command:02x}")
    return s.unpack_from(block.words)


def read_string(message: bytes, start: int, end: int, unicode: bool, length: int | None = None) -> tuple[str, int]:
    """A NUL-terminated (or `length`-bounded) string in [start, end) of the message. Unicode
    strings are aligned to an even offset from the header (MS-CIFS 2.2.1.1). Returns the text
    and the offset after it."""
    if unicode and start % 2:
        start += 1
    if start > end:
        raise ProtocolError(LAYER, "string_outside_block")
    raw = message[start:end]
    if length is not None:
        if length > len(raw):
            raise ProtocolError(LAYER, "string_length_exceeds_block")
        raw = raw[:length]
    if unicode:
        n = 0
        while n + 1 < len(raw) and raw[n:n + 2] != b"\0\0":
            n += 2
        text_bytes, consumed = raw[:n], min(n + 2, len(raw))
        text = text_bytes.decode("utf-16-le", errors="replace")
    else:
        n = raw.find(b"\0")
        n = len(raw) if n < 0 else n
        text_bytes, consumed = raw[:n], min(n + 1, len(raw))
        text = text_bytes.decode("latin-1")
    return text, start + consumed


def encode_string(text: str, unicode: bool, at: int) -> bytes:
    """`text` NUL-terminated, with the pad byte Unicode needs when it would start at odd `at`."""
    if unicode:
        return (b"\0" if at % 2 else b"") + text.encode("utf-16-le") + b"\0\0"
    return text.encode("latin-1", errors="replace") + b"\0"


# ---------------------------------------------------------------- responses

@dataclass
class Reply:
    """A response block before it is laid out. `render(offset)` is given the absolute offset of
    the block's WordCount byte, for commands whose fields point into the message (READ_ANDX
    DataOffset, TRANSACTION ParameterOffset/DataOffset); it returns (words after the AndX link,
    data bytes)."""

    command: int
    words: bytes = b""
    data: bytes = b""
    render: Optional[Callable[[int], tuple[bytes, bytes]]] = None

    def layout(self, offset: int) -> tuple[bytes, bytes]:
        if self.render is not None:
            return self.render(offset)
        return self.words, self.data


def build_message(header: Header, replies: list[Reply], failed_command: int | None = None) -> bytes:
    """Lay out a response chain, filling in the AndX links. When a chained command failed, the
    chain ends with its empty block (MS-CIFS 3.3.5.1: processing stops at the first failure and
    the header carries that status)."""
    out = bytearray(header.pack())
    commands = [r.command for r in replies] + ([failed_command] if failed_command is not None else [])
    for i, reply in enumerate(replies):
        start = len(out)
        andx = reply.command in ANDX_COMMANDS
        words, data = reply.layout(start)
        if andx:
            words = b"\xff\x00\x00\x00" + words
        out += bytes([len(words) // 2]) + words + struct.pack("<H", len(data)) + data
        if andx and i + 1 < len(commands):
            struct.pack_into("<BBH", out, start + 1, commands[i + 1], 0, len(out))
    if failed_command is not None:
        out += b"\x00\x00\x00"
    return bytes(out)


def error_message(header: Header) -> bytes:
    """Header (with its Status already set) + WordCount 0 + ByteCount 0 (MS-CIFS 2.2.3)."""
    return header.pack() + b"\x00\x00\x00"


# ---------------------------------------------------------------- NEGOTIATE and TRANSACTION bodies

def parse_dialects(data: bytes) -> list[str]:
    """Dialect strings: each is 0x02 (BufferFormat) + OEM NUL-terminated text (MS-CIFS 2.2.4.52.1)."""
    dialects, pos = [], 0
    while pos < len(data):
        if data[pos] != 0x02:
            raise ProtocolError(LAYER, "bad_dialect_buffer_format")
        end = data.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolError(LAYER, "unterminated_dialect")
        dialects.append(data[pos + 1:end].decode("latin-1"))
        pos = end + 1
    if not dialects:
        raise ProtocolError(LAYER, "no_dialects")
    return dialects


def transaction_layout(params: bytes, data: bytes) -> Callable[[int], tuple[bytes, bytes]]:
    """TRANSACTION response words and bytes (MS-CIFS 2.2.4.33.2): parameters and data each
    start 4-byte aligned from the header, and their offsets are absolute."""

    def render(offset: int) -> tuple[bytes, bytes]:
        bytes_at = offset + 1 + 20 + 2
        pad1 = (-bytes_at) % 4
        param_at = bytes_at + pad1
        pad2 = (-(param_at + len(params))) % 4
        data_at = param_at + len(params) + pad2
        words = struct.pack("<HHHHHHHHHBB", len(params), len(data), 0, len(params), param_at, 0,
                            len(data), data_at, 0, 0, 0)
        return words, b"\0" * pad1 + params + b"\0" * pad2 + data

    return render


# ---------------------------------------------------------------- signing (MS-CIFS 3.1.4.1)

def compute_signature(key: bytes, message: bytes, sequence: int) -> bytes:
    """MD5(key || message with the sequence number in SecuritySignature)[:8]. With extended
    security the key is the GSS session key alone (MS-SMB 3.2.5.3.1)."""
    m = bytearray(message)
    m[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 8] = struct.pack("<Q", sequence & 0xFFFFFFFF)
    return hashlib.md5(bytes(key) + bytes(m)).digest()[:8]


def sign(key: bytes, message: bytes, sequence: int) -> bytes:
    sig = compute_signature(key, message, sequence)
    return message[:SIGNATURE_OFFSET] + sig + message[SIGNATURE_OFFSET + 8:]


def verify(key: bytes, message: bytes, sequence: int) -> bool:
    return hmac.compare_digest(compute_signature(key, message, sequence),
                               message[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 8])


def filetime(epoch: float) -> int:
    """Seconds since 1970 as a Windows FILETIME (100 ns since 1601)."""
    return max(0, int((epoch + 11644473600) * 10_000_000))


# ---------------------------------------------------------------- both directions, as an observer reads them

# The core (non-AndX) read and write (MS-CIFS 2.2.4.11, 2.2.4.12): older clients, and some
# tools, carry named-pipe traffic in them. The engine does not serve them; the reader follows them.
COM_READ = 0x0A
COM_WRITE = 0x0B

def parse_observed_header(message: bytes) -> Header:
    """The header of a request or a reply. The engine's parse_header refuses replies (a client
    never sends one); a capture reader sees both directions and tells them by FLAGS_REPLY."""
    if len(message) < HEADER_SIZE + 3:
        raise ProtocolError(LAYER, "short_message")
    (magic, command, status, flags, flags2, pid_high, signature, _reserved,
     tid, pid, uid, mid) = _HEADER.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError(LAYER, "bad_protocol_id")
    return Header(command, status, flags, flags2, pid_high, signature, tid, pid, uid, mid)


def bytes_at(message: bytes, offset: int, length: int, what: str) -> bytes:
    """`length` bytes at an absolute `offset` (the TRANSACTION, READ_ANDX and WRITE_ANDX
    offsets count from the header), or ProtocolError when they leave the message."""
    if offset < HEADER_SIZE or offset + length > len(message):
        raise ProtocolError(LAYER, f"{what}_outside_message")
    return bytes(message[offset:offset + length])
