"""The SPNEGO acceptor (RFC 4178, MS-SPNG), neutral about the mechanism it negotiates.

It offers Kerberos (under the standard OID and the Microsoft one, MS-KILE 3.1.5.1) when the lab
has a realm, and NTLM unless policy requires Kerberos. It picks the first mechanism in the
client's list that it offers, and drives that mechanism until it completes:

    initial --negTokenInit(chosen mech first, with its token)--> mech legs (in negTokenResp)
    initial --negTokenInit(chosen mech later, or no token)-----> await_first (request-mic)
    mech legs --mechanism complete, MIC settled----------------> done | failed
    mech legs --Kerberos complete, client MIC still owed-------> await_mic --> done | failed
    initial --raw NTLMSSP------------------------------------> raw NTLM pass-through

The mechListMIC protects the mechanism list from downgrade: the chosen mechanism's integrity
token over the DER of the client's MechTypeList (MS-SPNG 3.1.5.1; for Kerberos a GSS MIC token,
RFC 4121 4.2.6.1; for NTLM the NTLM signature). It is required when this acceptor did not pick
the client's first choice (RFC 4178 5, negState request-mic) and when the NTLM AUTHENTICATE
carried a MIC (the client then supports, and Windows expects, the exchange). A MIC the client
sends is always checked, and answered with the acceptor's own. NTLM-specific: when no key
exchange was negotiated (a DCE/RPC bind at level connect), some clients pass the MIC checksum
through RC4 anyway; that form is verified too and answered in kind
(SessionSecurity.verify_mech_list_mic says why this keeps the MIC's protection).

With `require_kerberos`, a client that chooses NTLM (in SPNEGO or as raw NTLMSSP) is refused
as a downgrade, with an event.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Callable, Protocol

from ..events import Event, event, malformed
from ..ntlm import der
from ..ntlm.acceptor import NtlmAcceptor
from ..ntlm.keys import MIC_FORM_SPEC
from ..ntlm.messages import SIGNATURE
from ..sansio import ProtocolError
from .acceptor import LevelSizedSignatures, PacketParts, SecurityAcceptor
from .results import AuthResult, StepResult, failure

LAYER = "spnego"

SPNEGO_OID = bytes.fromhex("2b0601050502")            # 1.3.6.1.5.5.2
NTLMSSP_OID = bytes.fromhex("2b06010401823702020a")   # 1.3.6.1.4.1.311.2.2.10
MS_KRB5_OID = bytes.fromhex("2a864882f712010202")    # 1.2.840.48018.1.2.2
KRB5_OID = bytes.fromhex("2a864886f712010202")       # 1.2.840.113554.1.2.2
KERBEROS_OIDS = (MS_KRB5_OID, KRB5_OID)
KNOWN_MECHS = {
    NTLMSSP_OID: "ntlmssp",
    MS_KRB5_OID: "ms-krb5",
    KRB5_OID: "krb5",
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


class SpnegoMechanism(SecurityAcceptor, Protocol):
    """What SPNEGO needs of a mechanism beyond a SecurityAcceptor: the mechListMIC both ways,
    and a way to drop an accepted context that SPNEGO itself refuses."""

    def verify_mech_list_mic(self, mech_list: bytes, mic: bytes) -> str | None:
        """The form of a valid MIC over `mech_list`, or None when it does not verify."""
        ...

    def sign_mech_list_mic(self, mech_list: bytes, form: str) -> bytes: ...

    def fail_after(self, result: AuthResult) -> None: ...


# Builds a fresh Kerberos mechanism, named for what the result reports ("spnego-kerberos").
KerberosMaker = Callable[[str], SpnegoMechanism]


def offered_mechs(kerberos: bool, ntlm: bool) -> tuple[bytes, ...]:
    """The mechanisms this acceptor offers, in the order Windows lists them."""
    return (KERBEROS_OIDS if kerberos else ()) + ((NTLMSSP_OID,) if ntlm else ())


class SpnegoAcceptor:
    mech = "spnego"

    def __init__(self, ntlm: NtlmAcceptor, kerberos: KerberosMaker | None = None, *,
                 require_kerberos: bool = False) -> None:
        self._ntlm = ntlm
        self._make_kerberos = kerberos
        self._require_kerberos = require_kerberos
        self._inner: SpnegoMechanism = ntlm
        self._inner_name = "ntlmssp"
        self._chosen_oid = NTLMSSP_OID
        self._state = "initial"
        self._mech_list_raw = b""
        self._mic_required = False
        self._result: AuthResult | None = None
        self._raw_mode = False

    def __repr__(self) -> str:
        r = self._result
        outcome = f"{r.reason} user={r.user!r}" if r else "pending"
        return f"<SpnegoAcceptor state={self._state} mech={self._inner_name} {outcome}>"

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
        return self._inner.session_key if self._state == "done" else b""

    def offered(self) -> tuple[bytes, ...]:
        return offered_mechs(self._make_kerberos is not None, not self._require_kerberos)

    # Packet protection is the negotiated mechanism's.

    def sig_size(self) -> int:
        return self._inner.sig_size()

    def signature_size(self, sealed: bool) -> int:
        inner = self._inner
        if isinstance(inner, LevelSizedSignatures):
            return inner.signature_size(sealed)
        return inner.sig_size()

    def accepts_signature_size(self, size: int, sealed: bool) -> bool:
        inner = self._inner
        if isinstance(inner, LevelSizedSignatures):
            return inner.accepts_signature_size(size, sealed)
        return size == inner.sig_size()

    def sign_packet(self, parts: PacketParts) -> bytes:
        return self._inner.sign_packet(parts)

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        return self._inner.check_packet(parts, signature)

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        return self._inner.seal_packet(parts)

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        return self._inner.unseal_packet(parts, signature)

    def step(self, token: bytes) -> StepResult:
        wrapped = not self._raw_mode
        try:
            return self._step(bytes(token))
        except _BAD_INPUT as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "undecodable SPNEGO token"
            return self._fail(failure("malformed", mech=self._result_mech()), [malformed(LAYER, reason)],
                              REJECT_TOKEN if wrapped else b"")

    # ------------------------------------------------------------------ internals

    def _mech_label(self) -> str:
        return "spnego-kerberos" if self._inner_name == "kerberos" else self.mech

    def _fail(self, result: AuthResult, events: list[Event], token: bytes = REJECT_TOKEN) -> StepResult:
        self._state = "failed"
        self._result = result
        self._inner.fail_after(replace(result, mech="kerberos" if self._inner_name == "kerberos" else "ntlm"))
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
                if self._require_kerberos:
                    return self._downgrade(["ntlmssp"], "raw NTLMSSP where policy requires Kerberos")
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
        return "ntlm" if self._raw_mode else self._mech_label()

    def _raw(self, token: bytes) -> StepResult:
        r = self._ntlm.step(token)
        if r.complete:
            self._state = "done" if r.ok else "failed"
            self._result = self._ntlm.result
        return r

    def _downgrade(self, names: list[str], detail: str) -> StepResult:
        ev = event(LAYER, "spnego.accept", mechs=names, result="downgrade", detail=detail)
        return self._fail(failure("downgrade", mech=self.mech), [ev])

    def _choose(self, oids: list[bytes]) -> bytes | None:
        offered = self.offered()
        for oid in oids:
            if oid in offered:
                return oid
        return None

    def _on_init(self, token: bytes) -> StepResult:
        oids, self._mech_list_raw, mech_token = _parse_init(token)
        names = [KNOWN_MECHS.get(o, o.hex()) for o in oids]
        chosen = self._choose(oids)
        if chosen is None:
            if self._require_kerberos and NTLMSSP_OID in oids:
                return self._downgrade(names, "client offers no Kerberos; policy requires it")
            ev = event(LAYER, "spnego.accept", mechs=names, result="unsupported_mech")
            return self._fail(failure("unsupported_mech", mech=self.mech), [ev])
        self._chosen_oid = chosen
        if chosen in KERBEROS_OIDS:
            if self._make_kerberos is None:
                raise RuntimeError("Kerberos chosen without a Kerberos mechanism")
            self._inner = self._make_kerberos("spnego-kerberos")
            self._inner_name = "kerberos"
        preferred = oids[0] == chosen
        events = [event(LAYER, "spnego.negotiate", mechs=names, selected=KNOWN_MECHS[chosen],
                        optimistic=preferred and mech_token is not None)]
        # RFC 4178 5: a mechanism other than the initiator's first choice means the
        # mechListMIC becomes mandatory (request-mic); any optimistic token is discarded.
        self._mic_required = not preferred
        if preferred and mech_token is not None:
            return self._mech_leg(mech_token, events, first=True)
        self._state = "await_first"
        state = ACCEPT_INCOMPLETE if preferred else REQUEST_MIC
        return StepResult(neg_token_resp(state, chosen), False, False, events)

    def _on_resp(self, token: bytes) -> StepResult:
        neg_state, response, client_mic = _parse_resp(token)
        if neg_state == REJECT:
            ev = event(LAYER, "spnego.accept", result="bad_state", detail="client rejected")
            return self._fail(failure("bad_state", mech=self._mech_label()), [ev])
        if self._state == "await_mic":
            if client_mic is None:
                return self._mic_failure(self._inner_result(), [], "mechListMIC missing")
            return self._settle_mic(self._inner_result(), [], client_mic, None, final=True)
        if response is None:
            raise ProtocolError("spnego", "negTokenResp without responseToken")
        # The chosen mechanism's OID went out in the first negTokenResp already.
        return self._mech_leg(response, [], first=False, client_mic=client_mic)

    def _inner_result(self) -> AuthResult:
        result = self._inner.result
        if result is None:
            raise RuntimeError(f"{self._inner_name} completed without a result")
        return result

    def _mech_leg(self, token: bytes, events: list[Event], *, first: bool,
                  client_mic: bytes | None = None) -> StepResult:
        """Hand one mechanism token to the chosen mechanism and wrap its answer."""
        r = self._inner.step(token)
        events = events + list(r.events)
        # The first negTokenResp names the chosen mechanism (RFC 4178 4.2.2 supportedMech).
        mech = self._chosen_oid if first else None
        if not r.complete:
            if self._inner_name == "ntlmssp" and self._state == "await_authenticate":
                ev = event(LAYER, "spnego.accept", result="bad_state", detail="NTLM did not finish")
                return self._fail(failure("bad_state", mech=self.mech), events + [ev])
            self._state = "await_authenticate" if self._inner_name == "ntlmssp" else "mech"
            return StepResult(neg_token_resp(ACCEPT_INCOMPLETE, mech, r.token), False, False, events)
        inner = self._inner_result()
        if not r.ok:
            return self._fail(replace(inner, mech=self._mech_label()), events)
        if self._inner_name == "ntlmssp" and self._require_kerberos:
            return self._downgrade([], "NTLM chosen where policy requires Kerberos")
        return self._settle_mic(inner, events, client_mic, r.token or None, final=False, mech=mech)

    def _settle_mic(self, inner: AuthResult, events: list[Event], client_mic: bytes | None,
                    response: bytes | None, *, final: bool, mech: bytes | None = None) -> StepResult:
        need_mic = self._mic_required or inner.mic
        if client_mic is None and need_mic:
            if self._inner_name == "ntlmssp" or final:
                # NTLM's AUTHENTICATE is the client's last token: the MIC had to come with it.
                return self._mic_failure(inner, events, "mechListMIC missing")
            # Kerberos finished on our side first: send the answer and our MIC, and wait for
            # the client's MIC in one more negTokenResp (RFC 4178 5).
            self._state = "await_mic"
            server_mic = self._inner.sign_mech_list_mic(self._mech_list_raw, MIC_FORM_SPEC)
            return StepResult(neg_token_resp(ACCEPT_INCOMPLETE, mech, response, server_mic),
                              False, False, events)
        server_mic = None
        mic_form = None
        if client_mic is not None:
            # MS-SPNG 3.3.5.1: verify with the client-to-server key (this consumes a sequence
            # number), then answer with our own MIC in the form the client used.
            mic_form = self._inner.verify_mech_list_mic(self._mech_list_raw, client_mic)
            if mic_form is None:
                return self._mic_failure(inner, events, "mechListMIC does not verify")
            if not final:
                server_mic = self._inner.sign_mech_list_mic(self._mech_list_raw, mic_form)
        self._state = "done"
        self._result = replace(inner, mech=self._mech_label())
        fields = {"mech_list_mic_form": mic_form} if mic_form not in (None, MIC_FORM_SPEC) else {}
        if self._inner_name != "ntlmssp":
            fields["selected"] = self._inner_name
        events.append(event(LAYER, "spnego.accept", result="ok", mech_list_mic=client_mic is not None,
                            user=self._result.user, **fields))
        return StepResult(neg_token_resp(ACCEPT_COMPLETED, mech, response, server_mic), True, True, events)

    def _mic_failure(self, inner: AuthResult, events: list[Event], detail: str) -> StepResult:
        result = replace(inner, ok=False, reason="bad_mic", mech=self._mech_label())
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
