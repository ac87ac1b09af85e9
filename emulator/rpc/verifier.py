"""The auth verifier of request and response PDUs at packet, integrity and privacy level
(MS-RPCE 2.2.2.11, 3.3.1.5.2; MS-NLMP 3.4).

The signature covers the whole PDU - header, body, padding and sec_trailer, with the stub in
plaintext - and not the signature itself. That is what Windows and Samba do for NTLMSSP with
extended session security, and what MS-RPCE 2.2.2.3 describes when PFC_SUPPORT_HEADER_SIGN is
negotiated; an acceptor that did not negotiate ESS signs only the stub (MS-NLMP 3.4.4.1).
Sealing encrypts stub and padding together (the padding is part of the protected body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import pdu as P

NTLM_SIGNATURE_SIZE = 16
NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
LEVEL_CONNECT, LEVEL_CALL, LEVEL_PACKET, LEVEL_INTEGRITY, LEVEL_PRIVACY = 2, 3, 4, 5, 6
# Stub padding so the trailer lands where Windows puts it: the body a multiple of 16 bytes.
_STUB_ALIGN = 16


class VerifyError(Exception):
    """A verifier did not check out. `reason` goes into the rpc.verify event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SecurityContext:
    """The negotiated security context of a connection (one per connection: we do not
    implement security context multiplexing)."""
    acceptor: Any                 # emulator.ntlm SecurityAcceptor, authenticated
    auth_type: int
    auth_level: int
    context_id: int

    @property
    def whole_pdu(self) -> bool:
        # MS-NLMP 3.4.4: with extended session security the MAC is an HMAC over whatever we
        # pass, and Windows passes the whole PDU; without it only the stub is covered. An
        # acceptor that cannot tell us (SPNEGO wrappers) is assumed to use ESS, which is all a
        # policy without NTLMv1 can negotiate.
        flags = getattr(self.acceptor, "negotiated_flags", None)
        if isinstance(flags, int) and flags:
            return bool(flags & NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY)
        return True


def effective_level(level: int) -> int:
    # MS-RPCE 3.3.1.5.2: call level is upgraded to packet level on connection-oriented transports.
    return LEVEL_PACKET if level == LEVEL_CALL else level


def unprotect(sc: SecurityContext, req: P.Request | P.Response) -> bytes:
    """Check the verifier of one request fragment and return its plaintext stub.

    Raises VerifyError; every call consumes one incoming sequence number (MS-NLMP 3.4.4),
    exactly as the client's own sign consumed one of its."""
    av = req.auth
    if av is None:
        raise VerifyError("missing_verifier")
    if (av.auth_type, av.auth_level, av.context_id) != (sc.auth_type, sc.auth_level, sc.context_id):
        raise VerifyError("verifier_mismatch")
    if len(av.token) != NTLM_SIGNATURE_SIZE:
        raise VerifyError("bad_signature")
    raw = req.raw
    trailer_at = len(raw) - len(av.token) - P.SEC_TRAILER_SIZE
    body = raw[req.stub_offset:trailer_at]      # stub + pad
    if sc.auth_level == LEVEL_PRIVACY:
        body = sc.acceptor.unseal(body)
    signed = raw[:req.stub_offset] + body + raw[trailer_at:trailer_at + P.SEC_TRAILER_SIZE]
    message = signed if sc.whole_pdu else body
    if not sc.acceptor.verify(message, av.token):
        raise VerifyError("bad_signature" if sc.auth_level != LEVEL_PRIVACY else "bad_seal")
    return body[:len(body) - av.pad_length]


def protect(sc: SecurityContext, ptype: int, flags: int, call_id: int, prefix: bytes,
            stub: bytes) -> bytes:
    """Build one signed (integrity, packet) or sealed (privacy) fragment."""
    pad = (-len(stub)) % _STUB_ALIGN
    body = stub + b"\x00" * pad
    trailer = P.sec_trailer_bytes(sc.auth_type, sc.auth_level, pad, sc.context_id)
    total = P.HEADER_SIZE + len(prefix) + len(body) + P.SEC_TRAILER_SIZE + NTLM_SIGNATURE_SIZE
    head = P.header_bytes(ptype, flags, total, NTLM_SIGNATURE_SIZE, call_id) + prefix
    plain_pdu = head + body + trailer
    if sc.auth_level == LEVEL_PRIVACY:
        # MS-NLMP 3.4.3: seal first, then sign the plaintext message; the RC4 stream is shared.
        sealed = sc.acceptor.seal(body)
        signature = sc.acceptor.sign(plain_pdu if sc.whole_pdu else body)
        return head + sealed + trailer + signature
    signature = sc.acceptor.sign(plain_pdu if sc.whole_pdu else body)
    return plain_pdu + signature


def overhead(sc: SecurityContext | None, signed: bool) -> int:
    """Bytes a fragment spends on verifier and worst-case padding."""
    if sc is None or not signed:
        return 0
    return P.SEC_TRAILER_SIZE + NTLM_SIGNATURE_SIZE + _STUB_ALIGN - 1
