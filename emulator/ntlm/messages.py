"""NTLM message codec (MS-NLMP 2.2): strict parsing of NEGOTIATE and AUTHENTICATE, building of
CHALLENGE.

impacket's structures slice payload fields without checking offsets and guess whether an
AUTHENTICATE carries a MIC from the VERSION flag, which MS-NLMP 2.2.1.3 does not allow: the MIC
is announced by MsvAvFlags inside the NTLMv2 response. So incoming messages are read here with
explicit bounds checks; the outgoing CHALLENGE is built with impacket's NTLMAuthChallenge and
AV_PAIRS. Every parse error is a `ProtocolError("ntlm", reason)`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from impacket import ntlm as imp

from ..sansio import ProtocolError

SIGNATURE = b"NTLMSSP\x00"
NEGOTIATE, CHALLENGE, AUTHENTICATE = 1, 2, 3

# MS-NLMP 2.2.2.1 AvIds.
AV_EOL = 0
AV_NB_COMPUTER = 1
AV_NB_DOMAIN = 2
AV_DNS_COMPUTER = 3
AV_DNS_DOMAIN = 4
AV_DNS_TREE = 5
AV_FLAGS = 6
AV_TIMESTAMP = 7
AV_SINGLE_HOST = 8
AV_TARGET_NAME = 9
AV_CHANNEL_BINDINGS = 10

# MsvAvFlags bit 0x2: "the client is providing message integrity in the MIC field".
AV_FLAG_MIC_PRESENT = 0x00000002

# AUTHENTICATE_MESSAGE layout (MS-NLMP 2.2.1.3): fixed part, then VERSION at 64, MIC at 72.
AUTH_FIXED_LEN = 64
MIC_OFFSET = 72
MIC_LEN = 16

# The Windows Server 2019 VERSION structure (MS-NLMP 2.2.2.10): 10.0 build 17763, revision 15.
SERVER_VERSION = struct.pack("<BBH3sB", 10, 0, 17763, b"\x00" * 3, 0x0F)


def fail(reason: str) -> ProtocolError:
    return ProtocolError("ntlm", reason)


def message_type(data: bytes) -> int:
    if len(data) < 12 or data[:8] != SIGNATURE:
        raise fail("bad NTLMSSP signature" if len(data) >= 8 else "truncated NTLMSSP header")
    return struct.unpack_from("<I", data, 8)[0]


@dataclass(frozen=True)
class NegotiateMessage:
    flags: int
    raw: bytes = field(repr=False)


def parse_negotiate(data: bytes) -> NegotiateMessage:
    """MS-NLMP 2.2.1.1. Only the flags matter to the server; the optional OEM domain and
    workstation are not trusted for anything."""
    if message_type(data) != NEGOTIATE:
        raise fail("expected NEGOTIATE_MESSAGE")
    if len(data) < 16:
        raise fail("truncated NEGOTIATE_MESSAGE")
    (flags,) = struct.unpack_from("<I", data, 12)
    if len(data) >= 32:
        # Domain and workstation fields, when present, must still point inside the message.
        for off in (16, 24):
            _buffer(data, off, minimum_offset=16)
    return NegotiateMessage(flags=flags, raw=bytes(data))


@dataclass(frozen=True)
class AuthenticateMessage:
    flags: int
    lm_response: bytes = field(repr=False)
    nt_response: bytes = field(repr=False)
    domain: str
    user: str
    workstation: str
    encrypted_session_key: bytes = field(repr=False)
    raw: bytes = field(repr=False)
    payload_start: int       # lowest offset of any non-empty payload field

    def mic(self) -> bytes:
        """The 16 bytes where a MIC sits when MsvAvFlags announces one."""
        return self.raw[MIC_OFFSET:MIC_OFFSET + MIC_LEN]

    def with_zeroed_mic(self) -> bytes:
        """The message as the MIC was computed over it (MS-NLMP 3.1.5.1.2: MIC field zero)."""
        return self.raw[:MIC_OFFSET] + b"\x00" * MIC_LEN + self.raw[MIC_OFFSET + MIC_LEN:]


def _buffer(data: bytes, at: int, minimum_offset: int) -> tuple[bytes, int | None]:
    """A (Len, MaxLen, Offset) payload descriptor (MS-NLMP 2.2.1): the bytes and their offset."""
    length, _maxlen, offset = struct.unpack_from("<HHI", data, at)
    if length == 0:
        return b"", None
    if offset < minimum_offset or offset + length > len(data):
        raise fail("payload field outside the message")
    return data[offset:offset + length], offset


def _text(raw: bytes, unicode: bool, what: str) -> str:
    if unicode:
        if len(raw) % 2:
            raise fail(f"odd-length UTF-16 {what}")
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError:
            raise fail(f"invalid UTF-16 {what}") from None
    return raw.decode("cp437")


def parse_authenticate(data: bytes) -> AuthenticateMessage:
    if message_type(data) != AUTHENTICATE:
        raise fail("expected AUTHENTICATE_MESSAGE")
    if len(data) < AUTH_FIXED_LEN:
        raise fail("truncated AUTHENTICATE_MESSAGE")
    (flags,) = struct.unpack_from("<I", data, 60)
    fields = []
    starts = []
    for at in (12, 20, 28, 36, 44, 52):
        raw, off = _buffer(data, at, AUTH_FIXED_LEN)
        fields.append(raw)
        if off is not None:
            starts.append(off)
    lm, nt, dom, usr, wks, key = fields
    unicode = bool(flags & imp.NTLMSSP_NEGOTIATE_UNICODE)
    return AuthenticateMessage(
        flags=flags, lm_response=lm, nt_response=nt,
        domain=_text(dom, unicode, "domain"), user=_text(usr, unicode, "user name"),
        workstation=_text(wks, unicode, "workstation"),
        encrypted_session_key=key, raw=bytes(data),
        payload_start=min(starts) if starts else len(data))


# ---------------------------------------------------------------- AV pairs (MS-NLMP 2.2.2.1)

def parse_av_pairs(data: bytes) -> list[tuple[int, bytes]]:
    """Strict: every pair inside the buffer, terminated by MsvAvEOL."""
    pairs: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        if pos + 4 > len(data):
            raise fail("AV pair list without MsvAvEOL")
        av_id, av_len = struct.unpack_from("<HH", data, pos)
        pos += 4
        if av_id == AV_EOL:
            return pairs
        if pos + av_len > len(data):
            raise fail("AV pair runs past its buffer")
        pairs.append((av_id, data[pos:pos + av_len]))
        pos += av_len


def av_lookup(pairs: list[tuple[int, bytes]], av_id: int) -> bytes | None:
    for k, v in pairs:
        if k == av_id:
            return v
    return None


def build_target_info(nb_domain: str, nb_computer: str, dns_domain: str, dns_computer: str,
                      filetime: int) -> bytes:
    """The AV pair list of a CHALLENGE_MESSAGE (MS-NLMP 2.2.2.1), ended by MsvAvEOL.

    Built with struct rather than impacket's AV_PAIRS (the same bytes; tests compare them):
    every TCP logon builds one, and the generic Structure machinery was a visible share of a
    logon's server CPU."""
    parts = []
    # Insertion order is wire order; Windows sends the names first and the timestamp last.
    for av_id, value in ((AV_NB_DOMAIN, nb_domain.encode("utf-16-le")),
                         (AV_NB_COMPUTER, nb_computer.encode("utf-16-le")),
                         (AV_DNS_DOMAIN, dns_domain.encode("utf-16-le")),
                         (AV_DNS_COMPUTER, dns_computer.encode("utf-16-le")),
                         (AV_TIMESTAMP, struct.pack("<Q", filetime))):
        parts.append(struct.pack("<HH", av_id, len(value)))
        parts.append(value)
    parts.append(struct.pack("<HH", AV_EOL, 0))
    return b"".join(parts)


_CHALLENGE_FIXED = struct.Struct("<8sIHHII8s8sHHI")


def build_challenge(flags: int, server_challenge: bytes, target_name: bytes,
                    target_info: bytes) -> bytes:
    """CHALLENGE_MESSAGE (MS-NLMP 2.2.1.2): the 48-byte fixed part, the Version when
    NEGOTIATE_VERSION is set, then TargetName and TargetInfo in the payload.

    Laid out with struct (byte-for-byte impacket's NTLMAuthChallenge; tests compare them),
    because impacket's Structure.getData was the largest single cost of a TCP logon's bind."""
    if len(server_challenge) != 8:
        raise ValueError("the server challenge is 8 bytes")
    version = SERVER_VERSION if flags & imp.NTLMSSP_NEGOTIATE_VERSION else b""
    header = 48 + len(version)
    fixed = _CHALLENGE_FIXED.pack(b"NTLMSSP\x00", CHALLENGE, len(target_name), len(target_name), header,
                                  flags, server_challenge, b"\x00" * 8, len(target_info),
                                  len(target_info), header + len(target_name))
    return fixed + version + target_name + target_info


def filetime(epoch: float) -> int:
    """FILETIME: 100 ns ticks since 1601-01-01 (MS-DTYP 2.3.3)."""
    return int(round((epoch + 11644473600) * 10_000_000))


# ---------------------------------------------------------------- CHALLENGE, as a client or observer reads it

@dataclass(frozen=True)
class ChallengeMessage:
    flags: int
    server_challenge: bytes = field(repr=False)
    target_info: bytes = field(repr=False)


def parse_challenge(data: bytes) -> ChallengeMessage:
    """MS-NLMP 2.2.1.2. The server builds this message; the capture reader reads it back for
    the server challenge (to check a password an analyst supplies) and the flags."""
    if message_type(data) != CHALLENGE:
        raise fail("expected CHALLENGE_MESSAGE")
    if len(data) < 32:
        raise fail("truncated CHALLENGE_MESSAGE")
    (flags,) = struct.unpack_from("<I", data, 20)
    target_info = b""
    if len(data) >= 48:
        target_info, _ = _buffer(data, 40, minimum_offset=32)
    return ChallengeMessage(flags=flags, server_challenge=bytes(data[24:32]),
                            target_info=bytes(target_info))
