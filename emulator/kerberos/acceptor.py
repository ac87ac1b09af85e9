"""The Kerberos acceptor: MIT's GSS-API (through python-gssapi) checks every ticket and token.

One `KerberosAcceptor` is the server side of one security context. It hands the client's
tokens to `gss_accept_sec_context` with the lab's keytab and replay cache, so MIT verifies what
Windows verifies: the ticket decrypts with a service key in the keytab, the authenticator's
checksum and time (clock skew), the replay cache, and later every MIC and wrap token.

    plain GSS (SMB session setup via SPNEGO)      AP-REQ --> complete, AP-REP back
    DCE style (RPC auth_type 16, MS-KILE 3.4.5)    AP-REQ --> AP-REP back, not complete
                                                   client's AP-REP --> complete (empty answer)

Which of the two a context is, the client decides: the GSS_C_DCE_STYLE flag in the
authenticator's checksum. MIT reads it; this module only follows `complete`.

Packet protection for DCE/RPC follows Samba's gensec_gssapi: GetMIC over the stub (or over the
whole PDU when header signing was agreed) at integrity level; at privacy level wrap_iov with a
HEADER buffer for the signature, SIGN_ONLY buffers for the PDU header and sec_trailer when
header signing was agreed, and the stub as the DATA buffer encrypted in place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import gssapi
import gssapi.raw as graw
from gssapi.raw import IOV, IOVBufferType

from ..auth.acceptor import KeyUnavailable, PacketParts
from ..auth.results import AuthResult, StepResult
from ..directory import Directory
from ..events import Event, event
from ..ntlm import der
from ..sansio import ProtocolError

LAYER = "kerberos"
MECH = "kerberos"
MIC_FORM_GSS = "gss-mic"

KRB5_OID = gssapi.OID.from_int_seq("1.2.840.113554.1.2.2")
# The mechanism OID as it appears in token framing: the standard one and Microsoft's.
_KRB5_OID_DER = (bytes.fromhex("2a864886f712010202"), bytes.fromhex("2a864882f712010202"))
# GSS_C_INQ_SSPI_SESSION_KEY: the context's session key (the subkey when one was agreed),
# which SMB signing and the SMB 3.x KDF start from (MS-SMB2 3.3.5.5.3).
INQ_SSPI_SESSION_KEY = gssapi.OID.from_int_seq("1.2.840.113554.1.2.2.5.5")

# MIT's krb5 error table (krb5_err.et) starts here; minor status codes are offsets into it.
_KRB5_ERR_BASE = -1765328384
_REASON_BY_KRB5_CODE = {
    31: ("bad_integrity", "a checksum or decryption failed (tampered or wrong key)"),
    32: ("expired", "the ticket has expired"),
    33: ("not_yet_valid", "the ticket is not yet valid"),
    34: ("replay", "the authenticator was seen before (replay cache)"),
    35: ("wrong_service", "the ticket is not for this service"),
    36: ("malformed", "the ticket and authenticator name different clients"),
    37: ("clock_skew", "the authenticator's time is outside the allowed clock skew"),
    40: ("malformed", "unexpected Kerberos message type"),
    41: ("bad_integrity", "the message was modified"),
    44: ("wrong_service", "the ticket's key version is not in the keytab"),
    45: ("wrong_service", "no key in the keytab for the ticket's service"),
}
# RFC 2744 3.9.1 routine errors and supplementary bits of the major status.
_GSS_BAD_SIG, _GSS_DEFECTIVE_TOKEN = 6, 9
_GSS_DUPLICATE_TOKEN = 1 << 1
# Bounds of a sealed PDU's auth_value: RFC 4757's RC4 wrap header is 32 bytes, and RFC 4121's
# filler (EC) is below one cipher block more than MIT's own choice.
_MIN_WRAP_HEADER, _MAX_FILLER = 32, 16
# Keytab lookups that mean "not our service" (krb5.h: KRB5_KT_NOTFOUND, KRB5_KT_KVNONOTFOUND).
_WRONG_SERVICE_CODES = {-1765328203, -1765328154}


@dataclass(frozen=True)
class KerberosService:
    """What every Kerberos acceptor of one lab shares: where its keys and replay cache live."""
    keytab: str
    rcache: str          # an MIT replay cache name, e.g. "file2:/tmp/.../rcache"
    realm: str
    domain: str          # the lab domain the ticket's client is mapped into


class KerberosCredentials:
    """The lab's acceptor credentials, acquired once from its own keytab and replay cache (the
    GSS credential store, so nothing depends on this process's KRB5_KTNAME or KRB5RCACHE)."""

    def __init__(self, service: KerberosService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._creds: gssapi.Credentials | None = None

        self._probe: gssapi.Credentials | None = None

    def get(self) -> gssapi.Credentials:
        with self._lock:
            if self._creds is None:
                self._creds = gssapi.Credentials(
                    usage="accept", mechs=[KRB5_OID],
                    store={"keytab": self.service.keytab, "rcache": self.service.rcache})
            return self._creds

    def _probe_creds(self) -> gssapi.Credentials:
        """The same keys without a replay cache: only for `unframe_dce_ap_req`'s dry run, whose
        context is thrown away (the real acceptance then checks the replay cache once)."""
        with self._lock:
            if self._probe is None:
                self._probe = gssapi.Credentials(
                    usage="accept", mechs=[KRB5_OID],
                    store={"keytab": self.service.keytab, "rcache": "none:"})
            return self._probe

    def unframe_dce_ap_req(self, token: bytes) -> bytes:
        """The AP-REQ to hand MIT for a GSS-framed first token.

        MIT accepts a DCE-style AP-REQ only raw, and a framed one only without the DCE flag
        (RFC 4121 4.1 framing; MS-KILE 3.4.5.1 makes DCE style drop it). Windows accepts both,
        and impacket frames its DCE-style AP-REQs. The flag is inside the encrypted
        authenticator, so a dry run without replay cache asks MIT which form it takes."""
        raw = _unframe(token)
        if raw is None:
            return token
        try:
            probe = gssapi.SecurityContext(creds=self._probe_creds(), usage="accept")
            probe.step(token)
            probe.complete          # python-gssapi raises a failed step's error here
        except gssapi.exceptions.GSSError as exc:
            if (int(exc.maj_code or 0) >> 16) & 0xFF == _GSS_DEFECTIVE_TOKEN:
                return raw
        return token


def _unframe(token: bytes) -> bytes | None:
    """The bare AP-REQ inside an RFC 2743 3.1 InitialContextToken for krb5 (token id 01 00),
    or None when `token` is not one."""
    if token[:1] != b"\x60":
        return None
    try:
        outer = der.read_exact(token, der.APPLICATION_0)
        oid, pos = der.read(outer.value)
    except ProtocolError:
        return None
    body = outer.value[pos:]
    if oid.tag != der.OID or oid.value not in _KRB5_OID_DER or body[:2] != b"\x01\x00":
        return None
    return body[2:]


def refusal_reason(exc: gssapi.exceptions.GSSError) -> tuple[str, str]:
    """(short reason, one-line detail) for a failed GSS call. The detail is MIT's own text for
    the minor code, which names principals and error kinds, never keys."""
    minor = int(exc.min_code or 0)
    if minor >= 1 << 31:
        minor -= 1 << 32          # MIT's codes are signed; GSS hands them over unsigned
    if minor in _WRONG_SERVICE_CODES:
        return "wrong_service", "no key in the keytab for the ticket's service"
    offset = minor - _KRB5_ERR_BASE
    if offset in _REASON_BY_KRB5_CODE:
        return _REASON_BY_KRB5_CODE[offset]
    major = int(exc.maj_code or 0)
    routine = (major >> 16) & 0xFF
    if routine == _GSS_DEFECTIVE_TOKEN:
        return "malformed", "defective token"
    if routine == _GSS_BAD_SIG:
        return "bad_integrity", "a checksum did not verify"
    if major & _GSS_DUPLICATE_TOKEN:
        return "replay", "duplicate token"
    text = " ".join(exc.gen_message().split())[:160]
    return "refused", text or "GSS-API error"


class KerberosAcceptor:
    """A `SecurityAcceptor` for Kerberos (RFC 4120/4121, MS-KILE) over MIT GSS-API."""

    mech = MECH

    def __init__(self, creds: KerberosCredentials, directory: Directory, *,
                 mech_name: str = MECH) -> None:
        self._creds = creds
        self._directory = directory
        self._mech_name = mech_name
        self._ctx: gssapi.SecurityContext | None = None
        self._result: AuthResult | None = None
        self._session_key = b""
        self._sizes: dict[bool, int] = {}
        self._legs = 0

    def __repr__(self) -> str:
        r = self._result
        outcome = f"{r.reason} user={r.user!r}" if r else f"pending legs={self._legs}"
        return f"<KerberosAcceptor {outcome}>"

    __str__ = __repr__

    # ------------------------------------------------------------------ outcome
    @property
    def result(self) -> AuthResult | None:
        return self._result

    @property
    def complete(self) -> bool:
        return self._result is not None

    @property
    def session_key(self) -> bytes:
        return self._session_key if self._result is not None and self._result.ok else b""

    @property
    def dce_style(self) -> bool:
        """The client asked for DCE style (three legs), as its authenticator said."""
        return self._ctx is not None and bool(
            self._ctx.actual_flags & gssapi.RequirementFlag.dce_style)

    def fail_after(self, result: AuthResult) -> None:
        """A wrapper (SPNEGO) refused after this mechanism succeeded: keep nothing."""
        self._result = result
        self._session_key = b""

    # ------------------------------------------------------------------ the legs
    def step(self, token: bytes) -> StepResult:
        if self._result is not None:
            return self._refuse("bad_state", "token after completion", [])
        self._legs += 1
        try:
            if self._ctx is None:
                token = self._creds.unframe_dce_ap_req(bytes(token))
                self._ctx = gssapi.SecurityContext(creds=self._creds.get(), usage="accept")
            answer = self._ctx.step(bytes(token)) or b""
            # python-gssapi keeps a failed step's error and raises it here.
            done = self._ctx.complete
        except gssapi.exceptions.GSSError as exc:
            reason, detail = refusal_reason(exc)
            return self._refuse(reason, detail, [])
        if not done:
            # DCE style: the AP-REP went out, the client's own AP-REP must come back.
            return StepResult(answer, False, False,
                              [event(LAYER, "kerberos.ap_req", result="continue", dce_style=True)])
        return self._established(answer)

    def _established(self, answer: bytes) -> StepResult:
        if self._ctx is None:
            raise RuntimeError("established without a context")
        principal = str(self._ctx.initiator_name)
        name, _, realm = principal.rpartition("@")
        service = str(self._ctx.target_name) if self._ctx.target_name is not None else ""
        fields = dict(service=service, dce_style=self.dce_style, legs=self._legs)
        if not name or "/" in name or realm.upper() != self._creds.service.realm.upper():
            return self._refuse("unknown_user", "the client principal is not a lab user", [],
                                principal=principal, **fields)
        user = self._directory.user(name)
        if user is None:
            return self._refuse("unknown_user", "the client principal is not a lab user", [],
                                principal=principal, **fields)
        if not user.enabled:
            return self._refuse("disabled", "the lab user is disabled", [], principal=principal,
                                user=user.name, **fields)
        try:
            key_parts = graw.inquire_sec_context_by_oid(self._ctx, INQ_SSPI_SESSION_KEY)
        except gssapi.exceptions.GSSError as exc:
            reason, detail = refusal_reason(exc)
            return self._refuse(reason, f"no session key: {detail}", [], principal=principal, **fields)
        self._session_key = bytes(key_parts[0]) if key_parts else b""
        if not self._session_key:
            return self._refuse("malformed", "the context has no session key", [],
                                principal=principal, **fields)
        self._result = AuthResult(ok=True, reason="ok", user=user.name,
                                  domain=self._creds.service.domain, workstation="",
                                  ntlm_version="", mech=self._mech_name, principal=principal)
        ev = event(LAYER, "kerberos.accept", result="ok", user=user.name, principal=principal,
                   **fields)
        return StepResult(answer, True, True, [ev])

    def _refuse(self, reason: str, detail: str, events: list[Event], *, principal: str = "",
                user: str | None = None, **fields: object) -> StepResult:
        self._result = AuthResult(ok=False, reason=reason, user=user,
                                  domain=self._creds.service.domain, workstation="",
                                  ntlm_version="", mech=self._mech_name, principal=principal)
        self._session_key = b""
        ev = event(LAYER, "kerberos.accept", result=reason, detail=detail, user=user,
                   **({"principal": principal} if principal else {}), **fields)
        return StepResult(b"", True, False, events + [ev])

    # ------------------------------------------------------------------ SPNEGO's mechListMIC
    def verify_mech_list_mic(self, mech_list: bytes, mic: bytes) -> str | None:
        """RFC 4178 5 with RFC 4121 4.2.6.1: the MIC is a GSS MIC token over the MechTypeList."""
        try:
            self._established_ctx().verify_signature(mech_list, mic)
        except (gssapi.exceptions.GSSError, KeyUnavailable):
            return None
        return MIC_FORM_GSS

    def sign_mech_list_mic(self, mech_list: bytes, form: str) -> bytes:
        return self._established_ctx().get_signature(mech_list)

    # ------------------------------------------------------------------ packet protection
    def _established_ctx(self) -> gssapi.SecurityContext:
        if self._result is None or not self._result.ok or self._ctx is None:
            raise KeyUnavailable("no established Kerberos context")
        return self._ctx

    def signature_size(self, sealed: bool) -> int:
        """Bytes of a DCE/RPC auth_value: the wrap token's header when sealed, a MIC token when
        signed (RFC 4121: 16 + 12 for AES; RFC 4757: 32 for RC4)."""
        if sealed not in self._sizes:
            ctx = self._established_ctx()
            if sealed:
                iov = IOV(IOVBufferType.header, b"\x00" * 16, std_layout=False)
                graw.wrap_iov_length(ctx, iov, confidential=True)
            else:
                iov = IOV(b"\x00" * 16, IOVBufferType.mic_token, std_layout=False)
                graw.get_mic_iov_length(ctx, iov)
                self._sizes[sealed] = len(iov[1].value or b"")
                return self._sizes[sealed]
            self._sizes[sealed] = len(iov[0].value or b"")
        return self._sizes[sealed]

    def accepts_signature_size(self, size: int, sealed: bool) -> bool:
        if not sealed:
            return size == self.signature_size(False)
        # A wrap token's header (16) and at least a confounder-sized block and checksum; MIT
        # checks the token's own EC and RRC against what it was given.
        return _MIN_WRAP_HEADER <= size <= self.signature_size(True) + _MAX_FILLER

    def sig_size(self) -> int:
        return self.signature_size(True)

    @staticmethod
    def _signed_bytes(parts: PacketParts) -> bytes:
        return parts.pre + parts.data + parts.post if parts.header_signing else parts.data

    def sign_packet(self, parts: PacketParts) -> bytes:
        return self._established_ctx().get_signature(self._signed_bytes(parts))

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        try:
            self._established_ctx().verify_signature(self._signed_bytes(parts), signature)
        except gssapi.exceptions.GSSError:
            return False
        return True

    def _iov(self, parts: PacketParts, header: bytes | None, data: bytes) -> IOV:
        sign_only = IOVBufferType.sign_only if parts.header_signing else IOVBufferType.empty
        head = ((IOVBufferType.header, False, header) if header is not None
                else (IOVBufferType.header, True, None))
        return IOV(head, (sign_only, False, parts.pre if parts.header_signing else b""),
                   (IOVBufferType.data, False, data),
                   (sign_only, False, parts.post if parts.header_signing else b""),
                   std_layout=False)

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        iov = self._iov(parts, None, parts.data)
        graw.wrap_iov(self._established_ctx(), iov, confidential=True)
        return bytes(iov[2].value or b""), bytes(iov[0].value or b"")

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        iov = self._iov(parts, signature, parts.data)
        try:
            res = graw.unwrap_iov(self._established_ctx(), iov)
        except gssapi.exceptions.GSSError:
            return None
        if not res.encrypted:
            return None       # a privacy-level PDU must have been sealed, not merely signed
        return bytes(iov[2].value or b"")
