"""What the SMB and DCE/RPC engines may ask of a security mechanism.

Modelled on Samba's gensec: a mechanism (NTLM, SPNEGO, Kerberos) turns the client's tokens into
answers until it is complete, then names the user it proved and protects packets with the keys
it established. The engines never look inside a mechanism; `SecurityContext` (context.py) drives
one through its states and decides, once, whose identity the server acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .results import AuthResult, StepResult


class KeyUnavailable(RuntimeError):
    """Packet protection asked of a context that has no session key (failed, pending,
    anonymous or guest)."""


@dataclass(frozen=True)
class PacketParts:
    """One DCE/RPC fragment cut the way its verifier treats it (MS-RPCE 2.2.2.11).

    `pre` (the header and the request or response prefix) and `post` (the sec_trailer) are
    covered by the signature but never encrypted; `data` (stub and padding) is both signed and,
    at privacy level, sealed. `header_signing` is PFC_SUPPORT_HEADER_SIGN as agreed at bind
    time: mechanisms that sign the header only when it was negotiated (GSS-API Kerberos) read
    it, NTLM with extended session security always signs the whole PDU.
    """
    pre: bytes
    data: bytes
    post: bytes
    header_signing: bool = False


class PacketProtection(Protocol):
    """Signing and sealing of DCE/RPC fragments with an established context's keys. A whole
    acceptor provides it; so does a bare NTLM SessionSecurity (a client's or a capture
    reader's side of the same keys)."""

    def sig_size(self) -> int:
        """Bytes of the auth_value of a signed or sealed fragment."""
        ...

    def sign_packet(self, parts: PacketParts) -> bytes: ...

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool: ...

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        """(sealed data, signature)."""
        ...

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        """The plaintext data, or None when the seal or signature does not verify."""
        ...


@runtime_checkable
class LevelSizedSignatures(Protocol):
    """A mechanism whose DCE/RPC auth_value differs in size between signing and sealing
    (GSS-API Kerberos: a MIC token at integrity, a wrap token's header at privacy). NTLM's is
    16 bytes at every level and does not provide this; `sig_size()` serves it."""

    def signature_size(self, sealed: bool) -> int:
        """Bytes of the auth_value this side writes."""
        ...

    def accepts_signature_size(self, size: int, sealed: bool) -> bool:
        """Whether a peer's auth_value of `size` bytes can be a valid token at all. A GSS wrap
        token says its own lengths (EC, RRC; RFC 4121 4.2.4), and clients differ in the filler
        they choose, so sealed sizes vary."""
        ...


class SecurityAcceptor(PacketProtection, Protocol):
    """The server side of one security context of one mechanism.

    `step` never raises on bad input: it completes the context with a failure. Packet
    protection raises KeyUnavailable unless the context authenticated a user.
    """

    @property
    def result(self) -> AuthResult | None:
        """The outcome once complete; None while the exchange goes on."""
        ...

    @property
    def complete(self) -> bool: ...

    @property
    def session_key(self) -> bytes:
        """The key SMB signing and the SMB 3.x KDF start from (NTLM's exported session key,
        Kerberos' subkey); empty unless a user was authenticated."""
        ...

    def step(self, token: bytes) -> StepResult: ...
