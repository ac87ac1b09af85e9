"""NTLM messages for tests: a Windows-style AUTHENTICATE with a MIC (which impacket's initiator
will not write), and NEGOTIATE / AUTHENTICATE crafting a test can tamper with.

impacket provides the NTLMv2 response and the RC4 primitives; the message layout and the MIC
follow MS-NLMP 2.2.1.3 and 3.1.5.1.2.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Callable

from Cryptodome.Cipher import ARC4
from impacket import ntlm

from emulator.ntlm.messages import MIC_OFFSET

# The embedded lab's passwords (emulator/default_lab.yaml), by user.
PASSWORDS = {"alice": "Alice-Pw-1", "bob": "Bob-Pw-2", "mallory": "Mallory-Pw-4"}


def authenticate_with_mic(negotiate: bytes, challenge: bytes, user: str, password: str,
                          domain: str = "CORP", *, timestamp: bytes | None = None,
                          exported: bytes = b"E" * 16):
    """A Windows-style AUTHENTICATE: MsvAvFlags announces a MIC (MS-NLMP 2.2.2.1), and the MIC
    covers NEGOTIATE + CHALLENGE + AUTHENTICATE. impacket's initiator does not send one."""
    chal = ntlm.NTLMAuthChallenge(challenge)
    av = ntlm.AV_PAIRS(chal["TargetInfoFields"])
    av[ntlm.NTLMSSP_AV_FLAGS] = struct.pack("<I", 2)
    if timestamp is not None:
        av[ntlm.NTLMSSP_AV_TIME] = timestamp
    ts = av[ntlm.NTLMSSP_AV_TIME][1]
    blob = b"\x01\x01" + b"\x00" * 6 + ts + b"CLIENTCH" + b"\x00" * 4 + av.getData() + b"\x00" * 4
    key_nt = ntlm.NTOWFv2(user, password, domain)
    proof = ntlm.hmac_md5(key_nt, chal["challenge"] + blob)
    base = ntlm.hmac_md5(key_nt, proof)
    flags = (chal["flags"] & struct.unpack_from("<I", negotiate, 12)[0]) | ntlm.NTLMSSP_NEGOTIATE_VERSION
    msg = ntlm.NTLMAuthChallengeResponse()
    msg["flags"] = flags
    msg["user_name"] = user.encode("utf-16-le")
    msg["domain_name"] = domain.encode("utf-16-le")
    msg["host_name"] = "WS01".encode("utf-16-le")
    msg["lanman"] = b"\x00" * 24
    msg["ntlm"] = proof + blob
    msg["session_key"] = ARC4.new(base).encrypt(exported)
    msg["Version"] = b"\x0a\x00\x63\x45\x00\x00\x00\x0f"
    msg["MIC"] = b"\x00" * 16
    data = bytearray(msg.getData())
    mic = ntlm.hmac_md5(exported, negotiate + challenge + bytes(data))
    data[MIC_OFFSET:MIC_OFFSET + 16] = mic
    return bytes(data), exported, flags


# ---------------------------------------------------------------------- crafting (MS-NLMP 2.2.1)

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
