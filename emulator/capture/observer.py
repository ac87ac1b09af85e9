"""The live security context, driven by what a capture shows.

The capture reader does not decide whose identity a connection acts on: it runs the server's own
`SecurityContext` (emulator/auth/context.py), whose `acting_identity` holds the KB rule. What
differs is the mechanism behind it. A live acceptor checks the client's proof; an observer
cannot, so `ObservedMechanism` takes the server's verdict from the capture (an SMB status, a
bind_nak or an access-denied fault) and reports the identity the client's token named.

It holds no keys: packet protection raises KeyUnavailable, as it does on a live context that
authenticated nobody. (Signatures are checked, given a password, by capture/unseal.py.)
"""

from __future__ import annotations

from ..auth.acceptor import KeyUnavailable, PacketParts
from ..auth.context import SecurityContext, State
from ..auth.results import AuthResult, StepResult
from ..identity import ANONYMOUS, Identity
from .authtokens import TokenInfo

# explain's `mechanism` vocabulary (DESIGN.md section 5; auth/results.py MECHANISMS), plus "none".
NO_MECHANISM = "none"
_NTLM_VERSIONS = {"v2": "NTLMv2", "v1": "NTLMv1"}


def mechanism_name(info: TokenInfo | None, kerberos_seen: bool = False) -> str:
    if info is None:
        return "kerberos" if kerberos_seen else NO_MECHANISM
    base = info.mechanism if info.mechanism in ("ntlm", "kerberos", "schannel") else (
        "kerberos" if kerberos_seen else "unknown")
    return f"spnego-{base}" if info.spnego and base in ("ntlm", "kerberos") else base


class ObservedMechanism:
    """A SecurityAcceptor whose outcome is read off the wire rather than computed.

    `claim(info)` records what the client's token says; `step` then completes the exchange with
    the verdict set by `verdict(ok, reason)` beforehand (the reader calls step once it has seen
    the server's answer)."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.claimed: TokenInfo | None = None
        self._ok: bool | None = None
        self._reason = "ok"
        self._result: AuthResult | None = None

    def __repr__(self) -> str:
        return f"<ObservedMechanism {self.mechanism} complete={self.complete}>"

    def claim(self, info: TokenInfo) -> None:
        self.claimed = info

    def verdict(self, ok: bool, reason: str = "ok") -> None:
        self._ok, self._reason = ok, reason

    # -- SecurityAcceptor ------------------------------------------------------------------------

    @property
    def result(self) -> AuthResult | None:
        return self._result

    @property
    def complete(self) -> bool:
        return self._result is not None

    @property
    def session_key(self) -> bytes:
        return b""

    def step(self, token: bytes) -> StepResult:
        if self._ok is None:
            return StepResult(token=b"", complete=False, ok=False)
        info = self.claimed
        anonymous = info is None or info.anonymous
        version = "anonymous" if info is not None and info.anonymous else (
            _NTLM_VERSIONS.get(info.ntlm_version or "", "") if info is not None else "")
        self._result = AuthResult(
            ok=self._ok, reason=self._reason, user=None if anonymous or info is None else info.user,
            domain=(info.domain or "") if info is not None else "", workstation="",
            ntlm_version=version, mech=self.mechanism)
        return StepResult(token=b"", complete=True, ok=self._ok)

    def sig_size(self) -> int:
        raise KeyUnavailable("a capture reader holds no keys")

    def sign_packet(self, parts: PacketParts) -> bytes:
        raise KeyUnavailable("a capture reader holds no keys")

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        raise KeyUnavailable("a capture reader holds no keys")

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        raise KeyUnavailable("a capture reader holds no keys")

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        raise KeyUnavailable("a capture reader holds no keys")


class ObservedContext:
    """One SecurityContext and the observed mechanism of its latest exchange."""

    def __init__(self, transport_identity: Identity, source: str) -> None:
        self.source = source
        self.context = SecurityContext(transport_identity, source)
        self.mechanism: ObservedMechanism | None = None

    @property
    def state(self) -> State:
        return self.context.state

    def begin(self, mechanism: str) -> ObservedMechanism:
        """A client starts authenticating (again). A context already PENDING goes on."""
        if self.context.state is State.PENDING and self.mechanism is not None:
            self.mechanism.mechanism = mechanism
            return self.mechanism
        if self.context.state is State.FAILED:
            # A failed context cannot begin again; a client that retries opens a fresh one.
            self.context = SecurityContext(self.context.transport_identity, self.source)
        self.mechanism = ObservedMechanism(mechanism)
        self.context.begin(self.mechanism)
        return self.mechanism

    def conclude(self, ok: bool, reason: str = "ok") -> None:
        """The capture shows the server's verdict on the exchange under way."""
        if self.context.state is not State.PENDING or self.mechanism is None:
            return
        self.mechanism.verdict(ok, reason)
        self.context.step(b"")

    def fail(self, reason: str) -> None:
        """A verdict that came after the context looked established (an access-denied fault
        answering the first call after an AUTH3)."""
        if self.context.state in (State.PENDING, State.ESTABLISHED):
            self.context.fail(reason)

    def acting(self) -> Identity | None:
        """The KB rule's answer (SecurityContext.acting_identity), for a capture.

        One case needs a word: a mechanism that succeeded without a name the capture can read
        (a Kerberos ticket, whose client principal is encrypted). The live rule would call that
        anonymous, since it only sees a result without a user; here it is an authenticated
        identity whose name is unknown, labelled with the context's source."""
        acting = self.context.acting_identity
        if acting is ANONYMOUS and self.context.state is State.ESTABLISHED:
            result = self.context.result
            if result is not None and result.ok and result.ntlm_version != "anonymous":
                return Identity(user=None, domain=result.domain, source=self.source,
                                auth_layer=result.mech)
        return acting

