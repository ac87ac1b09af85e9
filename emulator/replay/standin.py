"""Replay standing in for the client in one NTLM exchange (MS-NLMP 3.1.5, client side).

A captured AUTHENTICATE answers the capture's CHALLENGE: its NTLMv2 proof is an HMAC over that
server challenge, so no server with a fresh challenge accepts it. When the analyst supplies the
user's password (or a lab config holds it), replay computes a new AUTHENTICATE over *our*
server's CHALLENGE with impacket's ntlm module, for the same user and domain, the same NTLM
version and the captured NEGOTIATE's flags, in the same wrapping (raw NTLMSSP or SPNEGO
NegTokenResp). It never alters a captured token in any other way.

Secrets: the keyring holds NT hashes, the result holds the exported session key for signing
and sealing; neither has a repr that shows them, and neither reaches an event or the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..capture.authtokens import NTLMSSP_SIGNATURE, TokenInfo, inspect_token
from ..capture.unseal import Keyring

if TYPE_CHECKING:  # imported when keys are used: impacket is slow to import
    from ..ntlm.keys import SessionSecurity

NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000


def ntlm_part(token: bytes) -> bytes | None:
    """The NTLMSSP message inside a token, raw or wrapped in SPNEGO/GSS framing."""
    pos = token.find(NTLMSSP_SIGNATURE)
    return token[pos:] if pos >= 0 else None


def server_challenge(token: bytes) -> bytes | None:
    """The 8-byte server challenge of an NTLM CHALLENGE inside `token`, if it holds one."""
    info = inspect_token(token)
    return info.server_challenge if info.message == "challenge" else None


@dataclass
class Authored:
    """A re-authored AUTHENTICATE and what the new context negotiated."""
    token: bytes = field(repr=False)
    user: str
    domain: str
    ntlm_version: str
    flags: int
    exported_session_key: bytes = field(repr=False)

    def client_security(self) -> "SessionSecurity":
        """Sign/seal state of the new context, as the client holds it (MS-NLMP 3.4)."""
        from ..ntlm.keys import SessionSecurity
        return SessionSecurity(self.exported_session_key, self.flags, "client")


class Unauthorable(Exception):
    """Why replay cannot stand in here; the captured token is then sent unchanged."""


def reauthor(captured_auth: bytes, captured_negotiate: bytes | None, our_challenge: bytes,
             keyring: Keyring) -> Authored:
    """A fresh AUTHENTICATE for the captured one's user, answering `our_challenge` (the
    server's token that carried our CHALLENGE, raw or SPNEGO)."""
    from impacket import ntlm as imp
    from impacket.spnego import SPNEGO_NegTokenResp

    info: TokenInfo = inspect_token(captured_auth)
    if info.mechanism != "ntlm" or info.message != "authenticate":
        raise Unauthorable(f"the captured token is {info.mechanism}, not an NTLM AUTHENTICATE")
    if info.anonymous or not info.user:
        raise Unauthorable("the captured logon is anonymous: there is nothing to re-author")
    nt_hash = keyring.nt_hash(info.user)
    if nt_hash is None:
        raise Unauthorable(f"no password for {info.user} (give --password {info.user}:PW)")
    challenge = ntlm_part(our_challenge)
    if challenge is None or inspect_token(challenge).message != "challenge":
        raise Unauthorable("our server's answer carried no NTLM CHALLENGE")
    negotiate = imp.NTLMAuthNegotiate()
    raw_negotiate = ntlm_part(captured_negotiate) if captured_negotiate else None
    if raw_negotiate is not None:
        try:
            negotiate.fromString(raw_negotiate)
        except Exception as exc:  # impacket's structures raise bare errors on odd buffers
            raise Unauthorable(f"the captured NEGOTIATE does not parse ({type(exc).__name__})") from None
    else:
        # No NEGOTIATE in the capture (a connectionless-style exchange): take the flags the
        # AUTHENTICATE itself announces.
        captured = imp.NTLMAuthChallengeResponse()
        try:
            captured.fromString(ntlm_part(captured_auth) or b"")
        except Exception as exc:  # impacket's structures raise bare errors on odd buffers
            raise Unauthorable(f"the captured AUTHENTICATE does not parse ({type(exc).__name__})") from None
        negotiate["flags"] = captured["flags"]
    v2 = info.ntlm_version != "v1"
    try:
        auth, exported = imp.getNTLMSSPType3(negotiate, challenge, info.user, "", info.domain or "",
                                             lmhash="", nthash=nt_hash, use_ntlmv2=v2)
    except Exception as exc:  # a CHALLENGE impacket cannot read
        raise Unauthorable(f"impacket could not answer our CHALLENGE ({type(exc).__name__})") from None
    message = auth.getData()
    if captured_auth.startswith(NTLMSSP_SIGNATURE):
        token = message
    else:
        # MS-SPNG 3.3.5.1: the client's second leg is a NegTokenResp carrying the AUTHENTICATE.
        resp = SPNEGO_NegTokenResp()
        resp["ResponseToken"] = message
        token = resp.getData()
    return Authored(token, info.user, info.domain or "", "v2" if v2 else "v1", auth["flags"],
                    bytes(exported))
