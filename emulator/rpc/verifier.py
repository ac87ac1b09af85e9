"""The auth verifier of request and response PDUs at packet, integrity and privacy level
(MS-RPCE 2.2.2.11, 3.3.1.5.2).

A fragment is cut into the parts its verifier treats differently (`PacketParts`): header and
prefix, stub and padding, sec_trailer. Which parts a signature covers, and how sealing works, is
the mechanism's business (NTLM: MS-NLMP 3.4; Kerberos: RFC 4121 and MS-KILE 3.4.5.4); this
module only cuts and assembles. Sealing encrypts stub and padding together (the padding is part
of the protected body).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..auth.acceptor import LevelSizedSignatures, PacketParts, PacketProtection
from . import pdu as P

LEVEL_CONNECT, LEVEL_CALL, LEVEL_PACKET, LEVEL_INTEGRITY, LEVEL_PRIVACY = 2, 3, 4, 5, 6
# Stub padding so the trailer lands where Windows puts it: the body a multiple of 16 bytes.
_STUB_ALIGN = 16


class VerifyError(Exception):
    """A verifier did not check out. `reason` goes into the rpc.verify event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RpcProtection:
    """How an association's calls are protected once its security context is established (one
    per connection: we do not implement security context multiplexing)."""
    acceptor: PacketProtection
    auth_type: int
    auth_level: int
    context_id: int
    header_signing: bool = False


def signature_size(sc: RpcProtection) -> int:
    """Bytes of the auth_value at this association's level (Kerberos: MIC or wrap header)."""
    acceptor = sc.acceptor
    if isinstance(acceptor, LevelSizedSignatures):
        return acceptor.signature_size(sc.auth_level == LEVEL_PRIVACY)
    return acceptor.sig_size()


def signature_size_ok(sc: RpcProtection, size: int) -> bool:
    acceptor = sc.acceptor
    if isinstance(acceptor, LevelSizedSignatures):
        return acceptor.accepts_signature_size(size, sc.auth_level == LEVEL_PRIVACY)
    return size == acceptor.sig_size()


def effective_level(level: int) -> int:
    # MS-RPCE 3.3.1.5.2: call level is upgraded to packet level on connection-oriented transports.
    return LEVEL_PACKET if level == LEVEL_CALL else level


def unprotect(sc: RpcProtection, req: P.Request | P.Response) -> bytes:
    """Check the verifier of one request fragment and return its plaintext stub.

    Raises VerifyError; every call consumes one incoming sequence number of the mechanism,
    exactly as the client's own sign consumed one of its."""
    av = req.auth
    if av is None:
        raise VerifyError("missing_verifier")
    if (av.auth_type, av.auth_level, av.context_id) != (sc.auth_type, sc.auth_level, sc.context_id):
        raise VerifyError("verifier_mismatch")
    if not signature_size_ok(sc, len(av.token)):
        raise VerifyError("bad_signature")
    raw = req.raw
    trailer_at = len(raw) - len(av.token) - P.SEC_TRAILER_SIZE
    parts = PacketParts(pre=raw[:req.stub_offset], data=raw[req.stub_offset:trailer_at],
                        post=raw[trailer_at:trailer_at + P.SEC_TRAILER_SIZE],
                        header_signing=sc.header_signing)
    if sc.auth_level == LEVEL_PRIVACY:
        body = sc.acceptor.unseal_packet(parts, av.token)
        if body is None:
            raise VerifyError("bad_seal")
    else:
        if not sc.acceptor.check_packet(parts, av.token):
            raise VerifyError("bad_signature")
        body = parts.data
    return body[:len(body) - av.pad_length]


def protect(sc: RpcProtection, ptype: int, flags: int, call_id: int, prefix: bytes,
            stub: bytes) -> bytes:
    """Build one signed (integrity, packet) or sealed (privacy) fragment."""
    pad = (-len(stub)) % _STUB_ALIGN
    body = stub + b"\x00" * pad
    trailer = P.sec_trailer_bytes(sc.auth_type, sc.auth_level, pad, sc.context_id)
    sig_size = signature_size(sc)
    total = P.HEADER_SIZE + len(prefix) + len(body) + P.SEC_TRAILER_SIZE + sig_size
    head = P.header_bytes(ptype, flags, total, sig_size, call_id) + prefix
    parts = PacketParts(head, body, trailer, sc.header_signing)
    if sc.auth_level == LEVEL_PRIVACY:
        sealed, signature = sc.acceptor.seal_packet(parts)
        return head + sealed + trailer + signature
    return head + body + trailer + sc.acceptor.sign_packet(parts)


def overhead(sc: RpcProtection | None, signed: bool) -> int:
    """Bytes a fragment spends on verifier and worst-case padding."""
    if sc is None or not signed:
        return 0
    return P.SEC_TRAILER_SIZE + signature_size(sc) + _STUB_ALIGN - 1
