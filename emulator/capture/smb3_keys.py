"""Reading SMB3-encrypted messages in a capture, given a user's password or NT hash.

An observer who knows the password of the user behind an SMB session can do what the client
does: recover the session key from the captured NTLM AUTHENTICATE (capture/unseal.py derives the
ExportedSessionKey, MS-NLMP 3.4.5.1), derive the session's encryption keys with the server's own
code (smb/smb3_encryption.py: the SMB 3.x KDF, MS-SMB2 3.3.5.5.3), and open each TRANSFORM
message with the server's own `Opener`, which authenticates it (a bad tag is a verification
failure, reported; nothing unauthenticated is read).

What the keys need besides the session key, read from the clear messages before them:

    3.0, 3.0.2   AES-128-CCM; KDF labels "SMB2AESCCM", contexts "ServerIn " / "ServerOut"
    3.1.1        the cipher of the NEGOTIATE response's ENCRYPTION_CAPABILITIES context, and the
                 session's preauth integrity hash: SHA-512 chained over the NEGOTIATE request and
                 response, then every SESSION_SETUP request and every non-final response of the
                 session (MS-SMB2 3.3.5.4, 3.3.5.5) -- recomputed here from the captured bytes.

Kerberos sessions: the session key is the AP-REP's subkey, else the AP-REQ authenticator's,
else the ticket's session key (MS-KILE 3.1.1.2), which only a keytab opens (explain --keytab,
capture/kerberos_keys.py); without one, Kerberos sessions read as `kerberos_needs_keytab`.

No key leaves this module: the per-session state has a repr without key material and the
reports name only ciphers, counts and reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sansio import ProtocolError
from ..smb import smb2_wire as s2
from ..smb.smb3_encryption import (CIPHERS, PREAUTH_SEED, EncryptionError, Opener, encryption_keys,
                                   preauth_next)
from .authtokens import TokenInfo, inspect_token
from .unseal import Keyring, derive

STATUS_SUCCESS = 0
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
MAX_PENDING = 256
MAX_SESSIONS = 1024

# Why a session's messages stay unread (SmbSession.decryption); "ok" when they are read.
NO_KEYS = "no_keys"                  # explain ran without --password / --lab
NEEDS_KEYTAB = "kerberos_needs_keytab"
NO_CIPHER = "no_cipher_negotiated"
NO_SETUP = "session_setup_not_captured"


@dataclass
class _Setup:
    """One session's exchange as far as the capture showed it."""
    preauth: bytes = field(default=b"", repr=False)
    token: TokenInfo | None = field(default=None, repr=False)   # the client's latest token
    answer: TokenInfo | None = field(default=None, repr=False)  # the server's latest token
    challenge: bytes | None = field(default=None, repr=False)
    established: bool = False
    reason: str = NO_SETUP
    cipher: str | None = None
    openers: dict[bool, Opener] = field(default_factory=dict, repr=False)  # by from_client


@dataclass
class Opened:
    """What became of one TRANSFORM message."""
    session_id: int
    plain: bytes | None        # the SMB2 message(s) inside, authenticated; None otherwise
    reason: str                # "ok", why no key was at hand, or the Opener's verification failure
    cipher: str | None

    @property
    def failed_verification(self) -> bool:
        """A key was at hand and the message did not authenticate under it."""
        return self.plain is None and self.reason.startswith("transform_")


class Smb3Reader:
    """Per TCP stream: the negotiated dialect and cipher, the preauth hashes, and for each
    session whose key is known the two openers (client-to-server, server-to-client)."""

    def __init__(self, keyring: Keyring | None) -> None:
        self._keyring = keyring
        self._dialect = 0
        self._cipher = s2.CIPHER_NONE
        self._negotiate_request = b""
        self._connection_preauth = b""
        self._pending: dict[int, tuple[int, bytes, TokenInfo | None]] = {}  # MessageId ->
        self._sessions: dict[int, _Setup] = {}

    def __repr__(self) -> str:
        return f"<Smb3Reader dialect=0x{self._dialect:04x} sessions={len(self._sessions)}>"

    # -- the clear messages ------------------------------------------------------------------

    def observe(self, m: bytes, h: s2.Header) -> None:
        """One clear SMB2 message (a compound's element), either direction."""
        reply = bool(h.flags & s2.FLAGS_SERVER_TO_REDIR)
        if h.command == s2.NEGOTIATE:
            if not reply:
                self._negotiate_request = m
            elif h.status == STATUS_SUCCESS:
                self._negotiated(m)
        elif h.command == s2.SESSION_SETUP:
            if not reply:
                self._setup_request(m, h)
            elif h.status != 0x00000103:  # STATUS_PENDING: the final answer follows
                self._setup_response(m, h)

    def _negotiated(self, m: bytes) -> None:
        resp = s2.parse_negotiate_response(m)
        self._dialect = resp.dialect
        if resp.dialect in (s2.DIALECT_300, s2.DIALECT_302):
            self._cipher = s2.CIPHER_AES128_CCM  # MS-SMB2 3.2.5.2: the one cipher of 3.0 and 3.0.2
        elif resp.dialect == s2.DIALECT_311:
            self._cipher = s2.CIPHER_NONE
            for c in resp.contexts:
                if c.type == s2.ENCRYPTION_CAPABILITIES:
                    ids = s2.parse_id_list_context(c.data, "ENCRYPTION_CAPABILITIES")
                    self._cipher = ids[0]
            self._connection_preauth = preauth_next(preauth_next(PREAUTH_SEED, self._negotiate_request), m)

    def _setup_request(self, m: bytes, h: s2.Header) -> None:
        sess = self._sessions.get(h.session_id) if h.session_id else None
        if sess is not None and sess.established:
            return  # a re-authentication keeps the session's keys (MS-SMB2 3.3.5.5.2)
        start = sess.preauth if sess is not None else self._connection_preauth
        token = inspect_token(s2.parse_session_setup(m).token)
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        self._pending[h.message_id] = (h.session_id, preauth_next(start, m), token)

    def _setup_response(self, m: bytes, h: s2.Header) -> None:
        pending = self._pending.pop(h.message_id, None)
        if pending is None or h.session_id == 0:
            return
        _sid, preauth, token = pending
        sess = self._sessions.get(h.session_id)
        if sess is None or sess.established:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            sess = self._sessions[h.session_id] = _Setup()
        if token is not None and token.mechanism != "unknown":
            sess.token = token if token.message != "negotiate" or sess.token is None else sess.token
        if h.status not in (STATUS_SUCCESS, STATUS_MORE_PROCESSING_REQUIRED):
            self._sessions.pop(h.session_id, None)  # an error response has no setup body
            return
        try:
            _flags, blob = s2.parse_session_setup_response(m)
        except ProtocolError:
            blob = b""  # the session walker reports the message; the keys do without its token
        answer = inspect_token(blob) if blob else None
        if answer is not None and answer.mechanism != "unknown":
            sess.answer = answer    # a Kerberos AP-REP comes in the final response
        if h.status == STATUS_MORE_PROCESSING_REQUIRED:
            sess.preauth = preauth_next(preauth, m)
            if answer is not None and answer.server_challenge is not None:
                sess.challenge = answer.server_challenge
            return
        sess.preauth, sess.established = preauth, True  # the final response is not hashed
        self._derive(h.session_id, sess)

    # -- keys ----------------------------------------------------------------------------------

    def _derive(self, session_id: int, sess: _Setup) -> None:
        cipher = CIPHERS.get(self._cipher)
        if cipher is None:
            sess.reason = NO_CIPHER
            return
        sess.cipher = cipher.name
        session_key, reason = self._session_key(sess)
        sess.reason = reason
        if session_key is None:
            return
        out_key, in_key = encryption_keys(self._dialect, cipher, session_key, sess.preauth)
        sess.openers = {True: Opener(cipher, in_key), False: Opener(cipher, out_key)}

    def _session_key(self, sess: _Setup) -> tuple[bytes | None, str]:
        """The SMB session key (MS-SMB2 3.3.5.5.3) of an established session, or why not."""
        if not self._keyring:
            return None, NO_KEYS
        token = sess.token
        if token is None:
            return None, NO_SETUP
        if token.mechanism == "kerberos":
            return self._kerberos_key(sess)
        if token.mechanism != "ntlm" or token.message != "authenticate":
            return None, NO_SETUP
        keys = derive(token.raw, sess.challenge, self._keyring)
        if not keys.ok or not keys.session_key:
            return None, keys.reason
        return keys.session_key, "ok"

    def _kerberos_key(self, sess: _Setup) -> tuple[bytes | None, str]:
        keys = self._keyring.kerberos if self._keyring is not None else None
        token = sess.token
        if not keys or token is None or token.message != "ap_req":
            return None, NEEDS_KEYTAB
        from .kerberos_keys import KerberosExchange

        exchange = KerberosExchange(keys)
        ticket = exchange.ap_req(token.raw)
        if ticket.result != "ok":
            return None, f"kerberos_{ticket.result}"
        if sess.answer is not None and sess.answer.message == "ap_rep":
            exchange.ap_rep(sess.answer.raw)
        return exchange.session_key_bytes(), "ok"

    # -- the encrypted messages ------------------------------------------------------------------

    def open(self, message: bytes, from_client: bool) -> Opened:
        """A TRANSFORM message: its plaintext if the session's key is known and it verifies.
        Raises ProtocolError for a header that cannot be read."""
        header = s2.parse_transform_header(message)
        sess = self._sessions.get(header.session_id)
        if sess is None:
            reason = NO_KEYS if not self._keyring else NO_SETUP
            return Opened(header.session_id, None, reason, None)
        opener = sess.openers.get(from_client)
        if opener is None:
            return Opened(header.session_id, None, sess.reason, sess.cipher)
        try:
            plain = opener.open(header, message)
        except EncryptionError as exc:
            return Opened(header.session_id, None, exc.reason, sess.cipher)
        return Opened(header.session_id, plain, "ok", sess.cipher)
