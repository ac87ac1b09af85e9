"""One security context, and the rule of KB Q146188: whose identity the server acts on.

One `SecurityContext` belongs to each RPC association and to each SMB session. It is a small
state machine in the manner of h11's `_state.py`: explicit states, and a table of the moves
allowed between them; anything else raises `SecurityStateError`.

    NONE --begin--> PENDING --step (incomplete)--> PENDING
                    PENDING --step (ok)----------> ESTABLISHED
                    PENDING --step (failed)------> FAILED
                    PENDING --fail---------------> FAILED
    ESTABLISHED --begin (re-authentication)-----> PENDING
    ESTABLISHED --fail--------------------------> FAILED

The rule lives in `acting_identity`, and nowhere else. Samba's dcesrv_auth.c and Windows agree:
the transport hands the context the identity it already established (the SMB session's user on
a named pipe, nobody on raw TCP). A context that never began authentication (an RPC bind
without auth) keeps that identity; an established one replaces it with the identity its
mechanism proved; a pending or failed one yields nobody.
"""

from __future__ import annotations

import enum

from ..identity import ANONYMOUS, SMB_SESSION, Identity
from .acceptor import KeyUnavailable, SecurityAcceptor
from .results import AuthResult, StepResult

# The auth_layer an identity carries, by the source the context was made for.
LAYER_OF_SOURCE = {SMB_SESSION: "smb_session_setup", "rpc_auth": "rpc_bind"}


class State(enum.Enum):
    NONE = "none"
    PENDING = "pending"
    ESTABLISHED = "established"
    FAILED = "failed"


class Move(enum.Enum):
    BEGIN = "begin"
    CONTINUE = "continue"
    SUCCEED = "succeed"
    FAIL = "fail"


TRANSITIONS: dict[tuple[State, Move], State] = {
    (State.NONE, Move.BEGIN): State.PENDING,
    (State.PENDING, Move.CONTINUE): State.PENDING,
    (State.PENDING, Move.SUCCEED): State.ESTABLISHED,
    (State.PENDING, Move.FAIL): State.FAILED,
    (State.ESTABLISHED, Move.BEGIN): State.PENDING,
    (State.ESTABLISHED, Move.FAIL): State.FAILED,
}


class SecurityStateError(RuntimeError):
    """A move the transition table does not allow: a bug in the engine driving the context,
    never a client's doing (engines check the state before they act on input)."""


def authenticated_identity(result: AuthResult | None, source: str) -> Identity:
    """The identity a successful logon proved, labelled with where it was proven. A failed or
    unfinished logon, and an anonymous one, prove nobody."""
    if result is None or not result.ok or result.user is None:
        return ANONYMOUS
    layer = LAYER_OF_SOURCE.get(source, source)
    return Identity(user=result.user, domain=result.domain, source=source,
                    auth_layer=f"{layer}/{result.flavour}", mechanism=result.mechanism)


class SecurityContext:
    """The security state of one RPC association or one SMB session.

    `source` is the identity source an authenticated logon yields (`rpc_auth` for a bind,
    `smb_session` for a session setup); `transport_identity` is what the context starts with.
    """

    def __init__(self, transport_identity: Identity, source: str) -> None:
        self._transport_identity = transport_identity
        self._source = source
        self._state = State.NONE
        self._acceptor: SecurityAcceptor | None = None
        self._failure: str | None = None

    def __repr__(self) -> str:
        mech = self._acceptor.result.mech if self._acceptor and self._acceptor.result else "-"
        return f"<SecurityContext {self._state.value} source={self._source} mech={mech}>"

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def transport_identity(self) -> Identity:
        return self._transport_identity

    @property
    def failure(self) -> str | None:
        """The short reason of the failure that ended the context, if it failed."""
        return self._failure

    @property
    def result(self) -> AuthResult | None:
        return self._acceptor.result if self._acceptor is not None else None

    def _move(self, move: Move) -> None:
        nxt = TRANSITIONS.get((self._state, move))
        if nxt is None:
            raise SecurityStateError(f"{move.value} is not allowed in state {self._state.value}")
        self._state = nxt

    # ------------------------------------------------------------------ the rule

    @property
    def acting_identity(self) -> Identity | None:
        """Whose identity the server acts on, or None for nobody (see the module docstring)."""
        if self._state is State.NONE:
            return self._transport_identity
        if self._state is State.ESTABLISHED and self._acceptor is not None:
            return authenticated_identity(self._acceptor.result, self._source)
        return None

    # ------------------------------------------------------------------ moves

    def begin(self, acceptor: SecurityAcceptor) -> None:
        """Authentication starts (a bind with auth, a session setup, or a re-authentication of
        an established context). Until it completes, the context acts for nobody."""
        self._move(Move.BEGIN)
        self._acceptor = acceptor
        self._failure = None

    def step(self, token: bytes) -> StepResult:
        """Hand one client token to the mechanism and follow its outcome."""
        if self._state is not State.PENDING or self._acceptor is None:
            raise SecurityStateError(f"a token arrived in state {self._state.value}")
        result = self._acceptor.step(token)
        if not result.complete:
            self._move(Move.CONTINUE)
        elif result.ok:
            self._move(Move.SUCCEED)
        else:
            outcome = self._acceptor.result
            self._fail(outcome.reason if outcome is not None else "malformed")
        return result

    def fail(self, reason: str) -> None:
        """End the context for a reason found outside the mechanism (a verifier that does not
        match the bind, a downgrade attempt). Nothing it proved is kept."""
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self._move(Move.FAIL)
        self._failure = reason

    # ------------------------------------------------------------------ keys

    @property
    def acceptor(self) -> SecurityAcceptor:
        """The established mechanism, for packet protection. Raises unless ESTABLISHED."""
        if self._state is not State.ESTABLISHED or self._acceptor is None:
            raise KeyUnavailable(f"no established security context ({self._state.value})")
        return self._acceptor

    @property
    def session_key(self) -> bytes:
        """The established mechanism's session key; empty in any other state."""
        if self._state is not State.ESTABLISHED or self._acceptor is None:
            return b""
        return self._acceptor.session_key
