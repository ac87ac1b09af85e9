"""SPNEGO acceptor over NTLM (RFC 4178, MS-SPNG).

    initial --negTokenInit(NTLMSSP first, NEGOTIATE)----------------> await_authenticate
    initial --negTokenInit(NTLMSSP listed later, or no token)--------> await_negotiate
    await_negotiate --negTokenResp(NEGOTIATE)-----------------------> await_authenticate
    await_authenticate --negTokenResp(AUTHENTICATE [, mechListMIC])--> done | failed
    initial --raw NTLMSSP------------------------------------------> raw NTLM pass-through

The mechListMIC protects the mechanism list from downgrade: it is the NTLM signature over the
DER of the client's MechTypeList (MS-SPNG 3.1.5.1). It is required when this acceptor did not
pick the client's first choice (RFC 4178 5, negState request-mic) and when the NTLM
AUTHENTICATE carried a MIC (the client then supports, and Windows expects, the exchange).
When no key exchange was negotiated (a DCE/RPC bind at level connect), some clients pass the
MIC checksum through RC4 anyway; that form is verified too and answered in kind
(SessionSecurity.verify_mech_list_mic says why this keeps the MIC's protection).
"""

from __future__ import annotations

import struct
from dataclasses import replace

from ..auth.acceptor import PacketParts
from ..auth.results import AuthResult, StepResult, failure
from ..events import Event, event, malformed
from ..sansio import ProtocolError
from . import der
from .acceptor import LAYER, NtlmAcceptor
from .keys import MIC_FORM_SPEC
from .messages import SIGNATURE

SPNEGO_OID = bytes.fromhex("2b0601050502")            # 1.3.6.1.5.5.2
NTLMSSP_OID = bytes.fromhex("2b06010401823702020a")   # 1.3.6.1.4.1.311.2.2.10
KNOWN_MECHS = {
    NTLMSSP_OID: "ntlmssp",
    bytes.fromhex("2a864882f712010202"): "ms-krb5",
    bytes.fromhex("2a864886f712010202"): "krb5",
    bytes.fromhex("2a864886f71201020203"): "krb5-u2u",
    bytes.fromhex("2b06010401823702021e"): "negoex",
}

ACCEPT_COMPLETED, ACCEPT_INCOMPLETE, REJECT, REQUEST_MIC = 0, 1, 2, 3

# MS-SPNG 2.2.1: the negHints principal Windows sends since Windows Server 2008.
NEG_HINT_PRINCIPAL = b"not_defined_in_RFC4178@please_ignore"

_BAD_INPUT = (ProtocolError, struct.error, ValueError, IndexError, UnicodeError)


def neg_token_resp(state: int | None = None, mech: bytes | None = None, token: bytes | None = None,
                   mic: bytes | None = None) -> bytes:
    """NegTokenResp (RFC 4178 4.2.2), fields in tag order as Windows writes them."""
    body = b""
    if state is not None:
        body += der.tlv(der.context(0), der.tlv(der.ENUMERATED, bytes([state])))
    if mech is not None:
        body += der.tlv(der.context(1), der.tlv(der.OID, mech))
    if token is not None:
        body += der.tlv(der.context(2), der.tlv(der.OCTET_STRING, token))
    if mic is not None:
        body += der.tlv(der.context(3), der.tlv(der.OCTET_STRING, mic))
    return der.tlv(der.context(1), der.tlv(der.SEQUENCE, body))


def neg_token_init2(mechs: tuple[bytes, ...] = (NTLMSSP_OID,)) -> bytes:
    """NegTokenInit2 (MS-SPNG 2.2.1) in a GSS InitialContextToken: the security blob of an SMB
    NEGOTIATE response."""
    mech_list = der.tlv(der.SEQUENCE, b"".join(der.tlv(der.OID, oid) for oid in mechs))
    hints = der.tlv(der.SEQUENCE, der.tlv(der.context(0),
                                          der.tlv(der.GENERAL_STRING, NEG_HINT_PRINCIPAL)))
    init = der.tlv(der.SEQUENCE, der.tlv(der.context(0), mech_list) + der.tlv(der.context(3), hints))
    return der.tlv(der.APPLICATION_0, der.tlv(der.OID, SPNEGO_OID) + der.tlv(der.context(0), init))


REJECT_TOKEN = neg_token_resp(REJECT)


def _parse_init(token: bytes) -> tuple[list[bytes], bytes, bytes | None]:
    """(mech OIDs, raw MechTypeList DER, mechToken) from a negTokenInit, with or without the
    GSS InitialContextToken wrapper (RFC 2743 3.1)."""
    if token[:1] == bytes([der.APPLICATION_0]):
        outer = der.read_exact(token, der.APPLICATION_0)
        oid, pos = der.read(outer.value)
        if oid.tag != der.OID or oid.value != SPNEGO_OID:
            raise ProtocolError("spnego", "not a SPNEGO InitialContextToken")
        inner = outer.value[pos:]
    else:
        inner = token
    init = der.read_exact(inner, der.context(0))
    seq = der.read_exact(init.value, der.SEQUENCE)
    f = der.fields(seq.value)
    if 0 not in f:
        raise ProtocolError("spnego", "negTokenInit without mechTypes")
    mech_list_raw = f[0].value
    mech_list = der.read_exact(mech_list_raw, der.SEQUENCE)
    oids = []
    for el in der.children(mech_list.value):
        if el.tag != der.OID:
            raise ProtocolError("spnego", "mechTypes holds a non-OID")
        oids.append(el.value)
    if not oids:
        raise ProtocolError("spnego", "empty mechTypes")
    mech_token = None
    if 2 in f:
        mech_token = der.read_exact(f[2].value, der.OCTET_STRING).value
    return oids, mech_list_raw, mech_token


def _parse_resp(token: bytes) -> tuple[int | None, bytes | None, bytes | None]:
    """(negState, responseToken, mechListMIC) from a client negTokenResp."""
    resp = der.read_exact(token, der.context(1))
    seq = der.read_exact(resp.value, der.SEQUENCE)
    f = der.fields(seq.value)
    state = None
    if 0 in f:
        enum = der.read_exact(f[0].value, der.ENUMERATED)
        if len(enum.value) != 1:
            raise ProtocolError("spnego", "bad negState")
        state = enum.value[0]
    if 1 in f:
        der.read_exact(f[1].value, der.OID)
    response = der.read_exact(f[2].value, der.OCTET_STRING).value if 2 in f else None
    mic = der.read_exact(f[3].value, der.OCTET_STRING).value if 3 in f else None
    return state, response, mic


class SpnegoAcceptor:
    mech = "spnego"

    def __init__(self, ntlm: NtlmAcceptor) -> None:
        self._ntlm = ntlm
        self._state = "initial"
        self._mech_list_raw = b""
        self._mic_required = False
        self._result: AuthResult | None = None
        self._raw_mode = False

    def __repr__(self) -> str:
        r = self._result
        outcome = f"{r.reason} user={r.user!r}" if r else "pending"
        return f"<SpnegoAcceptor state={self._state} {outcome}>"

    __str__ = __repr__

    # ------------------------------------------------------------------ public API

    @property
    def result(self) -> AuthResult | None:
        return self._result

    @property
    def complete(self) -> bool:
        return self._state in ("done", "failed")

    @property
    def session_key(self) -> bytes:
        return self._ntlm.session_key if self._state == "done" else b""

    # Packet protection is the negotiated mechanism's.

    def sig_size(self) -> int:
        return self._ntlm.sig_size()

    def sign_packet(self, parts: PacketParts) -> bytes:
        return self._ntlm.sign_packet(parts)

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        return self._ntlm.check_packet(parts, signature)

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        return self._ntlm.seal_packet(parts)

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        return self._ntlm.unseal_packet(parts, signature)

    def step(self, token: bytes) -> StepResult:
        wrapped = not self._raw_mode
        try:
            return self._step(bytes(token))
        except _BAD_INPUT as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "undecodable SPNEGO token"
            return self._fail(failure("malformed", mech=self._result_mech()), [malformed(LAYER, reason)],
                              REJECT_TOKEN if wrapped else b"")

    # ------------------------------------------------------------------ internals

    def _fail(self, result: AuthResult, events: list[Event], token: bytes = REJECT_TOKEN) -> StepResult:
        self._state = "failed"
        self._result = result
        self._ntlm.fail_after(replace(result, mech="ntlm"))
        return StepResult(token=token, complete=True, ok=False, events=events)

    def _step(self, token: bytes) -> StepResult:
        if self._state in ("done", "failed"):
            ev = event(LAYER, "spnego.accept", result="bad_state", detail="token after completion")
            return self._fail(failure("bad_state", mech=self._result_mech()), [ev],
                              b"" if self._raw_mode else REJECT_TOKEN)
        if self._state == "raw":
            return self._raw(token)
        if self._state == "initial":
            if token.startswith(SIGNATURE):
                # Windows also accepts bare NTLMSSP where SPNEGO is expected.
                self._state = "raw"
                self._raw_mode = True
                return self._raw(token)
            if token[:1] == bytes([der.context(1)]):
                ev = event(LAYER, "spnego.accept", result="bad_state", detail="negTokenResp first")
                return self._fail(failure("bad_state", mech=self.mech), [ev])
            return self._on_init(token)
        return self._on_resp(token)

    def _result_mech(self) -> str:
        return "ntlm" if self._raw_mode else self.mech

    def _raw(self, token: bytes) -> StepResult:
        r = self._ntlm.step(token)
        if r.complete:
            self._state = "done" if r.ok else "failed"
            self._result = self._ntlm.result
        return r

    def _on_init(self, token: bytes) -> StepResult:
        oids, self._mech_list_raw, mech_token = _parse_init(token)
        names = [KNOWN_MECHS.get(o, o.hex()) for o in oids]
        if NTLMSSP_OID not in oids:
            ev = event(LAYER, "spnego.accept", mechs=names, result="unsupported_mech")
            return self._fail(failure("unsupported_mech", mech=self.mech), [ev])
        preferred = oids[0] == NTLMSSP_OID
        events = [event(LAYER, "spnego.negotiate", mechs=names, selected="ntlmssp",
                        optimistic=preferred and mech_token is not None)]
        if preferred and mech_token is not None:
            r = self._ntlm.step(mech_token)
            events += r.events
            if r.complete:
                return self._fail(replace(self._ntlm.result, mech=self.mech), events)
            self._state = "await_authenticate"
            return StepResult(neg_token_resp(ACCEPT_INCOMPLETE, NTLMSSP_OID, r.token), False, False, events)
        # RFC 4178 5: a mechanism other than the initiator's first choice means the
        # mechListMIC becomes mandatory (request-mic); any optimistic token is discarded.
        self._mic_required = not preferred
        self._state = "await_negotiate"
        state = ACCEPT_INCOMPLETE if preferred else REQUEST_MIC
        return StepResult(neg_token_resp(state, NTLMSSP_OID), False, False, events)

    def _on_resp(self, token: bytes) -> StepResult:
        neg_state, response, client_mic = _parse_resp(token)
        if neg_state == REJECT:
            ev = event(LAYER, "spnego.accept", result="bad_state", detail="client rejected")
            return self._fail(failure("bad_state", mech=self.mech), [ev])
        if response is None:
            raise ProtocolError("spnego", "negTokenResp without responseToken")
        r = self._ntlm.step(response)
        events = list(r.events)
        if self._state == "await_negotiate":
            if r.complete:
                return self._fail(replace(self._ntlm.result, mech=self.mech), events)
            self._state = "await_authenticate"
            return StepResult(neg_token_resp(ACCEPT_INCOMPLETE, token=r.token), False, False, events)
        if not r.complete:
            ev = event(LAYER, "spnego.accept", result="bad_state", detail="NTLM did not finish")
            return self._fail(failure("bad_state", mech=self.mech), events + [ev])
        ntlm_result = self._ntlm.result
        if ntlm_result is None:
            raise RuntimeError("NTLM completed without a result")
        if not r.ok:
            return self._fail(replace(ntlm_result, mech=self.mech), events)
        need_mic = self._mic_required or ntlm_result.mic
        if client_mic is None and need_mic:
            return self._mic_failure(ntlm_result, events, "mechListMIC missing")
        server_mic = None
        mic_form = None
        if client_mic is not None:
            # MS-SPNG 3.3.5.1: verify with the client-to-server key (this consumes a sequence
            # number), then restore the RC4 state for the first application message; answer
            # with our own MIC in the checksum form the client used.
            mic_form = self._ntlm.verify_mech_list_mic(self._mech_list_raw, client_mic)
            if mic_form is None:
                return self._mic_failure(ntlm_result, events, "mechListMIC does not verify")
            server_mic = self._ntlm.sign_mech_list_mic(self._mech_list_raw, mic_form)
        self._state = "done"
        self._result = replace(ntlm_result, mech=self.mech)
        fields = {"mech_list_mic_form": mic_form} if mic_form not in (None, MIC_FORM_SPEC) else {}
        events.append(event(LAYER, "spnego.accept", result="ok", mech_list_mic=client_mic is not None,
                            **fields))
        return StepResult(neg_token_resp(ACCEPT_COMPLETED, mic=server_mic), True, True, events)

    def _mic_failure(self, ntlm_result: AuthResult, events: list[Event], detail: str) -> StepResult:
        result = replace(ntlm_result, ok=False, reason="bad_mic", mech=self.mech)
        events = events + [event(LAYER, "spnego.accept", user=result.user, result="bad_mic",
                                 detail=detail)]
        return self._fail(result, events)


def read_neg_token(token: bytes) -> tuple[list[bytes], bytes | None]:
    """(mechanism OIDs offered, inner mechanism token) of a NegTokenInit (with or without its
    GSS wrapper) or a NegTokenResp (no OIDs; its responseToken), as the capture reader reads
    either direction. Raises ProtocolError for anything else."""
    try:
        if token[:1] == bytes([der.APPLICATION_0]) or token[:1] == bytes([der.context(0)]):
            oids, _raw, mech_token = _parse_init(token)
            return oids, mech_token
        _state, response, _mic = _parse_resp(token)
        return [], response
    except _BAD_INPUT as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError("spnego", f"undecodable token ({type(exc).__name__})") from None
