"""What SMB1 and SMB2 share: sessions, trees, pipe opens, the session-setup outcome and refusals.

The two dialect engines (smb1.py, smb2.py) only read and write their own wire formats; every
decision about who a session is, what it may reach and what ends with it is made here, once:

- A session exists for others to use only after its authentication succeeded. The identity it
  hands to a pipe comes from `SecurityContext.acting_identity` (emulator/auth/context.py).
- A failed logon destroys the session with its trees and opens (MS-SMB2 3.3.5.5.3; MS-CIFS
  3.3.5.43 gives the same outcome: the Uid is not valid afterwards).
- Re-authentication (a session setup on an established session, MS-SMB2 3.3.5.5.2, MS-SMB
  3.3.5.3) keeps the session, its trees and its opens while the new exchange runs; success
  replaces the session's identity for what is opened afterwards, and keeps the keys the first
  logon established (MS-SMB2 3.3.5.5.2: "the existing Session.SessionKey will be retained");
  failure destroys the session as a failed first logon does. A pipe keeps the identity it was
  opened with: its RPC connection got that identity as its transport identity (pipe.py).
- Anonymous and guest logons have no session key, so they never sign; a policy that requires
  signing does not refuse them (it is `anonymous_allowed` / `guest_allowed` that decide), which
  is what Windows and Samba do on both dialects (docs/security.md, "Signing, anonymous and
  guest").

Everything that fails raises `SmbError`, carrying the NT status and the events that say why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

from ..auth.context import SecurityContext, State
from ..auth.factory import AuthFactory
from ..auth.results import AuthResult, StepResult
from ..config import Policy
from ..events import Event, event, limit
from ..identity import ANONYMOUS, SMB_SESSION, Identity
from . import ntstatus as st
from .pipe import Pipe, PipeFactory

LAYER = "smb"
USER, GUEST, ANONYMOUS_KIND = "user", "guest", "anonymous"

Handle = TypeVar("Handle", bound=Hashable)


class SmbError(Exception):
    """A request fails with an NT status; `events` say why. Never leaves the engine."""

    def __init__(self, status: int, *events: Event) -> None:
        super().__init__(st.status_name(status))
        self.status = status
        self.events = list(events)


def netbios_frame(message: bytes) -> bytes:
    """One NetBIOS session message (RFC 1002 4.3.6, MS-SMB2 2.1): type 0, 24-bit length."""
    return b"\x00" + len(message).to_bytes(3, "big") + message


@dataclass(frozen=True)
class Logon:
    """What a successful session setup established."""
    identity: Identity
    kind: str                      # user | guest | anonymous
    session_key: bytes = field(repr=False, default=b"")
    reauth: bool = False


@dataclass
class Session:
    session_id: int
    context: SecurityContext = field(repr=False)     # the exchange running or last finished
    logon: Logon | None = None                      # set once a logon succeeded

    @property
    def established(self) -> bool:
        return self.logon is not None

    @property
    def identity(self) -> Identity:
        return self.logon.identity if self.logon is not None else ANONYMOUS

    @property
    def label(self) -> str:
        return self.identity.qualified

    @property
    def session_key(self) -> bytes:
        return self.logon.session_key if self.logon is not None else b""


@dataclass
class Tree:
    tree_id: int
    session_id: int
    share: str


@dataclass
class Open(Generic[Handle]):
    handle: Handle
    pipe: Pipe
    session_id: int
    tree_id: int
    identity: Identity            # the session's identity when the pipe was opened
    fields: dict[str, Any] = field(default_factory=dict)     # the dialect's handle, for events


class SessionCore(Generic[Handle]):
    """The session, tree and open tables of one SMB connection and the rules above.

    `dialect` names the dialect in events; `forget` drops what the dialect keeps per session.
    """

    def __init__(self, *, auth: AuthFactory, pipes: PipeFactory, policy: Policy, info: dict[str, Any],
                 dialect: Callable[[], str], forget: Callable[[int], None] = lambda sid: None,
                 in_progress_status: int = st.STATUS_USER_SESSION_DELETED,
                 bad_tree_status: int = st.STATUS_NETWORK_NAME_DELETED) -> None:
        self._auth = auth
        self._pipes = pipes
        self._policy = policy
        self._limits = policy.limits
        self._info = info
        self._dialect = dialect
        self._forget = forget         # the dialect drops its own per-session state (keys)
        # The statuses the dialects differ on: SMB1 answers a request on an unfinished session
        # with ACCESS_DENIED and an unknown Tid with STATUS_SMB_BAD_TID (MS-CIFS 2.2.2.4).
        self._in_progress_status = in_progress_status
        self._bad_tree_status = bad_tree_status
        self.sessions: dict[int, Session] = {}
        self.trees: dict[tuple[int, int], Tree] = {}     # by (session id, tree id)
        self.opens: dict[Handle, Open[Handle]] = {}

    def __repr__(self) -> str:
        return f"SessionCore(sessions={len(self.sessions)}, trees={len(self.trees)}, opens={len(self.opens)})"

    # ------------------------------------------------------------------ refusals

    def refused(self, command: str, reason: str, status: int, **fields: Any) -> SmbError:
        """A request naming a session, tree or file that grants nothing here: refused, said so."""
        return SmbError(status, event(LAYER, "smb.refused", command=command, reason=reason,
                                      status=st.status_name(status), **fields))

    # ------------------------------------------------------------------ sessions

    def new_session(self, session_id: int) -> Session:
        if len(self.sessions) >= self._limits.max_sessions_per_connection:
            raise SmbError(st.STATUS_INSUFFICIENT_RESOURCES, limit(
                LAYER, "max_sessions_per_connection", value=self._limits.max_sessions_per_connection))
        session = Session(session_id, self._new_context())
        self.sessions[session_id] = session
        return session

    def _new_context(self) -> SecurityContext:
        # The one place an SMB session setup asks for a mechanism: SPNEGO, which offers what
        # the factory can accept.
        context = SecurityContext(ANONYMOUS, SMB_SESSION)
        context.begin(self._auth.spnego())
        return context

    def usable(self, session_id: int, command: str, **fields: Any) -> Session:
        """The established session a request names (MS-SMB2 3.3.5.2.9, MS-CIFS 3.3.5.2)."""
        session = self.sessions.get(session_id)
        if session is None:
            # Never handed out, destroyed by a failed logon, logged off, or another connection's.
            raise self.refused(command, "no_session", st.STATUS_USER_SESSION_DELETED, **fields)
        if not session.established:
            # Its first exchange has not completed: nothing may ride on it yet.
            raise self.refused(command, "no_session", self._in_progress_status, session="in_progress", **fields)
        return session

    def authenticate(self, session: Session, token: bytes, **fields: Any) -> tuple[StepResult, Logon | None]:
        """One leg of a session setup. Returns the mechanism's answer and, once it succeeded,
        the logon; raises SmbError(LOGON_FAILURE) when it failed (the session is gone)."""
        reauth = session.established
        if session.context.state is not State.PENDING:
            session.context = self._new_context()         # a re-authentication starts
        step = session.context.step(token)
        if not step.complete:
            return step, None
        result = session.context.result
        base = self._setup_fields(result, reauth, **fields)
        if not step.ok:
            events = list(step.events) + self.drop_session(session.session_id, "logon_failed")
            reason = session.context.failure or "malformed"
            events.append(event(LAYER, "smb.session_setup", result=reason, signing=False, **base))
            raise SmbError(st.STATUS_LOGON_FAILURE, *events)
        identity = session.context.acting_identity or ANONYMOUS
        kind = _kind(result)
        key = session.context.session_key if kind == USER else b""
        if reauth and session.logon is not None:
            # MS-SMB2 3.3.5.5.2: the session keeps the keys of its first logon.
            key = session.logon.session_key
        session.logon = Logon(identity, kind, key, reauth)
        return step, session.logon

    def setup_event(self, session: Session, *, signing: bool, **fields: Any) -> Event:
        logon = session.logon
        if logon is None:
            raise RuntimeError("setup_event before a logon succeeded")
        return event(LAYER, "smb.session_setup", result="ok", signing=signing, session_flags=logon.kind,
                     **self._setup_fields(session.context.result, logon.reauth, **fields))

    def _setup_fields(self, result: AuthResult | None, reauth: bool, **fields: Any) -> dict[str, Any]:
        out = dict(user=result.user if result else None, domain=result.domain if result else "",
                   ntlm_version=result.ntlm_version if result else "", dialect=self._dialect(), **fields)
        if reauth:
            out["reauth"] = True
        return out

    def signs(self, logon: Logon, client_asks: bool) -> bool:
        """Whether this logon signs: a user logon when policy or the client asks. Anonymous and
        guest logons have no key and never sign (MS-SMB2 3.3.5.5.3, MS-SMB 3.3.5.3)."""
        return logon.kind == USER and bool(logon.session_key) and (
            self._policy.smb_signing_required or client_asks)

    def drop_session(self, session_id: int, reason: str) -> list[Event]:
        """Logoff, failed logon, connection end: the session, its trees and its opens go."""
        events: list[Event] = []
        for handle in [h for h, o in self.opens.items() if o.session_id == session_id]:
            events.extend(self.close_open(handle, reason))
        for key in [k for k, tree in self.trees.items() if tree.session_id == session_id]:
            del self.trees[key]
        self.sessions.pop(session_id, None)
        self._forget(session_id)
        return events

    def close_all(self) -> list[Event]:
        events: list[Event] = []
        for handle in list(self.opens):
            events.extend(self.close_open(handle, "connection_closed"))
        self.trees.clear()
        self.sessions.clear()
        return events

    # ------------------------------------------------------------------ trees

    def tree_ids(self) -> set[int]:
        return {t.tree_id for t in self.trees.values()}

    def tree_count(self, session_id: int) -> int:
        return sum(1 for t in self.trees.values() if t.session_id == session_id)

    def add_tree(self, tree_id: int, session: Session, share: str) -> Tree:
        tree = Tree(tree_id, session.session_id, share)
        self.trees[(session.session_id, tree_id)] = tree
        return tree

    def tree(self, session: Session, tree_id: int, command: str, **fields: Any) -> Tree:
        tree = self.trees.get((session.session_id, tree_id))
        if tree is None:
            raise self.refused(command, "no_tree", self._bad_tree_status, user=session.label, **fields)
        return tree

    def disconnect_tree(self, tree: Tree, reason: str = "tree_disconnect") -> list[Event]:
        events: list[Event] = []
        for handle in [h for h, o in self.opens.items() if o.tree_id == tree.tree_id
                       and o.session_id == tree.session_id]:
            events.extend(self.close_open(handle, reason))
        self.trees.pop((tree.session_id, tree.tree_id), None)
        return events

    # ------------------------------------------------------------------ pipes

    def open_pipe(self, session: Session, tree: Tree, name: str, handle: Handle,
                  **fields: Any) -> tuple[Open[Handle], list[Event]]:
        """Open a named pipe on IPC$ as the session's current identity. `name` is the path the
        client gave, without the leading backslashes SMB2 and SMB1 strip differently."""
        if len(self.opens) >= self._limits.max_pipes_per_connection:
            raise SmbError(st.STATUS_INSUFFICIENT_RESOURCES, limit(
                LAYER, "max_pipes_per_connection", value=self._limits.max_pipes_per_connection))
        identity = session.identity
        info = dict(self._info, smb_dialect=self._dialect(), smb_user=session.label)
        pipe, pipe_events = self._pipes.open(name, identity, info) if name else (None, [])
        events = [Event(e.layer, e.kind, {**e.fields, "smb_user": session.label, **fields})
                  if e.kind == "smb.pipe_open" else e for e in pipe_events]
        if pipe is None:
            events.append(event(LAYER, "smb.pipe_open", pipe=PipeFactory.normalise(name) if name else name,
                                result="not_found", smb_user=session.label))
            raise SmbError(st.STATUS_OBJECT_NAME_NOT_FOUND, *events)
        op = Open(handle, pipe, session.session_id, tree.tree_id, identity, dict(fields))
        self.opens[handle] = op
        return op, events

    def find_open(self, handle: Handle, session: Session, tree: Tree) -> Open[Handle] | None:
        op = self.opens.get(handle)
        if op is None or op.session_id != session.session_id or op.tree_id != tree.tree_id:
            return None
        return op

    def close_open(self, handle: Handle, reason: str, **fields: Any) -> list[Event]:
        op = self.opens.pop(handle, None)
        if op is None:
            return []
        events = list(op.pipe.close())
        events.append(event(LAYER, "smb.close", pipe=op.pipe.name, **op.fields, reason=reason, **fields))
        return events


def _kind(result: AuthResult | None) -> str:
    if result is None or result.user is None or result.ntlm_version == "anonymous":
        return ANONYMOUS_KIND
    if result.ntlm_version == "guest":
        return GUEST
    return USER
