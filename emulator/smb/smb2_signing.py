"""SMB2/SMB3 message signing (MS-SMB2 3.1.4.1) and key derivation (MS-SMB2 3.1.4.2, 3.3.5.5.3).

2.0.2 and 2.1 sign with HMAC-SHA256 keyed by the session key; 3.x derives a signing key with the
SP800-108 counter-mode KDF and signs with AES-128-CMAC, or with the algorithm negotiated in a
3.1.1 SIGNING_CAPABILITIES context (AES-128-GMAC: AES-GCM over an empty plaintext with the whole
message as associated data, `cryptography`'s AESGCM). Keys live in a `Signer`, whose repr hides
them.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import smb2_wire as w

SIGNATURE_OFFSET = 48          # Signature field inside the 64-byte header


def kdf_counter_mode(key: bytes, label: bytes, context: bytes, bits: int = 128) -> bytes:
    """SP800-108 KDF in counter mode with HMAC-SHA256, r=32, one iteration (MS-SMB2 3.1.4.2)."""
    data = (1).to_bytes(4, "big") + label + b"\x00" + context + bits.to_bytes(4, "big")
    return hmac.new(key, data, hashlib.sha256).digest()[: bits // 8]


def session_key_16(exported: bytes) -> bytes:
    """MS-SMB2 3.3.5.5.3: the first 16 bytes of the GSS session key, right-padded with zeros."""
    return exported[:16].ljust(16, b"\x00")


def signing_key(dialect: int, session_key: bytes, preauth_hash: bytes | None) -> bytes:
    if dialect < w.DIALECT_300:
        return session_key
    if dialect == w.DIALECT_311:
        return kdf_counter_mode(session_key, b"SMBSigningKey\x00", preauth_hash or b"")
    return kdf_counter_mode(session_key, b"SMB2AESCMAC\x00", b"SmbSign\x00")


def gmac_nonce(message: bytes) -> bytes:
    """MS-SMB2 3.1.4.1: MessageId, then 4 bytes whose bit 0 says the sender is the server and
    bit 1 that the message is a CANCEL request."""
    header = w.parse_header(message)
    role = 1 if header.flags & w.FLAGS_SERVER_TO_REDIR else 0
    cancel = 2 if header.command == w.CANCEL and not role else 0
    return header.message_id.to_bytes(8, "little") + (role | cancel).to_bytes(4, "little")


class Signer:
    """Signs and verifies single SMB2 messages (one compound element each) for one session."""

    def __init__(self, dialect: int, key: bytes, algorithm: int | None = None) -> None:
        self._key = key
        if algorithm is None:
            algorithm = w.SIGNING_HMAC_SHA256 if dialect < w.DIALECT_300 else w.SIGNING_AES_CMAC
        self.algorithm = algorithm

    def __repr__(self) -> str:
        return f"Signer(algorithm={self.algorithm})"

    def _mac(self, message: bytes) -> bytes:
        zeroed = message[:SIGNATURE_OFFSET] + b"\x00" * 16 + message[SIGNATURE_OFFSET + 16:]
        if self.algorithm == w.SIGNING_HMAC_SHA256:
            return hmac.new(self._key, zeroed, hashlib.sha256).digest()[:16]
        if self.algorithm == w.SIGNING_AES_GMAC:
            return AESGCM(self._key).encrypt(gmac_nonce(message), b"", zeroed)
        c = cmac.CMAC(algorithms.AES(self._key))
        c.update(zeroed)
        return c.finalize()

    def sign(self, message: bytes) -> bytes:
        """`message` with SMB2_FLAGS_SIGNED set and its Signature filled in."""
        flags = int.from_bytes(message[16:20], "little") | w.FLAGS_SIGNED
        message = message[:16] + flags.to_bytes(4, "little") + message[20:]
        return message[:SIGNATURE_OFFSET] + self._mac(message) + message[SIGNATURE_OFFSET + 16:]

    def verify(self, message: bytes) -> bool:
        return hmac.compare_digest(self._mac(message), message[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 16])
