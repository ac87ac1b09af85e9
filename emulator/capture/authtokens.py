"""What the security tokens inside SMB session setup and DCE/RPC auth verifiers say about who
logged on: NTLMSSP (MS-NLMP 2.2.1), possibly wrapped in SPNEGO (RFC 4178), or Kerberos, which
is named but not parsed."""

from __future__ import annotations

from dataclasses import dataclass

from impacket import ntlm

NTLMSSP_SIGNATURE = b"NTLMSSP\x00"
# DER encodings of the Kerberos mechanism OIDs (RFC 4121 1.2.840.113554.1.2.2 and the
# Microsoft variant 1.2.840.48018.1.2.2) and of NTLMSSP (1.3.6.1.4.1.311.2.2.10).
KRB5_OIDS = (bytes.fromhex("06092a864886f712010202"), bytes.fromhex("06092a864882f712010202"))
NTLM_OID = bytes.fromhex("060a2b06010401823702020a")
NTLMSSP_NEGOTIATE_UNICODE = 0x00000001


@dataclass
class TokenInfo:
    mechanism: str  # "ntlm" | "kerberos" | "unknown"
    message: str | None = None  # negotiate | challenge | authenticate (NTLM only)
    user: str | None = None
    domain: str | None = None
    ntlm_version: str | None = None  # "v1" | "v2"
    anonymous: bool = False


def inspect_token(token: bytes) -> TokenInfo:
    """Classify a security token and, for an NTLM AUTHENTICATE, read user and domain."""
    pos = token.find(NTLMSSP_SIGNATURE)
    if pos >= 0:
        return _ntlm(token[pos:])
    if any(oid in token for oid in KRB5_OIDS):
        return TokenInfo("kerberos")
    # A SPNEGO NegTokenResp without a mechanism token (the final accept-completed) says
    # nothing about the mechanism.
    return TokenInfo("unknown")


def _ntlm(msg: bytes) -> TokenInfo:
    if len(msg) < 12:
        return TokenInfo("ntlm")
    mtype = int.from_bytes(msg[8:12], "little")
    if mtype == 1:
        return TokenInfo("ntlm", "negotiate")
    if mtype == 2:
        return TokenInfo("ntlm", "challenge")
    if mtype != 3:
        return TokenInfo("ntlm")
    try:
        auth = ntlm.NTLMAuthChallengeResponse()
        auth.fromString(msg)
        flags = auth["flags"]
        enc = "utf-16-le" if flags & NTLMSSP_NEGOTIATE_UNICODE else "latin-1"
        user = bytes(auth["user_name"]).decode(enc, "replace")
        domain = bytes(auth["domain_name"]).decode(enc, "replace")
        nt_len = len(auth["ntlm"])
    except Exception:  # impacket raises assorted errors on short or odd buffers
        return TokenInfo("ntlm", "authenticate")
    # MS-NLMP 3.3: a 24-byte NtChallengeResponse is NTLMv1; NTLMv2 responses are longer.
    # An empty user with an empty or 1-byte response is the anonymous logon (3.2.5.1.2).
    version = "v2" if nt_len > 24 else ("v1" if nt_len == 24 else None)
    return TokenInfo("ntlm", "authenticate", user, domain, version,
                     anonymous=(user == "" and nt_len <= 1))
