"""SMB 3.x encryption (MS-SMB2 3.1.4.3, 3.3.4.1.4, 3.3.5.2.1.1): keys, and sealing and opening
whole messages in a transform header.

The AEAD primitives are `cryptography`'s AESCCM and AESGCM; nothing here implements AES. Keys
come from the SMB 3.x KDF (SP800-108 counter mode with HMAC-SHA256, smb2_signing.kdf_counter_mode)
as MS-SMB2 3.3.5.5.3 derives them:

    3.0, 3.0.2   encrypt (server to client): KDF(SessionKey, "SMB2AESCCM\\0", "ServerOut\\0")
                 decrypt (client to server): KDF(SessionKey, "SMB2AESCCM\\0", "ServerIn \\0")
    3.1.1        encrypt: KDF(SessionKey, "SMBS2CCipherKey\\0", PreauthIntegrityHashValue)
                 decrypt: KDF(SessionKey, "SMBC2SCipherKey\\0", PreauthIntegrityHashValue)

AES-256 ciphers take 256-bit keys derived from the whole session key (not its first 16 bytes).

Nonces: the server's are a counter under each key, so one is never used twice; a client's nonce
seen before under the same key is a replay and is refused. A `Sealer` / `Opener` never shows its
key in a repr.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from . import smb2_wire as w
from .smb2_signing import kdf_counter_mode, session_key_16

TAG_SIZE = 16
PREAUTH_SEED = b"\x00" * 64   # MS-SMB2 3.3.5.4: the hash chain starts from 64 zero bytes


def preauth_next(previous: bytes, message: bytes) -> bytes:
    """One step of the 3.1.1 preauth integrity hash (MS-SMB2 3.3.5.4, 3.3.5.5):
    SHA-512(previous value || the whole SMB2 message). The server keeps it for its own keys; the
    capture reader recomputes it from the messages it sees (capture/smb3_keys.py)."""
    return hashlib.sha512(previous + message).digest()


@dataclass(frozen=True)
class Cipher:
    ident: int
    name: str
    key_bits: int
    gcm: bool

    @property
    def nonce_size(self) -> int:
        """CCM takes the first 11 bytes of the Nonce field, GCM the first 12 (MS-SMB2 2.2.41)."""
        return 12 if self.gcm else 11

    def aead(self, key: bytes) -> AESCCM | AESGCM:
        return AESGCM(key) if self.gcm else AESCCM(key, tag_length=TAG_SIZE)


CIPHERS = {c.ident: c for c in (
    Cipher(w.CIPHER_AES128_CCM, "AES-128-CCM", 128, False),
    Cipher(w.CIPHER_AES128_GCM, "AES-128-GCM", 128, True),
    Cipher(w.CIPHER_AES256_CCM, "AES-256-CCM", 256, False),
    Cipher(w.CIPHER_AES256_GCM, "AES-256-GCM", 256, True),
)}


class EncryptionError(Exception):
    """A transform message that must not be processed; `reason` names why (the connection is
    then dropped, MS-SMB2 3.3.5.2.1.1)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def choose_cipher(offered: list[int]) -> int:
    """MS-SMB2 3.3.5.4: the first cipher of the client's list that the server supports."""
    return next((c for c in offered if c in CIPHERS), w.CIPHER_NONE)


def encryption_keys(dialect: int, cipher: Cipher, session_key: bytes, preauth: bytes) -> tuple[bytes, bytes]:
    """(server-to-client key, client-to-server key) for one session."""
    bits = cipher.key_bits
    key = session_key if bits == 256 else session_key_16(session_key)
    if dialect == w.DIALECT_311:
        return (kdf_counter_mode(key, b"SMBS2CCipherKey\x00", preauth, bits),
                kdf_counter_mode(key, b"SMBC2SCipherKey\x00", preauth, bits))
    return (kdf_counter_mode(key, b"SMB2AESCCM\x00", b"ServerOut\x00", bits),
            kdf_counter_mode(key, b"SMB2AESCCM\x00", b"ServerIn \x00", bits))


class Sealer:
    """Encrypts the server's messages of one session."""

    def __init__(self, cipher: Cipher, key: bytes, session_id: int) -> None:
        self.cipher = cipher
        self._aead = cipher.aead(key)
        self._session_id = session_id
        self._counter = 0

    def __repr__(self) -> str:
        return f"Sealer({self.cipher.name}, sent={self._counter})"

    def _next_nonce(self) -> bytes:
        self._counter += 1
        if self._counter >= 1 << 64:
            raise EncryptionError("nonce_space_exhausted")
        return self._counter.to_bytes(8, "little").ljust(self.cipher.nonce_size, b"\x00")

    def seal(self, message: bytes) -> bytes:
        """`message` (one SMB2 message or compound chain) inside a transform header."""
        nonce = self._next_nonce()
        header = w.TransformHeader(b"\x00" * TAG_SIZE, nonce.ljust(16, b"\x00"), len(message),
                                   w.TRANSFORM_FLAG_ENCRYPTED, self._session_id)
        aad = header.pack()[w.TRANSFORM_AAD_OFFSET:]
        sealed = self._aead.encrypt(nonce, message, aad)
        header.signature = sealed[-TAG_SIZE:]
        return header.pack() + sealed[:-TAG_SIZE]


class Opener:
    """Decrypts and authenticates the client's messages of one session, refusing replays."""

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        self.cipher = cipher
        self._aead = cipher.aead(key)
        self._seen: set[bytes] = set()

    def __repr__(self) -> str:
        return f"Opener({self.cipher.name}, received={len(self._seen)})"

    def open(self, header: w.TransformHeader, message: bytes) -> bytes:
        if header.flags != w.TRANSFORM_FLAG_ENCRYPTED:
            raise EncryptionError("transform_bad_flags")
        body = message[w.TRANSFORM_HEADER_SIZE:]
        if header.original_size != len(body):
            raise EncryptionError("transform_size_mismatch")
        nonce = header.nonce[:self.cipher.nonce_size]
        if nonce in self._seen:
            raise EncryptionError("transform_replayed_nonce")
        aad = message[w.TRANSFORM_AAD_OFFSET:w.TRANSFORM_HEADER_SIZE]
        try:
            plain = self._aead.decrypt(nonce, body + header.signature, aad)
        except InvalidTag:
            raise EncryptionError("transform_bad_signature") from None
        self._seen.add(nonce)      # only an authentic message uses up its nonce
        return plain
