"""What a security token inside an SMB session setup or a DCE/RPC auth verifier says about who
logged on, read with the live server's own parsers: NTLMSSP (emulator.ntlm.messages, MS-NLMP
2.2.1), SPNEGO (emulator.ntlm.spnego, RFC 4178), and the Netlogon secure channel's
NL_AUTH_MESSAGE (MS-NRPC 2.2.1.3.1). Kerberos is recognised by its mechanism OID or its
AP-REQ/AP-REP tag; the principal is inside the encrypted ticket and is not read here.

Nothing here raises on foreign bytes: a token that cannot be read is `mechanism="unknown"`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..ntlm import der, messages as ntlm
from ..ntlm.responses import classify
from ..auth.spnego import KNOWN_MECHS, NTLMSSP_OID, read_neg_token
from ..sansio import ProtocolError

NTLMSSP_SIGNATURE = ntlm.SIGNATURE
KERBEROS_OIDS = frozenset(oid for oid, name in KNOWN_MECHS.items() if "krb5" in name)
# RFC 4120 5.5.1 / 5.5.2 / 5.9.1: AP-REQ, AP-REP and KRB-ERROR application tags.
KERBEROS_TAGS = (b"\x6e", b"\x6f", b"\x7e")
# RFC 1964 1.1 / RFC 4121 4.1: the TOK_ID after an InitialContextToken's mechanism OID.
_GSS_TOK_IDS = {b"\x01\x00": "ap_req", b"\x02\x00": "ap_rep", b"\x03\x00": "krb_error"}
# MS-RPCE 2.2.1.1.7 security providers the reader names.
AUTH_TYPE_SPNEGO, AUTH_TYPE_NTLM, AUTH_TYPE_KERBEROS, AUTH_TYPE_SCHANNEL = 9, 10, 16, 68

# responses.classify's words, in the shorter form explain has always printed.
_VERSIONS = {"NTLMv2": "v2", "NTLMv1": "v1", "LM": "v1"}


@dataclass
class TokenInfo:
    mechanism: str  # "ntlm" | "kerberos" | "schannel" | "unknown"
    # negotiate | challenge | authenticate (NTLM, schannel); ap_req | ap_rep | krb_error (Kerberos)
    message: str | None = None
    user: str | None = None
    domain: str | None = None
    ntlm_version: str | None = None  # "v1" | "v2"
    anonymous: bool = False
    spnego: bool = False  # the token came wrapped in SPNEGO
    principal: str | None = None  # a Kerberos ticket's client (user@REALM), read with a keytab
    # The NTLM message itself (for key derivation when the analyst supplies a password) and
    # the CHALLENGE's server challenge. Never printed.
    raw: bytes = field(default=b"", repr=False)
    server_challenge: bytes | None = field(default=None, repr=False)


def inspect_token(token: bytes, auth_type: int | None = None) -> TokenInfo:
    """Classify a security token and, for an NTLM AUTHENTICATE or a schannel negotiate, read
    who it names. `auth_type` is the DCE/RPC security provider when the token came in an auth
    verifier (schannel tokens carry no signature of their own)."""
    if auth_type == AUTH_TYPE_SCHANNEL:
        return _schannel(token)
    if token[:8] == NTLMSSP_SIGNATURE:
        return _ntlm(token)
    if token[:1] in KERBEROS_TAGS or (token[:1] == b"\x60" and _kerberos_framed(token)):
        # `raw` is what a keytab reads (capture/kerberos_keys.py).
        return TokenInfo("kerberos", kerberos_message(token), raw=bytes(token))
    if token[:1] in (b"\x60", b"\xa0", b"\xa1"):
        return _spnego(token)
    pos = token.find(NTLMSSP_SIGNATURE)  # NTLMSSP behind some framing we do not know
    if pos > 0:
        return _ntlm(token[pos:])
    return TokenInfo("unknown")


def kerberos_message(token: bytes) -> str | None:
    """ap_req | ap_rep | krb_error for a bare or GSS-framed Kerberos token, else None."""
    tag = token[:1]
    if tag == b"\x6e":
        return "ap_req"
    if tag == b"\x6f":
        return "ap_rep"
    if tag == b"\x7e":
        return "krb_error"
    inner = unframe_kerberos(token)
    return _GSS_TOK_IDS.get(inner[:2]) if inner is not None else None


def unframe_kerberos(token: bytes) -> bytes | None:
    """The TOK_ID and message after RFC 2743 3.1's 0x60 framing and the mechanism OID."""
    if token[:1] != b"\x60":
        return None
    try:
        outer, _ = der.read(token)
        oid, after = der.read(outer.value)
    except ProtocolError:
        return None
    return bytes(outer.value[after:]) if oid.tag == der.OID else None


def _kerberos_framed(token: bytes) -> bool:
    """RFC 2743 3.1 InitialContextToken: 0x60, length, then the mechanism OID. A Kerberos
    token names krb5 there; SPNEGO names itself (and may list krb5 later, as an offer)."""
    try:
        outer, _ = der.read(token)
        oid, _ = der.read(outer.value)
    except ProtocolError:
        return False
    return oid.tag == der.OID and oid.value in KERBEROS_OIDS


def _spnego(token: bytes) -> TokenInfo:
    try:
        oids, inner = read_neg_token(token)
    except ProtocolError:
        return TokenInfo("unknown")
    # RFC 4178 4.2: a NegTokenInit's mechTypes is only an offer; the optimistic mechToken (or a
    # NegTokenResp's responseToken) is what was actually sent. Without one, the token says
    # nothing about the mechanism yet, unless the only mechanism offered is Kerberos.
    if inner is None:
        if oids and oids[0] in KERBEROS_OIDS and NTLMSSP_OID not in oids:
            return TokenInfo("kerberos", spnego=True)
        return TokenInfo("unknown", spnego=True)
    info = inspect_token(inner)
    info.spnego = True
    return info


def _ntlm(msg: bytes) -> TokenInfo:
    try:
        kind = ntlm.message_type(msg)
        if kind == ntlm.NEGOTIATE:
            return TokenInfo("ntlm", "negotiate")
        if kind == ntlm.CHALLENGE:
            ch = ntlm.parse_challenge(msg)
            return TokenInfo("ntlm", "challenge", server_challenge=ch.server_challenge)
        if kind != ntlm.AUTHENTICATE:
            return TokenInfo("ntlm")
        auth = ntlm.parse_authenticate(msg)
    except ProtocolError:
        return TokenInfo("ntlm", _NTLM_KINDS.get(_kind(msg)))
    version = classify(auth.user, auth.lm_response, auth.nt_response)
    return TokenInfo("ntlm", "authenticate", auth.user, auth.domain, _VERSIONS.get(version),
                     anonymous=version == "anonymous", raw=bytes(msg))


_NTLM_KINDS = {ntlm.NEGOTIATE: "negotiate", ntlm.CHALLENGE: "challenge", ntlm.AUTHENTICATE: "authenticate"}


def _kind(msg: bytes) -> int:
    return struct.unpack_from("<I", msg, 8)[0] if len(msg) >= 12 else 0


# MS-NRPC 2.2.1.3.1 NL_AUTH_MESSAGE: MessageType, Flags, then the names the flags announce, in
# flag order: two OEM strings, then three compressed UTF-8 names (RFC 1035 3.1 label form).
_NL_OEM_DOMAIN, _NL_OEM_COMPUTER, _NL_DNS_DOMAIN, _NL_DNS_HOST, _NL_UTF8_COMPUTER = 1, 2, 4, 8, 16


def _schannel(token: bytes) -> TokenInfo:
    if len(token) < 8:
        return TokenInfo("schannel")
    kind, flags = struct.unpack_from("<II", token)
    if kind != 0:  # a negotiate response: nothing to name
        return TokenInfo("schannel", "challenge" if kind == 1 else None)
    names: dict[int, str] = {}
    pos = 8
    for bit in (_NL_OEM_DOMAIN, _NL_OEM_COMPUTER):
        if flags & bit:
            end = token.find(b"\x00", pos)
            if end < 0:
                return TokenInfo("schannel", "negotiate")
            names[bit] = token[pos:end].decode("latin-1")
            pos = end + 1
    for bit in (_NL_DNS_DOMAIN, _NL_DNS_HOST, _NL_UTF8_COMPUTER):
        if flags & bit:
            name, pos = _dns_name(token, pos)
            if name is None:
                break
            names[bit] = name
    computer = names.get(_NL_OEM_COMPUTER) or names.get(_NL_UTF8_COMPUTER)
    domain = names.get(_NL_OEM_DOMAIN) or names.get(_NL_DNS_DOMAIN)
    # The secure channel is the computer's: its account is the computer name with a '$'.
    return TokenInfo("schannel", "negotiate", f"{computer}$" if computer else None, domain)


def _dns_name(data: bytes, pos: int) -> tuple[str | None, int]:
    labels = []
    while pos < len(data):
        n = data[pos]
        if n == 0:
            return ".".join(labels), pos + 1
        if n & 0xC0 or pos + 1 + n > len(data):  # compression pointers are not used here
            return None, pos
        labels.append(data[pos + 1:pos + 1 + n].decode("utf-8", "replace"))
        pos += 1 + n
    return None, pos
