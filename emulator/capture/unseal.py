"""Reading PKT_PRIVACY stubs and checking signatures, given the user's password or NT hash.

An analyst who knows a lab user's password can recover what a passive observer cannot: the
NTLMv2 session keys. From the captured AUTHENTICATE (MS-NLMP 3.3.2, 3.4.5.1):

    ResponseKeyNT  = NTOWFv2(NT hash, user, domain)        = HMAC_MD5(NT hash, UPPER(user) + domain)
    NTProofStr     = the first 16 bytes of NtChallengeResponse
    KeyExchangeKey = SessionBaseKey = HMAC_MD5(ResponseKeyNT, NTProofStr)
    ExportedKey    = RC4(KeyExchangeKey, EncryptedRandomSessionKey) with KEY_EXCH, else KeyExchangeKey

and from it the per-direction signing and sealing keys (3.4.5.2-3). The product's own NTLM key
code does the rest; the verifier code of the RPC engine checks each PDU exactly as the server
does. NTLMv1 and Kerberos contexts are left sealed.

Secrets stay here: the keyring and the derived contexts have reprs without key material, and
no event carries a key.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping


from ..rpc import pdu as P
from ..rpc.verifier import RpcProtection, VerifyError, unprotect

if TYPE_CHECKING:
    from .kerberos_keys import KerberosKeys

NT_PROOF_LEN = 16


@dataclass
class Keyring:
    """NT hashes by lower-case user name, and the service keys of a keytab (Kerberos)."""
    hashes: dict[str, bytes] = field(default_factory=dict, repr=False)
    kerberos: "KerberosKeys | None" = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Keyring(users={sorted(self.hashes)}, kerberos={self.kerberos!r})"

    def __bool__(self) -> bool:
        return bool(self.hashes) or bool(self.kerberos)

    def nt_hash(self, user: str) -> bytes | None:
        return self.hashes.get(user.lower())

    @classmethod
    def build(cls, passwords: Mapping[str, str] | Iterable[str] | None = None, lab: Any = None,
              keytab: str | None = None) -> "Keyring":
        """Raises KeytabError (naming the file, never a key) for an unreadable keytab."""
        from impacket import ntlm as imp  # only when keys are asked for: it is slow to import
        ring = cls()
        if lab is not None:
            if isinstance(lab, str):
                from ..config import load_config
                lab = load_config(lab)
            for u in lab.users:
                ring.hashes[u.name.lower()] = bytes(u.nt_hash)
        if keytab is not None:
            from .kerberos_keys import KerberosKeys
            ring.kerberos = KerberosKeys.load(keytab)
            if lab is not None:  # a ticket's client is named as the lab user it maps to
                ring.kerberos = ring.kerberos.with_lab([u.name for u in lab.users], lab.server.domain)
        if passwords:
            items = passwords.items() if isinstance(passwords, Mapping) else (
                p.partition(":")[::2] for p in passwords)
            for user, pw in items:
                ring.hashes[user.lower()] = imp.compute_nthash(pw)
        return ring


class _Reader:
    """SessionSecurity seen from the receiving side of one direction, and how to start it
    afresh at the first protected fragment."""

    def __init__(self, exported: bytes, flags: int, receiver: str) -> None:
        self._exported, self._flags, self._receiver = exported, flags, receiver
        from ..ntlm.keys import SessionSecurity  # the NTLM package is only needed with keys
        self.sec = SessionSecurity(exported, flags, receiver)

    def __repr__(self) -> str:
        return f"<capture reader for {self._receiver}>"

    def fresh(self, after_mic: bool) -> "_Reader":
        r = _Reader(self._exported, self._flags, self._receiver)
        if after_mic:
            # MS-SPNG 3.3.5.1: the mechListMIC consumed one sequence number, and the RC4 state
            # was reset for the first application message.
            r.sec.verify(b"", b"\x00" * 16)
            r.sec.reset_incoming_rc4()
        return r


@dataclass
class KeyResult:
    ok: bool
    reason: str  # "ok" | "no_key" | "wrong_password" | "ntlmv1" | "anonymous"
    readers: dict[bool, _Reader] | None = field(default=None, repr=False)
    # The ExportedSessionKey: an SMB session's key (MS-SMB2 3.3.5.5.3), for capture/smb3_keys.py.
    session_key: bytes = field(default=b"", repr=False)


def derive(auth_msg: bytes, server_challenge: bytes | None, keyring: Keyring) -> KeyResult:
    from Cryptodome.Cipher import ARC4
    from impacket import ntlm as imp

    from ..ntlm.keys import hmac_md5
    from ..ntlm.responses import ntowf_v2
    """Session readers for both directions from a captured AUTHENTICATE message."""
    auth = imp.NTLMAuthChallengeResponse()
    try:
        auth.fromString(auth_msg)
    except Exception:  # impacket raises assorted errors on odd buffers
        return KeyResult(False, "malformed")
    flags = auth["flags"]
    enc = "utf-16-le" if flags & imp.NTLMSSP_NEGOTIATE_UNICODE else "latin-1"
    user = bytes(auth["user_name"]).decode(enc, "replace")
    domain = bytes(auth["domain_name"]).decode(enc, "replace")
    nt = bytes(auth["ntlm"])
    if not user:
        return KeyResult(False, "anonymous")
    if len(nt) <= 24:
        return KeyResult(False, "ntlmv1")
    nt_hash = keyring.nt_hash(user)
    if nt_hash is None:
        return KeyResult(False, "no_key")
    response_key = ntowf_v2(nt_hash, user, domain)
    proof = nt[:NT_PROOF_LEN]
    if server_challenge is not None:
        expected = hmac_md5(response_key, server_challenge + nt[NT_PROOF_LEN:])
        if not hmac.compare_digest(expected, proof):
            return KeyResult(False, "wrong_password")
    kxkey = hmac_md5(response_key, proof)
    exported = kxkey
    if flags & imp.NTLMSSP_NEGOTIATE_KEY_EXCH:
        encrypted = bytes(auth["session_key"])
        if len(encrypted) != 16:
            return KeyResult(False, "malformed")
        exported = ARC4.new(kxkey).decrypt(encrypted)
    # Requests are read as the server reads them, responses as the client does.
    readers = {True: _Reader(exported, flags, "server"), False: _Reader(exported, flags, "client")}
    return KeyResult(True, "ok", readers, exported)


class Unsealer:
    """Per-connection, per-direction state: the first protected PDU of each direction decides
    whether a mechListMIC went before it."""

    def __init__(self, readers: dict[bool, _Reader], auth_type: int, auth_level: int, context_id: int) -> None:
        self._base = readers
        self._live: dict[bool, _Reader | None] = {True: None, False: None}
        self._ctx = (auth_type, auth_level, context_id)

    def __repr__(self) -> str:
        return "<Unsealer>"

    def open(self, pdu: P.Request | P.Response, from_client: bool) -> bytes:
        """Plaintext stub of a signed or sealed fragment; raises VerifyError."""
        auth_type, level, ctx = self._ctx
        if pdu.auth is not None:
            level = pdu.auth.auth_level
        live = self._live[from_client]
        if live is not None:
            sc = RpcProtection(live.sec, auth_type, level, ctx)
            return unprotect(sc, pdu)
        last = VerifyError("no protected fragment verified")
        for after_mic in (False, True):
            candidate = self._base[from_client].fresh(after_mic)
            try:
                stub = unprotect(RpcProtection(candidate.sec, auth_type, level, ctx), pdu)
            except VerifyError as exc:
                last = exc
                continue
            self._live[from_client] = candidate
            return stub
        raise last
