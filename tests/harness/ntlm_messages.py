"""NTLM messages impacket's initiator will not write: a Windows-style AUTHENTICATE with a MIC.

impacket provides the NTLMv2 response and the RC4 primitives; the message layout and the MIC
follow MS-NLMP 2.2.1.3 and 3.1.5.1.2.
"""

from __future__ import annotations

import struct

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
