"""What the security tokens inside SMB session setup and DCE/RPC auth verifiers say about who
logged on: NTLMSSP (MS-NLMP 2.2.1), possibly wrapped in SPNEGO (RFC 4178), or Kerberos, which
is named but not parsed."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


NTLMSSP_SIGNATURE = b"NTLMSSP\x00"
# DER content of the Kerberos mechanism OIDs (RFC 4121 1.2.840.113554.1.2.2, its user-to-user
# arc .3, and the Microsoft variant 1.2.840.48018.1.2.2).
KRB5_OID_VALUES = (bytes.fromhex("2a864886f712010202"), bytes.fromhex("2a864882f712010202"))
NTLMSSP_NEGOTIATE_UNICODE = 0x00000001
_AUTH_FIELDS = struct.Struct("<HHIHHIHHIHHI")
_U32 = struct.Struct("<I")


@dataclass
class TokenInfo:
    mechanism: str  # "ntlm" | "kerberos" | "unknown"
    message: str | None = None  # negotiate | challenge | authenticate (NTLM only)
    user: str | None = None
    domain: str | None = None
    ntlm_version: str | None = None  # "v1" | "v2"
    anonymous: bool = False
    # The NTLM message itself (for key derivation when the analyst supplies a password) and
    # the CHALLENGE's server challenge. Never printed.
    raw: bytes = field(default=b"", repr=False)
    server_challenge: bytes | None = field(default=None, repr=False)


def inspect_token(token: bytes) -> TokenInfo:
    """Classify a security token and, for an NTLM AUTHENTICATE, read user and domain."""
    pos = token.find(NTLMSSP_SIGNATURE)
    if pos >= 0:
        return _ntlm(token[pos:])
    inner = _spnego_mech_token(token)
    if inner is not None:
        # RFC 4178 4.2: a NegTokenInit's mechTypes is only an offer; the optimistic mechToken
        # (or a NegTokenResp's responseToken) is what was actually sent. Without one, the
        # token says nothing about the mechanism yet.
        token = inner
    elif token[:1] in (b"\x60", b"\xa0", b"\xa1") and _is_spnego(token):
        return TokenInfo("unknown")
    if token[:1] == b"\x60" and any(oid in token[:24] for oid in KRB5_OID_VALUES):
        return TokenInfo("kerberos")  # RFC 2743 3.1 framing around a Kerberos token
    if token[:1] in (b"\x6e", b"\x6f"):  # bare AP-REQ / AP-REP (RFC 4120 5.5)
        return TokenInfo("kerberos")
    return TokenInfo("unknown")


def _ntlm(msg: bytes) -> TokenInfo:
    if len(msg) < 12:
        return TokenInfo("ntlm")
    mtype = int.from_bytes(msg[8:12], "little")
    if mtype == 1:
        return TokenInfo("ntlm", "negotiate")
    if mtype == 2:
        return TokenInfo("ntlm", "challenge", server_challenge=msg[24:32] if len(msg) >= 32 else None)
    if mtype != 3:
        return TokenInfo("ntlm")
    # MS-NLMP 2.2.1.3 AUTHENTICATE_MESSAGE: six (length, max length, offset) field descriptors
    # from byte 12 (LM response, NT response, domain, user, workstation, session key), then
    # NegotiateFlags at byte 60. Payloads are located by their descriptors only.
    if len(msg) < 64:
        return TokenInfo("ntlm", "authenticate")
    (_lm_len, _lm_max, _lm_off, nt_len, _nt_max, nt_off, dom_len, _dom_max, dom_off,
     user_len, _user_max, user_off) = _AUTH_FIELDS.unpack_from(msg, 12)
    (flags,) = _U32.unpack_from(msg, 60)
    enc = "utf-16-le" if flags & NTLMSSP_NEGOTIATE_UNICODE else "latin-1"
    user = bytes(msg[user_off:user_off + user_len]).decode(enc, "replace")
    domain = bytes(msg[dom_off:dom_off + dom_len]).decode(enc, "replace")
    nt_len = len(msg[nt_off:nt_off + nt_len])
    # MS-NLMP 3.3: a 24-byte NtChallengeResponse is NTLMv1; NTLMv2 responses are longer.
    # An empty user with an empty or 1-byte response is the anonymous logon (3.2.5.1.2).
    version = "v2" if nt_len > 24 else ("v1" if nt_len == 24 else None)
    return TokenInfo("ntlm", "authenticate", user, domain, version,
                     anonymous=(user == "" and nt_len <= 1), raw=msg)


def _is_spnego(token: bytes) -> bool:
    return b"\x2b\x06\x01\x05\x05\x02" in token[:16] or token[:1] in (b"\xa0", b"\xa1")


def _spnego_mech_token(token: bytes) -> bytes | None:
    """The mechanism token inside a SPNEGO NegTokenInit or NegTokenResp, if any."""
    from impacket import spnego  # rare (NTLM is found by its signature first); slow to import
    try:
        if token[:1] == b"\x60":
            init = spnego.SPNEGO_NegTokenInit()
            init.fromString(token)
            return bytes(init["MechToken"]) if "MechToken" in init.fields else None
        if token[:1] == b"\xa1":
            resp = spnego.SPNEGO_NegTokenResp()
            resp.fromString(token)
            return bytes(resp["ResponseToken"]) if "ResponseToken" in resp.fields else None
    except Exception:  # impacket's ASN.1 reader raises bare Exceptions on foreign tokens
        return None
    return None
