"""Hand-written NDR for the server side of EcDoConnect, EcDoConnectEx and EcDoDisconnect.

Every Exchange logon runs these three stubs, and building impacket's NDRCALL objects for them
cost more server CPU than the NTLM handshake. The layouts are fixed (MS-OXCRPC 3.1.4.1,
3.1.4.3, 3.1.4.11; NDR alignment rules of C706 14.2.2), so they are read and written here
with `struct` directly. The impacket classes in emsmdb.py stay the definition the client side
uses; tests check that these functions accept exactly the stubs impacket's decoder (plus the
interface's own checks) accepts, and that a response is byte-for-byte impacket's encoding,
including the filler impacket writes into alignment gaps (the gaps' content is unspecified by
C706 14.2.2, so matching it keeps captures of either encoder identical).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .ndr import MAX_STUB, RpcFault, bad_stub

# MS-OXCRPC 3.1.4.11: range(0, 0x1008) on *pcbAuxOut.
MAX_CB_AUX_OUT = 0x1008
MAX_DN = 1024

_U32 = struct.Struct("<I")
_U32X3 = struct.Struct("<III")
# ulFlags, ulConMod, cbLimit, ulCpid, ulLcidString, ulLcidSort, ulIcxrLink, usFCanConvertCodePages,
# rgwClientVersion[3], pulTimeStamp: 7 longs, 4 shorts, one long; 40 bytes from an aligned start.
_CONNECT_TAIL = struct.Struct("<7I4HI")
_EX_TAIL = struct.Struct("<II")          # cbAuxIn, *pcbAuxOut
_HANDLE = 20


@dataclass(frozen=True)
class ConnectRequest:
    """The [in] parameters of EcDoConnect(Ex) the server acts on."""
    user_dn: str
    client_version: tuple[int, int, int]
    timestamp: int
    aux_in: bytes = b""
    cb_aux_out: int = 0


_U32X3_BE = struct.Struct(">III")


def _dos_string(stub: bytes, pos: int, what: str, counts: struct.Struct = _U32X3) -> tuple[str, int]:
    """A top-level `[string, charset(DOS)] char *` (C706 14.3.4.2 conformant varying string):
    max count, offset, actual count, then the characters including their NUL."""
    if len(stub) < pos + 12:
        raise bad_stub(f"{what}: truncated string header")
    max_count, offset, actual = counts.unpack_from(stub, pos)
    pos += 12
    if offset != 0:
        raise bad_stub(f"{what}: non-zero string offset")
    end = pos + actual
    if end > len(stub):
        raise bad_stub(f"{what}: string shorter than its count")
    if actual > max_count:
        raise bad_stub(f"{what}: actual count above maximum count")
    if actual == 0 or stub[end - 1] != 0:
        raise bad_stub(f"{what}: string without terminator")
    text = stub[pos:end - 1]
    if b"\x00" in text:
        raise bad_stub(f"{what}: NUL inside string")
    if len(text) > MAX_DN:
        raise bad_stub(f"{what}: string longer than {MAX_DN}")
    # charset(DOS): Exchange DNs are ASCII; latin-1 maps every byte and never fails.
    return text.decode("latin-1"), end


def decode_connect(stub: bytes, *, extended: bool) -> ConnectRequest:
    """EcDoConnect (opnum 0) or EcDoConnectEx (opnum 10) request stub, or RpcFault(NCA_S_FAULT_NDR).

    Bytes after the last parameter are ignored, as every NDR unmarshaller (and impacket's)
    does; alignment gaps are skipped whatever they hold (C706 14.2.2: unspecified value)."""
    call = "EcDoConnectEx" if extended else "EcDoConnect"
    if len(stub) > MAX_STUB:
        raise bad_stub(f"{call}: stub of {len(stub)} bytes is too large")
    user_dn, pos = _dos_string(stub, 0, "szUserDN")
    pos += -pos % 4
    if len(stub) < pos + _CONNECT_TAIL.size:
        raise bad_stub(f"{call}: truncated")
    values = _CONNECT_TAIL.unpack_from(stub, pos)
    pos += _CONNECT_TAIL.size
    version = (values[8], values[9], values[10])
    timestamp = values[11]
    if not extended:
        return ConnectRequest(user_dn, version, timestamp)
    # [in, size_is(cbAuxIn)] unsigned char rgbAuxIn[]: the conformance where the array
    # stands (a top-level parameter), then the bytes; then cbAuxIn and *pcbAuxOut, aligned.
    if len(stub) < pos + 4:
        raise bad_stub(f"{call}: truncated")
    conformance = _U32.unpack_from(stub, pos)[0]
    pos += 4
    aux_end = pos + conformance
    if aux_end > len(stub):
        raise bad_stub(f"{call}: truncated")
    aux_in = stub[pos:aux_end]
    pos = aux_end + (-aux_end % 4)
    if len(stub) < pos + _EX_TAIL.size:
        raise bad_stub(f"{call}: truncated")
    cb_aux_in, cb_aux_out = _EX_TAIL.unpack_from(stub, pos)
    if cb_aux_in != conformance:
        raise bad_stub("EcDoConnectEx: cbAuxIn does not match rgbAuxIn")
    if cb_aux_out > MAX_CB_AUX_OUT:
        raise bad_stub("EcDoConnectEx: pcbAuxOut out of range")
    return ConnectRequest(user_dn, version, timestamp, bytes(aux_in), cb_aux_out)


def decode_disconnect(stub: bytes) -> bytes:
    """EcDoDisconnect (opnum 1): `[in, out, ref] CXH *pcxh`, the 20-byte context handle."""
    if len(stub) > MAX_STUB:
        raise bad_stub(f"EcDoDisconnect: stub of {len(stub)} bytes is too large")
    if len(stub) < _HANDLE:
        raise bad_stub("EcDoDisconnect: truncated")
    return bytes(stub[:_HANDLE])


# ------------------------------------------------------------------ responses

_AFTER_HANDLE = struct.Struct("<IIIH")         # pcmsPollsMax, pcRetry, pcmsRetryDelay, picxr
_POINTER_STRING = struct.Struct("<IIII")       # referent id, max count, offset, actual count
_VERSIONS = struct.Struct("<6H")
_REFERENT_DN_PREFIX = 0x00020000
_REFERENT_DISPLAY_NAME = 0x00020004


def _ascii_z(text: str) -> bytes:
    # The string is sent with its NUL, counted in both counts (C706 14.3.4.2); impacket's STR
    # encodes the text as UTF-8, so the same bytes go out here.
    return text.encode("utf-8") + b"\x00"


def encode_connect_response(*, extended: bool, handle: bytes, polls_max: int, retry: int,
                            retry_delay: int, icxr: int, dn_prefix: str, display_name: str,
                            server_version: tuple[int, int, int],
                            best_version: tuple[int, int, int], timestamp: int, status: int) -> bytes:
    """EcDoConnect(Ex)'s [out] parameters and return value, laid out as MS-OXCRPC 3.1.4.1 /
    3.1.4.11 and NDR say: szDNPrefix and szDisplayName are `char **`, a unique pointer whose
    string follows its referent id in place. Gap filler bytes are impacket's (0xaa before a
    pointer, 0xab before a call-level parameter, 0xbf before a primitive)."""
    if len(handle) != _HANDLE:
        raise ValueError("a context handle is 20 bytes")
    prefix = _ascii_z(dn_prefix)
    name = _ascii_z(display_name)
    parts = [handle, _AFTER_HANDLE.pack(polls_max, retry, retry_delay, icxr & 0xFFFF), b"\xaa\xaa",
             _POINTER_STRING.pack(_REFERENT_DN_PREFIX, len(prefix), 0, len(prefix)), prefix]
    size = 52 + len(prefix)
    gap = -size % 4
    parts += [b"\xaa" * gap, _POINTER_STRING.pack(_REFERENT_DISPLAY_NAME, len(name), 0, len(name)), name]
    size += gap + 16 + len(name)
    gap = size % 2
    parts += [b"\xab" * gap, _VERSIONS.pack(*server_version, *best_version)]
    size += gap + 12
    parts.append(b"\xbf" * (-size % 4))
    if extended:
        # rgbAuxOut (conformant varying, empty: max count, offset, actual count), *pcbAuxOut.
        parts.append(struct.pack("<IIIIII", timestamp, 0, 0, 0, 0, status))
    else:
        parts.append(struct.pack("<II", timestamp, status))
    return b"".join(parts)


def encode_disconnect_response(status: int) -> bytes:
    """EcDoDisconnect's [out] handle, zeroed (MS-OXCRPC 3.1.4.3), and the return value."""
    return b"\x00" * _HANDLE + _U32.pack(status)


# ------------------------------------------------------------------ as a capture reader reads a request

def observed_user_dn(stub: bytes, little_endian: bool = True) -> str | None:
    """szUserDN of an EcDoConnect(Ex) request seen in a capture, or None when the stub does not
    hold one. The DN is the first [in] parameter, at the front of the stub; some clients of
    other eras send it behind a unique-pointer referent (4 bytes further). Big-endian senders
    (NDR drep 0x00) write the counts in their own order."""
    counts = _U32X3 if little_endian else _U32X3_BE
    for pos in (0, 4):
        try:
            dn, _ = _dos_string(stub, pos, "szUserDN", counts)
        except RpcFault:  # bad_stub: this position holds no DN
            continue
        if dn.isprintable() and dn.isascii():
            return dn
    return None
