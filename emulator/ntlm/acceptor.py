"""The NTLM server state machine (MS-NLMP 3.2, connection-oriented).

    initial --NEGOTIATE--> challenged --AUTHENTICATE--> done (ok) | failed

Anything else (a message out of order, a second AUTHENTICATE, input after a failure) ends the
context with "bad_state" and drops its keys: a context that saw something wrong never becomes
usable again. `step` never raises on bad input.
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from typing import Callable

from Cryptodome.Cipher import ARC4
from impacket import ntlm as imp

from ..config import Policy, ServerConfig
from ..directory import Directory
from ..events import Event, event, malformed
from ..auth.acceptor import KeyUnavailable, PacketParts
from ..auth.results import AuthResult, StepResult, failure
from ..sansio import ProtocolError
from . import messages as m
from .keys import SIGNATURE_LEN, SessionSecurity, hmac_md5
from .responses import (Check, check_lm, check_ntlmv1, check_ntlmv2, classify, lm_hash_of,
                        NT_PROOF_LEN, NTLMV2_BLOB_MIN)

LAYER = "ntlm"

# Flags the server grants when the client asks for them (MS-NLMP 3.2.5.1.1). LM_KEY and
# DATAGRAM are never granted; NTLM and TARGET_INFO are always set, since the AV pairs carry the
# timestamp and names that NTLMv2 and the MIC depend on.
_ECHOED = (
    imp.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY, imp.NTLMSSP_NEGOTIATE_128,
    imp.NTLMSSP_NEGOTIATE_56, imp.NTLMSSP_NEGOTIATE_KEY_EXCH, imp.NTLMSSP_NEGOTIATE_SIGN,
    imp.NTLMSSP_NEGOTIATE_SEAL, imp.NTLMSSP_NEGOTIATE_ALWAYS_SIGN, imp.NTLMSSP_NEGOTIATE_VERSION,
    imp.NTLMSSP_NEGOTIATE_IDENTIFY,
)

# Parse errors from a decoder's helpers that mean "bad input", never "bug to surface".
_BAD_INPUT = (ProtocolError, struct.error, ValueError, IndexError, UnicodeError)

GUEST_USER = "Guest"


def answer_flags(client: int) -> int:
    flags = imp.NTLMSSP_NEGOTIATE_NTLM | imp.NTLMSSP_NEGOTIATE_TARGET_INFO
    if client & imp.NTLMSSP_NEGOTIATE_UNICODE or not client & imp.NTLM_NEGOTIATE_OEM:
        flags |= imp.NTLMSSP_NEGOTIATE_UNICODE
    else:
        flags |= imp.NTLM_NEGOTIATE_OEM
    if client & imp.NTLMSSP_REQUEST_TARGET:
        flags |= imp.NTLMSSP_REQUEST_TARGET | imp.NTLMSSP_TARGET_TYPE_DOMAIN
    for bit in _ECHOED:
        if client & bit:
            flags |= bit
    return flags


class NtlmAcceptor:
    mech = "ntlm"

    def __init__(self, directory: Directory, policy: Policy, server: ServerConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time,
                 decoy_hash: bytes | None = None) -> None:
        self._directory = directory
        self._policy = policy
        self._server = server
        self._random = random_bytes
        self._now = now
        # Unknown users are checked against this hash so that they cost the same work as
        # known ones.
        self._decoy_hash = decoy_hash if decoy_hash is not None else random_bytes(16)
        self._state = "initial"
        self._negotiate_raw = b""
        self._challenge_raw = b""
        self._server_challenge = b""
        self._challenge_flags = 0
        self._challenge_time = 0.0
        self._target_info_pairs: list[tuple[int, bytes]] = []
        self._security: SessionSecurity | None = None
        self._exported = b""
        self.result: AuthResult | None = None

    def __repr__(self) -> str:
        r = self.result
        outcome = f"{r.reason} user={r.user!r}" if r else "pending"
        return f"<{type(self).__name__} state={self._state} {outcome}>"

    __str__ = __repr__

    # ------------------------------------------------------------------ public API

    @property
    def complete(self) -> bool:
        return self._state in ("done", "failed")

    @property
    def session_key(self) -> bytes:
        """The ExportedSessionKey (MS-NLMP 3.2.5.1.2); empty unless a user was authenticated."""
        return self._exported

    @property
    def negotiated_flags(self) -> int:
        return self._security.flags if self._security else 0

    def step(self, token: bytes) -> StepResult:
        try:
            return self._step(bytes(token))
        except _BAD_INPUT as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "undecodable NTLM message"
            return self._finish(failure("malformed"), [malformed(LAYER, reason)])

    # ---- DCE/RPC packet protection (MS-NLMP 3.4, MS-RPCE 2.2.2.11)

    def sig_size(self) -> int:
        return SIGNATURE_LEN   # fixed by MS-NLMP 2.2.2.9, with or without keys

    def sign_packet(self, parts: PacketParts) -> bytes:
        return self._keys().sign_packet(parts)

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        return self._security is not None and self._security.check_packet(parts, signature)

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        return self._keys().seal_packet(parts)

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        if self._security is None:
            return None
        return self._security.unseal_packet(parts, signature)

    # ---- raw NTLM message security, for SPNEGO and the tests' initiator checks

    def sign(self, message: bytes) -> bytes:
        return self._keys().sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self._security is None:
            return False
        return self._security.verify(message, signature)

    def seal(self, plaintext: bytes) -> bytes:
        return self._keys().seal(plaintext)

    def unseal(self, ciphertext: bytes) -> bytes:
        return self._keys().unseal(ciphertext)

    # Used by SPNEGO for the mechListMIC (MS-SPNG 3.3.5.1).
    def reset_outgoing_rc4(self) -> None:
        self._keys().reset_outgoing_rc4()

    def reset_incoming_rc4(self) -> None:
        self._keys().reset_incoming_rc4()

    def verify_mech_list_mic(self, mech_list: bytes, mic: bytes) -> str | None:
        if self._security is None:
            return None
        return self._security.verify_mech_list_mic(mech_list, mic)

    def sign_mech_list_mic(self, mech_list: bytes, form: str) -> bytes:
        return self._keys().sign_mech_list_mic(mech_list, form)

    def fail_after(self, result: AuthResult) -> None:
        """A wrapping layer (SPNEGO) rejected a context NTLM had accepted: drop the keys."""
        self._state = "failed"
        self._security = None
        self._exported = b""
        self.result = result

    # ------------------------------------------------------------------ internals

    def _keys(self) -> SessionSecurity:
        if self._security is None:
            raise KeyUnavailable("no session keys: the context is not an authenticated user logon")
        return self._security

    def _finish(self, result: AuthResult, events: list[Event]) -> StepResult:
        self._state = "done" if result.ok else "failed"
        if not result.ok:
            self._security = None
            self._exported = b""
        self.result = result
        return StepResult(token=b"", complete=True, ok=result.ok, events=events)

    def _bad_state(self, why: str) -> StepResult:
        ev = event(LAYER, "ntlm.authenticate", user=None, domain="", workstation="",
                   ntlm_version="", mic=False, result="bad_state", detail=why)
        return self._finish(failure("bad_state"), [ev])

    def _step(self, token: bytes) -> StepResult:
        if self.complete:
            return self._bad_state("message after the context completed")
        kind = m.message_type(token)
        if kind not in (m.NEGOTIATE, m.AUTHENTICATE):
            raise m.fail(f"unexpected NTLM message type {kind}")
        if self._state == "initial":
            if kind != m.NEGOTIATE:
                return self._bad_state("AUTHENTICATE before NEGOTIATE")
            return self._on_negotiate(token)
        if kind != m.AUTHENTICATE:
            return self._bad_state("second NEGOTIATE")
        return self._on_authenticate(token)

    def _on_negotiate(self, token: bytes) -> StepResult:
        neg = m.parse_negotiate(token)
        flags = answer_flags(neg.flags)
        challenge = self._random(8)
        if len(challenge) != 8:
            raise RuntimeError("random_bytes returned the wrong length")
        when = self._now()
        s = self._server
        dns_computer = f"{s.netbios_name.lower()}.{s.dns_domain}"
        target_info = m.build_target_info(s.domain.upper(), s.netbios_name.upper(), s.dns_domain,
                                          dns_computer, m.filetime(when))
        target_name = b""
        if flags & imp.NTLMSSP_REQUEST_TARGET:
            name = s.domain.upper()
            target_name = (name.encode("utf-16-le") if flags & imp.NTLMSSP_NEGOTIATE_UNICODE
                           else name.encode("cp437", "replace"))
        raw = m.build_challenge(flags, challenge, target_name, target_info)
        self._negotiate_raw = neg.raw
        self._challenge_raw = raw
        self._server_challenge = challenge
        self._challenge_flags = flags
        self._challenge_time = when
        self._target_info_pairs = m.parse_av_pairs(target_info)
        self._state = "challenged"
        events = [event(LAYER, "ntlm.negotiate", flags=f"0x{neg.flags:08x}"),
                  event(LAYER, "ntlm.challenge", flags=f"0x{flags:08x}")]
        return StepResult(token=raw, complete=False, ok=False, events=events)

    def _on_authenticate(self, token: bytes) -> StepResult:
        auth = m.parse_authenticate(token)
        version = classify(auth.user, auth.lm_response, auth.nt_response)
        if version == "malformed":
            raise m.fail("challenge responses of unusable lengths")
        client_pairs: list[tuple[int, bytes]] = []
        mic_present = False
        if version == "NTLMv2":
            blob = auth.nt_response[NT_PROOF_LEN:]
            client_pairs = m.parse_av_pairs(blob[NTLMV2_BLOB_MIN:])
            av_flags = m.av_lookup(client_pairs, m.AV_FLAGS)
            if av_flags is not None:
                if len(av_flags) != 4:
                    raise m.fail("MsvAvFlags of the wrong size")
                mic_present = bool(struct.unpack("<I", av_flags)[0] & m.AV_FLAG_MIC_PRESENT)
            if mic_present and (len(auth.raw) < m.MIC_OFFSET + m.MIC_LEN
                                or auth.payload_start < m.MIC_OFFSET + m.MIC_LEN):
                raise m.fail("MIC announced but the message has no room for it")
        if len(auth.encrypted_session_key) not in (0, 16):
            raise m.fail("EncryptedRandomSessionKey of the wrong size")

        def done(reason: str, *, user: str | None = auth.user, domain: str = auth.domain,
                 ntlm_version: str = version, security: SessionSecurity | None = None,
                 exported: bytes = b"") -> StepResult:
            result = AuthResult(ok=reason == "ok", reason=reason, user=user, domain=domain,
                                workstation=auth.workstation, ntlm_version=ntlm_version,
                                mech="ntlm", mic=mic_present)
            ev = event(LAYER, "ntlm.authenticate", user=user, domain=domain,
                       workstation=auth.workstation, ntlm_version=ntlm_version, mic=mic_present,
                       result=reason)
            self._security = security
            self._exported = exported
            return self._finish(result, [ev])

        if self._now() - self._challenge_time > self._policy.limits.handshake_timeout:
            return done("expired")

        if version == "anonymous":
            if not self._policy.anonymous_allowed:
                return done("anonymous_forbidden", user=None)
            return done("ok", user=None, domain="")
        if version == "NTLMv1" and not self._policy.ntlmv1_allowed:
            return done("ntlmv1_forbidden")
        if version == "LM" and not self._policy.ntlmv1_allowed:
            return done("lm_forbidden")

        record = self._directory.user(auth.user) if self._directory.domain_matches(auth.domain) else None
        nt_hash = record.nt_hash if record is not None else self._decoy_hash
        negotiated = self._challenge_flags & auth.flags
        check: Check
        if version == "NTLMv2":
            check = check_ntlmv2(nt_hash, auth.user, auth.domain, self._server_challenge,
                                 auth.nt_response)
        elif version == "NTLMv1":
            check = check_ntlmv1(nt_hash, self._server_challenge, auth.lm_response,
                                 auth.nt_response, negotiated)
        else:
            lm_hash = lm_hash_of(record.password) if record is not None else None
            check = check_lm(lm_hash, nt_hash, self._server_challenge, auth.lm_response)

        if record is None:
            # MS-NLMP leaves unknown accounts to the server's policy: Windows maps them to Guest
            # only where the guest account is enabled.
            if self._policy.guest_allowed:
                return done("ok", user=GUEST_USER, domain=self._server.domain, ntlm_version="guest")
            return done("unknown_user")
        if not check.ok:
            return done("wrong_password")
        if version == "NTLMv2" and not self._target_info_matches(client_pairs):
            return done("bad_target_info")

        exported = check.key_exchange_key
        if negotiated & imp.NTLMSSP_NEGOTIATE_KEY_EXCH and auth.encrypted_session_key:
            # MS-NLMP 3.2.5.1.2: ExportedSessionKey = RC4K(KeyExchangeKey, EncryptedRandomSessionKey).
            exported = ARC4.new(check.key_exchange_key).decrypt(auth.encrypted_session_key)
        if mic_present:
            expected = hmac_md5(exported, self._negotiate_raw + self._challenge_raw
                                + auth.with_zeroed_mic())
            if not hmac.compare_digest(expected, auth.mic()):
                return done("bad_mic")
        if not record.enabled:
            return done("disabled", user=record.name)
        return done("ok", user=record.name, domain=self._server.domain,
                    security=SessionSecurity(exported, negotiated, "server"), exported=exported)

    def _target_info_matches(self, client_pairs: list[tuple[int, bytes]]) -> bool:
        """The client echoes our AV pairs into its blob (MS-NLMP 3.1.5.1.2). A timestamp or
        NetBIOS name that differs from what this context sent means the response was computed
        for another challenge message."""
        for av_id in (m.AV_TIMESTAMP, m.AV_NB_COMPUTER, m.AV_NB_DOMAIN):
            theirs = m.av_lookup(client_pairs, av_id)
            if theirs is None:
                continue
            ours = m.av_lookup(self._target_info_pairs, av_id)
            if av_id == m.AV_TIMESTAMP:
                if theirs != ours:
                    return False
            elif ours is None or theirs.decode("utf-16-le", "replace").upper() != \
                    ours.decode("utf-16-le", "replace").upper():
                return False
        return True
