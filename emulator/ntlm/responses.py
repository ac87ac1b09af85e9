"""Checking NTLM challenge responses (MS-NLMP 3.3) and deriving the session base key and
key exchange key (3.4.5.1). Pure functions over bytes; the caller decides policy."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from Cryptodome.Hash import MD4
from impacket import ntlm as imp

from .keys import hmac_md5

NTLMV2_BLOB_MIN = 28      # RespType .. Reserved3 of NTLMv2_CLIENT_CHALLENGE (MS-NLMP 2.2.2.7)
NT_PROOF_LEN = 16


def classify(user: str, lm: bytes, nt: bytes) -> str:
    """Which response the client sent: "anonymous", "NTLMv2", "NTLMv1", "LM" or "malformed"."""
    if user == "" and nt == b"" and lm in (b"", b"\x00"):
        return "anonymous"                      # MS-NLMP 3.2.5.1.2
    if len(nt) >= NT_PROOF_LEN + NTLMV2_BLOB_MIN:
        return "NTLMv2"
    if len(nt) == 24:
        return "NTLMv1"
    if nt == b"" and len(lm) == 24:
        return "LM"
    return "malformed"


@dataclass(frozen=True)
class Check:
    ok: bool
    session_base_key: bytes = field(repr=False, default=b"")
    key_exchange_key: bytes = field(repr=False, default=b"")


def ntowf_v2(nt_hash: bytes, user: str, domain: str) -> bytes:
    # MS-NLMP 3.3.2: the user name upper-cased, the domain exactly as the client sent it.
    return hmac_md5(nt_hash, (user.upper() + domain).encode("utf-16-le"))


def check_ntlmv2(nt_hash: bytes, user: str, domain: str, server_challenge: bytes,
                 nt_response: bytes) -> Check:
    """NTProofStr = HMAC_MD5(NTOWFv2, ServerChallenge + blob); the blob carries the client
    challenge, timestamp and AV pairs, so any change to them fails here too."""
    response_key = ntowf_v2(nt_hash, user, domain)
    proof, blob = nt_response[:NT_PROOF_LEN], nt_response[NT_PROOF_LEN:]
    expected = hmac_md5(response_key, server_challenge + blob)
    ok = hmac.compare_digest(expected, proof)
    base = hmac_md5(response_key, proof)
    # MS-NLMP 3.4.5.1: for NTLMv2 the key exchange key is the session base key.
    return Check(ok, base, base)


def _desl(key16: bytes, data8: bytes) -> bytes:
    # DESL (MS-NLMP 6): three DES blocks under the 16-byte key padded to 21 bytes.
    return imp.ntlmssp_DES_encrypt(key16 + b"\x00" * 5, data8)


def check_ntlmv1(nt_hash: bytes, server_challenge: bytes, lm: bytes, nt: bytes, flags: int) -> Check:
    """NTLMv1 (MS-NLMP 3.3.1), with or without extended session security."""
    ess = bool(flags & imp.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY)
    if ess:
        if len(lm) < 8:
            return Check(False)
        client_challenge = lm[:8]
        digest = hashlib.md5(server_challenge + client_challenge).digest()[:8]
        expected = _desl(nt_hash, digest)
    else:
        expected = _desl(nt_hash, server_challenge)
    ok = hmac.compare_digest(expected, nt)
    base = MD4.new(nt_hash).digest()
    if ess:
        kx = hmac_md5(base, server_challenge + lm[:8])
    else:
        # LM_KEY and REQUEST_NON_NT_SESSION_KEY are never granted by this server.
        kx = base
    return Check(ok, base, kx)


def check_lm(lm_hash: bytes | None, nt_hash: bytes, server_challenge: bytes, lm: bytes) -> Check:
    """An LM-only response (MS-NLMP 3.3.1 with an empty NtChallengeResponse). Only a user whose
    password is known to the lab has an LM hash."""
    if lm_hash is None:
        return Check(False)
    ok = hmac.compare_digest(_desl(lm_hash, server_challenge), lm)
    base = MD4.new(nt_hash).digest()
    return Check(ok, base, base)


def lm_hash_of(password: str | None) -> bytes | None:
    if password is None:
        return None
    return imp.compute_lmhash(password)
