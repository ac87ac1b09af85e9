"""Connections as the server sees them, built from its own events while they happen.

Each server connection (one TCP connection: an SMB session with its pipes, or a DCE/RPC
connection) becomes a `ConnectionView`: the steps of its ladder, numbered by message, with the
layer that authenticated and the identity the server acts on highlighted when they are
decided. The words come from emulator.capture.ladder, so the live ladder says what the static
report says. Once the connection has closed, its own capture is read by the same code as
`rpcauth explain`, which gives the ladders with Wireshark's frame numbers and the verdict lines.

Whose identity an RPC connection acts on is decided in emulator.auth.context; the server
reports it in `rpc.identity` and `emsmdb.connect` events (`identity_source`), and this module
only puts that report into words.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..capture.html import draw_ladder, ladder_svg
from ..capture.ladder import Step, highlight, label, verdicts

# Steps kept per connection: a connection that makes thousands of calls draws its first ones.
MAX_STEPS = 200
# Events held per connection until someone looks; past this, only identity events are read.
MAX_PENDING = 400
_IDENTITY_KINDS = frozenset({"rpc.identity", "emsmdb.connect", "smb.pipe_open", "rpc.bind"})
# Kinds drawn, and the direction of the message each stands for (None: a note about state).
_DIRECTION = {
    "smb.negotiate": False, "smb.session_setup": False, "smb.tree_connect": False,
    "smb.pipe_open": False, "ntlm.negotiate": True, "ntlm.challenge": False, "ntlm.authenticate": True,
    "rpc.bind": True, "rpc.alter_context": True, "rpc.identity": None, "emsmdb.connect": False,
    "rpc.fault": False, "malformed": None, "limit": None,
    "kerberos.accept": True,   # the client's AP-REQ, with the server's verdict on its ticket
}


def identity_words(source: str | None, acting: str | None, transport_identity: str | None) -> str:
    """The one sentence a class reads: whose identity, and whether it was inherited or replaced."""
    who = acting or "nobody"
    if source == "smb_session":
        return (f"acting as {who}: inherited from the SMB session (the RPC bind carried no "
                f"credentials, so the pipe keeps the session's identity)")
    if source == "rpc_auth":
        before = transport_identity or "anonymous"
        return (f"acting as {who}: replaced by {who}'s credentials in the authenticated RPC bind "
                f"(the transport's identity, {before}, is not used)")
    if source == "anonymous":
        return "acting as anonymous: inherited from the transport (no authentication at any layer)"
    return "identity not decided yet"


@dataclass
class ConnectionView:
    conn: str
    listener: str
    peer: str
    layer: str
    steps: list[Step] = field(default_factory=list)
    messages: int = 0
    acting: str | None = None
    identity_source: str | None = None
    transport_identity: str | None = None
    status: str | None = None
    closed: str | None = None           # the close reason, once closed
    capture: str | None = None          # this connection's own pcap, if recorded
    version: int = 0
    _bind_auth: tuple[str, str] = ("none", "none")   # auth type and level of the last bind
    _ntlm_at: int | None = None                       # where an RPC bind's NTLM exchange began
    _final: list[dict[str, Any]] | None = None
    _pending: list[dict[str, Any]] = field(default_factory=list)

    # ---------------------------------------------------------------- from events
    def add(self, rec: dict[str, Any]) -> bool:
        """Take one server event; True if the view changed. Only kept here: the ladder is
        built when a page looks, so a lab nobody watches pays next to nothing per event."""
        kind = rec["kind"]
        if kind == "conn.close":
            self.closed = rec.get("reason") or "closed"
            self.version += 1
            return True
        if kind not in _DIRECTION and kind not in _IDENTITY_KINDS:
            return False
        if len(self._pending) < MAX_PENDING:
            self._pending.append(rec)
        elif kind in _IDENTITY_KINDS:
            self.sync()
            self._apply(rec)
        self.version += 1
        return True

    def sync(self) -> None:
        """Build the ladder from the events kept since the last look."""
        pending, self._pending = self._pending, []
        for rec in pending:
            self._apply(rec)

    def _apply(self, rec: dict[str, Any]) -> None:
        kind = rec["kind"]
        if kind in ("rpc.identity", "emsmdb.connect", "smb.pipe_open", "rpc.bind"):
            self._identity(rec)
        if kind not in _DIRECTION:
            return
        ev = self._as_ladder_event(rec)
        if kind == "emsmdb.connect":
            self._step({"kind": "emsmdb.connect_request", "call": rec.get("call"),
                        "user_dn": rec.get("user_dn")}, True)
            self.status = rec.get("status_name")
        if kind in ("rpc.bind", "rpc.alter_context"):
            self._bind(rec, ev)
        else:
            if kind == "ntlm.negotiate" and self.layer != "smb":
                self._ntlm_at = len(self.steps)
            self._step(ev, _DIRECTION[kind])

    def _bind(self, rec: dict[str, Any], ev: dict[str, Any]) -> None:
        """The server reports a bind once its NTLM exchange is over; draw it where it began:
        bind (NEGOTIATE), bind_ack (CHALLENGE), then AUTH3 (AUTHENTICATE)."""
        self._bind_auth = (rec.get("auth_type") or "none", rec.get("auth_level") or "none")
        answer = ({"kind": "rpc.bind_ack", "accepted": [rec.get("interface_name") or "?"]}
                  if rec.get("result") == "ok" else {"kind": "rpc.bind_nak", "reason": rec.get("result")})
        at, self._ntlm_at = self._ntlm_at, None
        if at is None or rec.get("auth_type") in (None, "none") or at + 2 > len(self.steps):
            self._step(ev, True)
            self._step(answer, False)
            return
        self._step(ev, True)
        self._step(answer, False)
        bind, ack = self.steps.pop(-2), self.steps.pop(-1)
        self.steps.insert(at, bind)
        self.steps.insert(at + 2, ack)
        for n, step in enumerate(self.steps, 1):
            step.frame = n

    def _as_ladder_event(self, rec: dict[str, Any]) -> dict[str, Any]:
        """A server event in the shape the capture reader gives ladder.label()."""
        ev = dict(rec)
        version = ev.get("ntlm_version")
        if isinstance(version, str) and version.upper().startswith("NTLM"):
            ev["ntlm_version"] = version[4:]            # the server says NTLMv2, the reader v2
        kind = ev["kind"]
        if kind.startswith("ntlm."):
            # The server's NTLM events do not say which message carried them: the SMB session
            # setup on an SMB connection, the bind, its ack and AUTH3 on a DCE/RPC one.
            smb = self.layer == "smb"
            ev["leg"] = {"ntlm.negotiate": "session_setup" if smb else "bind",
                         "ntlm.challenge": "session_setup" if smb else "bind_ack",
                         "ntlm.authenticate": "session_setup" if smb else "auth3"}[kind]
        if kind == "smb.tree_connect" and "path" not in ev:
            ev["path"] = ev.get("share")
        if kind == "rpc.identity" and ev.get("source") == "rpc_auth":
            # Server and capture reader share the source words; the reader also names the
            # mechanism, which the server's event gives as the bind's auth type and auth_layer.
            auth_type, ev["auth_level"] = self._bind_auth
            kerberos = "kerberos" in str(ev.get("auth_layer", "")).lower()
            inner = "kerberos" if kerberos or auth_type == "kerberos" else "ntlm"
            ev["mechanism"] = f"spnego-{inner}" if auth_type == "spnego" else inner
        if kind == "limit":
            ev = {"kind": "malformed", "layer": rec.get("layer"), "reason": f"limit {rec.get('limit')}"}
        return ev

    def _step(self, ev: dict[str, Any], to_server: bool | None) -> None:
        self.messages += 1
        if len(self.steps) >= MAX_STEPS:
            return
        self.steps.append(Step(self.messages, bool(to_server), label(ev), to_server is None, highlight(ev)))

    def _identity(self, rec: dict[str, Any]) -> None:
        kind = rec["kind"]
        if kind in ("smb.pipe_open", "rpc.bind") and rec.get("smb_user"):
            self.transport_identity = rec["smb_user"]
        elif kind == "rpc.identity":
            source = rec.get("source")
            self.identity_source = source
            if source == "anonymous":
                self.acting = "anonymous"
            elif rec.get("user"):
                self.acting = f"{rec['domain']}\\{rec['user']}" if rec.get("domain") else rec["user"]
        elif kind == "emsmdb.connect":
            self.identity_source = rec.get("identity_source") or self.identity_source
            self.acting = rec.get("acting_user") or self.acting

    # ---------------------------------------------------------------- for the page
    @property
    def words(self) -> str:
        self.sync()
        return identity_words(self.identity_source, self.acting, self.transport_identity)

    def live_svg(self) -> str:
        self.sync()
        return draw_ladder(self.steps, f"client {self.peer}", f"server {self.listener}",
                           f"live ladder of connection {self.conn}", number="msg")

    @property
    def has_final(self) -> bool:
        return self._final is not None

    def final(self) -> list[dict[str, Any]]:
        """Ladders and verdicts from this connection's capture, read as `explain` reads it.
        Computed once, after the connection closed."""
        if self._final is not None:
            return self._final
        if self.closed is None or not self.capture or not os.path.exists(self.capture):
            return []
        from ..capture import CaptureError
        from ..capture.streams import analyse

        try:
            conns = analyse(self.capture).connections
        except CaptureError as exc:
            self._final = [{"svg": "", "verdicts": [f"the capture could not be read: {exc}"]}]
            return self._final
        self._final = [{"title": f"{c.transport}" + (f", pipe \\{c.pipes[0]}" if c.pipes else ""),
                        "svg": ladder_svg(c), "verdicts": verdicts(c)} for c in conns]
        return self._final

    def to_message(self, final: bool, ladders: bool = True, live: bool = True) -> dict[str, Any]:
        """What a page gets. `ladders=False` leaves out the capture's ladders (the page fetches
        them when asked) and `live=False` the live ladder (the page has it already), which keeps
        the messages pushed to every page small: bytes written to 50 sockets are most of what
        an open page costs the server."""
        self.sync()
        out: dict[str, Any] = {
            "conn": self.conn, "listener": self.listener, "peer": self.peer, "version": self.version,
            "words": self.words, "acting": self.acting, "identity_source": self.identity_source,
            "status": self.status, "closed": self.closed, "capture": bool(self.capture),
            "messages": self.messages}
        if live:
            out["svg"] = self.live_svg()
        if final and self.closed is not None:
            out["final"] = [f if ladders else {k: v for k, v in f.items() if k != "svg"} for f in self.final()]
        return out


class LiveConnections:
    """The most recent connections, oldest dropped first. Single-threaded: fed and read on the
    event loop."""

    def __init__(self, keep: int = 200, capture_dir: str | None = None) -> None:
        self._keep = keep
        self._capture_dir = capture_dir
        self.views: OrderedDict[str, ConnectionView] = OrderedDict()

    def feed(self, rec: dict[str, Any]) -> ConnectionView | None:
        """One server event; the view it changed, if any."""
        conn = rec.get("conn")
        if not conn or conn == "lab":
            return None
        view = self.views.get(conn)
        if view is None:
            if rec["kind"] != "conn.open":
                return None                 # a connection from before the page started
            listener = rec.get("listener") or "?"
            view = ConnectionView(conn, listener, rec.get("peer") or "?", rec.get("layer") or "tcp",
                                  capture=self._capture_path(conn, listener))
            self.views[conn] = view
            while len(self.views) > self._keep:
                self.views.popitem(last=False)
            view.version += 1
            return view
        return view if view.add(rec) else None

    def _capture_path(self, conn: str, listener: str) -> str | None:
        # Named as emulator.server.captures.PerConnectionCaptures names them.
        return os.path.join(self._capture_dir, f"{conn}-{listener}.pcap") if self._capture_dir else None

    def get(self, conn: str) -> ConnectionView | None:
        return self.views.get(conn)

    def recent(self, n: int) -> list[ConnectionView]:
        return list(self.views.values())[-n:]
