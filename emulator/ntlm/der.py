"""The little DER that SPNEGO needs (X.690 8.1): tag, definite length, value.

impacket's SPNEGO classes do not keep the raw bytes of the client's mechTypes (which the
mechListMIC covers, MS-SPNG 3.1.5.1), skip optional fields only in one order and do not bound
lengths, so SPNEGO tokens are read and written with these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sansio import ProtocolError

SEQUENCE = 0x30
OID = 0x06
OCTET_STRING = 0x04
ENUMERATED = 0x0A
GENERAL_STRING = 0x1B
APPLICATION_0 = 0x60


def context(n: int) -> int:
    """Constructed context-specific tag [n]."""
    return 0xA0 | n


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(value)) + value


@dataclass(frozen=True)
class Element:
    tag: int
    value: bytes
    raw: bytes        # the whole TLV, as received


def read(data: bytes, pos: int = 0) -> tuple[Element, int]:
    """One element starting at `pos`; returns it and the position after it."""
    if pos + 2 > len(data):
        raise ProtocolError("spnego", "truncated DER element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ProtocolError("spnego", "multi-byte DER tags are not used by SPNEGO")
    first = data[pos + 1]
    at = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise ProtocolError("spnego", "indefinite DER length")
        if count > 4 or at + count > len(data):
            raise ProtocolError("spnego", "bad DER length")
        length = int.from_bytes(data[at:at + count], "big")
        at += count
    end = at + length
    if end > len(data):
        raise ProtocolError("spnego", "DER element runs past its container")
    return Element(tag, data[at:end], data[pos:end]), end


def read_exact(data: bytes, tag: int) -> Element:
    """`data` must be exactly one element with this tag."""
    el, end = read(data)
    if el.tag != tag:
        raise ProtocolError("spnego", f"expected DER tag 0x{tag:02x}, got 0x{el.tag:02x}")
    if end != len(data):
        raise ProtocolError("spnego", "trailing bytes after DER element")
    return el


def children(data: bytes) -> list[Element]:
    out = []
    pos = 0
    while pos < len(data):
        el, pos = read(data, pos)
        out.append(el)
    return out


def fields(seq_value: bytes) -> dict[int, Element]:
    """The context-tagged fields [n] of a SEQUENCE, each at most once and in ascending order."""
    out: dict[int, Element] = {}
    last = -1
    for el in children(seq_value):
        if el.tag & 0xE0 != 0xA0:
            raise ProtocolError("spnego", "expected a context-tagged field")
        n = el.tag & 0x1F
        if n <= last:
            raise ProtocolError("spnego", "SEQUENCE fields out of order or repeated")
        last = n
        out[n] = el
    return out
