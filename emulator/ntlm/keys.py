"""NTLM session keys and message security (MS-NLMP 3.4).

One `SessionSecurity` holds both directions of one authenticated context. The server signs and
seals with the server-to-client keys and checks with the client-to-server keys; a client does
the opposite, which is why the same class serves the tests' initiator. With extended session
security (ESS) each direction has its own signing key, RC4 state and sequence number
(MS-NLMP 3.4.4.2, 3.4.5); without it one RC4 state and one counter serve both (3.4.4.1).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct

from Cryptodome.Cipher import ARC4
from impacket import ntlm as imp

from ..auth.acceptor import PacketParts

try:  # cryptography >= 43 keeps RC4 under "decrepit"; older releases under algorithms
    from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4 as _CryptographyARC4
except ImportError:  # pragma: no cover - depends on the installed cryptography
    try:
        from cryptography.hazmat.primitives.ciphers.algorithms import ARC4 as _CryptographyARC4
    except ImportError:
        _CryptographyARC4 = None
if _CryptographyARC4 is not None:
    from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher

SIGNATURE_LEN = 16

# How a peer wrote the ESS checksum of its SPNEGO mechListMIC (see verify_mech_list_mic).
MIC_FORM_SPEC = "spec"
MIC_FORM_RC4_CHECKSUM = "rc4_checksum_without_key_exch"

_MAGIC = {
    ("sign", "client"): b"session key to client-to-server signing key magic constant\x00",
    ("sign", "server"): b"session key to server-to-client signing key magic constant\x00",
    ("seal", "client"): b"session key to client-to-server sealing key magic constant\x00",
    ("seal", "server"): b"session key to server-to-client sealing key magic constant\x00",
}


def hmac_md5(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.md5).digest()


def sign_key(exported: bytes, flags: int, sender: str) -> bytes | None:
    """SIGNKEY (MS-NLMP 3.4.5.2): only ESS has separate signing keys."""
    if not flags & imp.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY:
        return None
    return hashlib.md5(exported + _MAGIC[("sign", sender)]).digest()


def seal_key(exported: bytes, flags: int, sender: str) -> bytes:
    """SEALKEY (MS-NLMP 3.4.5.3), including the weakened 40/56-bit keys the spec still
    defines, because a client that negotiates them computes them that way."""
    if flags & imp.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY:
        if flags & imp.NTLMSSP_NEGOTIATE_128:
            base = exported
        elif flags & imp.NTLMSSP_NEGOTIATE_56:
            base = exported[:7]
        else:
            base = exported[:5]
        return hashlib.md5(base + _MAGIC[("seal", sender)]).digest()
    if flags & imp.NTLMSSP_NEGOTIATE_LM_KEY:
        if flags & imp.NTLMSSP_NEGOTIATE_56:
            return exported[:7] + b"\xa0"
        return exported[:5] + b"\xe5\x38\xb0"
    return exported


class _Rc4Stream:
    """One RC4 key stream (MS-NLMP 3.4: sealing and the ESS checksum share it, in call order).

    cryptography's OpenSSL-backed stream costs a quarter of Cryptodome's per call, and every
    sealed PDU makes two or three calls; encrypt and decrypt are the same XOR."""

    __slots__ = ("encrypt", "decrypt")

    def __init__(self, key: bytes) -> None:
        if _CryptographyARC4 is not None:
            update = _Cipher(_CryptographyARC4(key), mode=None).encryptor().update
        else:  # pragma: no cover
            update = ARC4.new(key).encrypt
        self.encrypt = self.decrypt = update

    def __repr__(self) -> str:
        return "<rc4 stream>"


class _Direction:
    """Keys and state of one direction of traffic."""

    __slots__ = ("sign_key", "seal_key", "_rc4", "seq")

    def __init__(self, sign_key: bytes | None, seal_key: bytes) -> None:
        self.sign_key = sign_key
        self.seal_key = seal_key
        self._rc4: _Rc4Stream | None = None
        self.seq = 0

    @property
    def rc4(self) -> _Rc4Stream:
        # Keyed on first use, at the same point of the stream: an SMB session's NTLM context
        # never seals or signs through it, and keying RC4 for both directions at every logon
        # showed in the named-pipe logon's profile.
        if self._rc4 is None:
            self._rc4 = _Rc4Stream(self.seal_key)
        return self._rc4

    def restart_rc4(self) -> None:
        """The stream starts again from the key (keyed again on its next use)."""
        self._rc4 = None

    def __repr__(self) -> str:
        return f"<direction seq={self.seq}>"


class SessionSecurity:
    """sign/verify/seal/unseal for one context. `role` is "server" or "client"."""

    def __init__(self, exported_session_key: bytes, flags: int, role: str) -> None:
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        if len(exported_session_key) != 16:
            raise ValueError("the exported session key must be 16 bytes")
        self._flags = flags
        self._ess = bool(flags & imp.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY)
        self._key_exch = bool(flags & imp.NTLMSSP_NEGOTIATE_KEY_EXCH)
        peer = "client" if role == "server" else "server"
        if self._ess:
            self._out = _Direction(sign_key(exported_session_key, flags, role),
                                   seal_key(exported_session_key, flags, role))
            self._in = _Direction(sign_key(exported_session_key, flags, peer),
                                  seal_key(exported_session_key, flags, peer))
        else:
            # MS-NLMP 3.4.4.1: one RC4 handle and one sequence counter for both directions.
            shared = _Direction(None, seal_key(exported_session_key, flags, role))
            self._out = self._in = shared
        self.role = role

    def __repr__(self) -> str:
        return (f"SessionSecurity(role={self.role!r}, ess={self._ess}, "
                f"out_seq={self._out.seq}, in_seq={self._in.seq})")

    @property
    def flags(self) -> int:
        return self._flags

    # ---- MAC (MS-NLMP 3.4.4)

    def _mac(self, d: _Direction, message: bytes) -> bytes:
        seq = d.seq
        d.seq = (d.seq + 1) & 0xFFFFFFFF
        if self._ess:
            checksum = hmac_md5(d.sign_key, struct.pack("<I", seq) + message)[:8]
            if self._key_exch:
                checksum = d.rc4.encrypt(checksum)
            return struct.pack("<I", 1) + checksum + struct.pack("<I", seq)
        crc = struct.pack("<I", binascii.crc32(message) & 0xFFFFFFFF)
        # RandomPad, Checksum and SeqNum all pass through the RC4 stream, in that order.
        d.rc4.encrypt(b"\x00" * 4)
        checksum = d.rc4.encrypt(crc)
        seq_field = struct.unpack("<I", d.rc4.encrypt(b"\x00" * 4))[0] ^ seq
        return struct.pack("<I", 1) + b"\x00" * 4 + checksum + struct.pack("<I", seq_field)

    def sign(self, message: bytes) -> bytes:
        return self._mac(self._out, message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        expected = self._mac(self._in, message)
        if len(signature) != SIGNATURE_LEN:
            return False
        if not self._ess:
            # The RandomPad is not covered: compare version, checksum and sequence number.
            return hmac.compare_digest(expected[:4] + expected[8:], signature[:4] + signature[8:])
        return hmac.compare_digest(expected, signature)

    def seal(self, plaintext: bytes) -> bytes:
        return self._out.rc4.encrypt(plaintext)

    def unseal(self, ciphertext: bytes) -> bytes:
        return self._in.rc4.decrypt(ciphertext)

    # ---- DCE/RPC packet protection (MS-RPCE 2.2.2.11 over MS-NLMP 3.4)

    def sig_size(self) -> int:
        return SIGNATURE_LEN

    def _signed(self, parts: PacketParts) -> bytes:
        # MS-NLMP 3.4.4: with extended session security the MAC is an HMAC over whatever the
        # caller passes, and Windows and Samba pass the whole PDU, header signing or not;
        # without it (NTLMv1 by policy) only the stub is covered.
        return parts.pre + parts.data + parts.post if self._ess else parts.data

    def sign_packet(self, parts: PacketParts) -> bytes:
        return self.sign(self._signed(parts))

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        return self.verify(self._signed(parts), signature)

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        # MS-NLMP 3.4.3: seal first, then sign the plaintext message; the RC4 stream is shared.
        sealed = self.seal(parts.data)
        return sealed, self.sign(self._signed(parts))

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        plain = self.unseal(parts.data)
        clear = PacketParts(parts.pre, plain, parts.post, parts.header_signing)
        return plain if self.verify(self._signed(clear), signature) else None

    # ---- SPNEGO mechListMIC (MS-SPNG 3.3.5.1): the RC4 state used for the mechListMIC is the
    # state the first application message starts with, so it is restored afterwards.

    def reset_outgoing_rc4(self) -> None:
        self._out.restart_rc4()

    def reset_incoming_rc4(self) -> None:
        self._in.restart_rc4()

    def verify_mech_list_mic(self, mech_list: bytes, mic: bytes) -> str | None:
        """Check a client's mechListMIC; return the checksum form that verified, or None.

        MS-NLMP 3.4.4.2 passes the ESS checksum through RC4 only when KEY_EXCH was negotiated
        (Samba and impacket agree). scapy 2.8 always passes it through RC4, which only shows
        when KEY_EXCH was not negotiated: a DCE/RPC bind at level connect, where the client asks
        for neither signing nor sealing. Both forms are HMAC-MD5 under the client signing key,
        which only the holder of the session key can compute, so accepting the second form as
        well keeps the downgrade protection of the MIC intact: it is verified, never skipped.
        Either way one incoming sequence number is consumed and the RC4 state is left fresh for
        the first application message (MS-SPNG 3.3.5.1).
        """
        form = None
        if self.verify(mech_list, mic):
            form = MIC_FORM_SPEC
        elif self._ess and not self._key_exch and len(mic) == SIGNATURE_LEN:
            d = self._in
            seq = (d.seq - 1) & 0xFFFFFFFF          # the number verify() just consumed
            plain = hmac_md5(d.sign_key, struct.pack("<I", seq) + mech_list)[:8]
            expected = (struct.pack("<I", 1) + ARC4.new(d.seal_key).encrypt(plain)
                        + struct.pack("<I", seq))
            if hmac.compare_digest(expected, mic):
                form = MIC_FORM_RC4_CHECKSUM
        self.reset_incoming_rc4()
        return form

    def sign_mech_list_mic(self, mech_list: bytes, form: str = MIC_FORM_SPEC) -> bytes:
        """The server's mechListMIC, in the checksum form the client used (see
        verify_mech_list_mic), so that a client which checks it accepts it."""
        if form == MIC_FORM_RC4_CHECKSUM and self._ess and not self._key_exch:
            d = self._out
            seq = d.seq
            d.seq = (d.seq + 1) & 0xFFFFFFFF
            plain = hmac_md5(d.sign_key, struct.pack("<I", seq) + mech_list)[:8]
            mic = struct.pack("<I", 1) + ARC4.new(d.seal_key).encrypt(plain) + struct.pack("<I", seq)
        else:
            mic = self.sign(mech_list)
        self.reset_outgoing_rc4()
        return mic
