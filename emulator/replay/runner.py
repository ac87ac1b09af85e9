"""The edge: read the capture, pick the conversations, send each one's client side to our server
message by message over loopback, and collect what both servers answered.

Each client message waits for its answer before the next goes out, as the original client did;
a message that gets no answer by protocol (AUTH3, a non-final request fragment, NT_CANCEL) does
not wait. Conversations run one after another, in the capture's stream order, so that the ports
our endpoint mapper hands out are known before a conversation needs one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..capture.model import EMSMDB_UUID, INTERFACE_NAMES
from ..capture.unseal import Keyring
from ..rpc import pdu as P
from ..sansio import ProtocolError
from .engine import ConversationReplay
from .framing import (
    SMB,
    Conversation,
    Cutter,
    conversation,
    first_bytes,
    flipped,
    kind_of,
    starts_conversation,
)
from .source import CapturedStream, read_streams
from .state import Learned
from .target import Target, connect

EPM_UUID = "e1af8308-5d1f-11c9-91a4-08002b14a0fa"
DEFAULT_TIMEOUT = 5.0
# After a security leg that gets no answer, how long to give the server to write its verdict
# before the next message goes out (only the attribution of events depends on it).
AUTH_SETTLE = 1.0


@dataclass
class Skipped:
    stream: int
    endpoints: str
    reason: str


@dataclass
class ConversationResult:
    stream: int
    kind: str
    client: str
    server: str
    replay: ConversationReplay
    listener: str = ""
    port: int = 0
    local: str = ""
    conn: str | None = None
    route: str = ""
    partial_note: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    # What crossed our socket, in order: (from the client, bytes). Written as a pcap on request.
    wire: list[tuple[bool, bytes]] = field(default_factory=list, repr=False)


@dataclass
class ReplayRun:
    capture: str
    target: str
    seed: int | None
    conversations: list[ConversationResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def deterministic(self) -> bool:
        return any(c.replay.deterministic for c in self.conversations)


def _endpoints(cs: CapturedStream) -> str:
    return f"{cs.client[0]}:{cs.client[1]} -> {cs.server[0]}:{cs.server[1]}"


def _first_interface(conv: Conversation) -> str | None:
    for ex in conv.exchanges:
        try:
            pdu = P.decode(ex.sent.data)
        except ProtocolError:
            return None
        if isinstance(pdu, P.Bind) and pdu.contexts:
            return pdu.contexts[0].abstract.uuid
    return None


def route(conv: Conversation, target: Target, learned: Learned) -> tuple[str | None, int, str]:
    """(listener, port, how it was chosen), or (None, 0, why not) for a conversation our lab
    does not serve. Only the target's own loopback listeners are ever chosen."""
    ports = target.ports
    port = conv.stream.server[1]
    if conv.kind == SMB:
        return ("smb", ports["smb"], f"SMB port {port} -> our SMB listener") if "smb" in ports else \
            (None, 0, "our lab has no SMB listener")
    if port == 135:
        return ("epm", ports["epm"], "endpoint mapper port 135 -> ours") if "epm" in ports else \
            (None, 0, "our lab has no endpoint mapper")
    iface = learned.captured_ports.get(port)
    how = f"the capture's endpoint mapper gave port {port} to {INTERFACE_NAMES.get(iface or '', iface)}"
    if iface is None:
        iface = _first_interface(conv)
        how = f"port {port} is not in any captured endpoint-mapper answer; the first bind names " \
              f"{INTERFACE_NAMES.get(iface or '', iface or 'no interface')}"
    if iface is None:
        return None, 0, f"port {port} is not in any captured endpoint-mapper answer and no bind names an interface"
    if iface in learned.our_ports and learned.our_ports[iface] in ports.values():
        return "emsmdb" if iface == EMSMDB_UUID else "epm", learned.our_ports[iface], \
            f"{how}; ours gave {learned.our_ports[iface]}"
    if iface == EMSMDB_UUID and "emsmdb" in ports:
        return "emsmdb", ports["emsmdb"], f"{how} -> our EMSMDB listener"
    if iface == EPM_UUID and "epm" in ports:
        return "epm", ports["epm"], f"{how} -> our endpoint mapper"
    return None, 0, f"{how}, which this lab does not serve (a client would have got 'not registered')"


def pick(streams: list[CapturedStream], selected: bool) -> tuple[list[Conversation], list[Skipped]]:
    convs, skipped = [], []
    for cs in streams:
        if not cs.chunks:
            if selected:
                skipped.append(Skipped(cs.number, _endpoints(cs), "carries no payload"))
            continue
        kind = kind_of(cs)
        if not cs.saw_syn:
            # No handshake in the capture: the side whose first message opens a conversation
            # is the client; a stream picked up in the middle cannot be followed by any server.
            other = flipped(cs)
            other_kind = kind_of(other)
            if not (kind and starts_conversation(kind, first_bytes(cs, True))) and other_kind and \
                    starts_conversation(other_kind, first_bytes(other, True)):
                cs, kind = other, other_kind
            if kind is not None and not starts_conversation(kind, first_bytes(cs, True)):
                skipped.append(Skipped(cs.number, _endpoints(cs),
                                       "began before the capture: its session setup or bind is missing, "
                                       "so no server could follow it"))
                continue
        if kind is None:
            skipped.append(Skipped(cs.number, _endpoints(cs), "neither SMB nor DCE/RPC"))
            continue
        conv = conversation(cs, kind)
        if not conv.exchanges:
            skipped.append(Skipped(cs.number, _endpoints(cs), conv.cut_short or "no complete client message"))
            continue
        convs.append(conv)
    return convs, skipped


def replay(capture: str, target: Target, *, streams: list[int] | None = None,
           keyring: Keyring | None = None, timeout: float = DEFAULT_TIMEOUT) -> ReplayRun:
    """Replay every SMB and DCE/RPC conversation of `capture` (or those numbered in `streams`)
    against `target`. Raises CaptureError for captures that cannot be read."""
    captured = read_streams(capture, set(streams) if streams else None)
    if streams:
        missing = sorted(set(streams) - {cs.number for cs in captured})
        if missing:
            from ..capture.pcapread import CaptureError
            raise CaptureError(f"{capture} has no TCP stream {', '.join(map(str, missing))}")
    convs, skipped = pick(captured, bool(streams))
    run = ReplayRun(capture, target.description, target.seed, skipped=skipped)
    learned = Learned(keyring=keyring)
    for conv in convs:
        listener, port, how = route(conv, target, learned)
        cs = conv.stream
        if listener is None:
            run.skipped.append(Skipped(cs.number, _endpoints(cs), how))
            continue
        result = ConversationResult(cs.number, conv.kind, f"{cs.client[0]}:{cs.client[1]}",
                                    f"{cs.server[0]}:{cs.server[1]}", ConversationReplay(conv, learned),
                                    listener, port, route=how, partial_note=conv.cut_short)
        _run_one(result, target, timeout)
        run.conversations.append(result)
    return run


def _run_one(result: ConversationResult, target: Target, timeout: float) -> None:
    engine = result.replay
    kind = engine.conv.kind
    try:
        sock = connect(target.host, result.port, timeout)
    except OSError as exc:
        for ex in engine.conv.exchanges:
            row, _out = engine.prepare(ex)
            row.outcome = "not sent"
        engine.conclude([])
        engine.why = [f"cannot connect to {target.host}:{result.port}: {exc.strerror or exc}"]
        return
    result.local = f"{target.host}:{sock.getsockname()[1]}"
    conn = target.conn_for(sock.getsockname()[1])
    result.conn = conn
    cutter = Cutter(kind)
    queue: deque[bytes] = deque()
    closed = False
    try:
        for ex in engine.conv.exchanges:
            row, out = engine.prepare(ex)
            if closed:
                row.outcome = "not sent"
                continue
            row.event_mark = len(target.events_of(conn))
            try:
                sock.sendall(out.data)
            except OSError:
                row.outcome, closed = "closed", True
                continue
            result.wire.append((True, out.data))
            need = engine.expected(out)
            got = 0
            deadline = time.monotonic() + timeout
            while got < need:
                if queue:
                    got += engine.answer(row, queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    row.outcome = "timeout"
                    break
                sock.settimeout(remaining)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    row.outcome = "timeout"
                    break
                except OSError:
                    data = b""
                if not data:
                    row.outcome, closed = "closed", True
                    break
                result.wire.append((False, data))
                try:
                    queue.extend(cutter.feed(data))
                except ProtocolError:
                    row.outcome, closed = "closed", True
                    break
            if row.outcome == "timeout":
                closed = True      # the conversation is out of step: nothing after can be paired
                continue
            if row.outcome == "pending":
                row.outcome = "answered" if need else "no answer due"
            if need == 0 and out.auth and conn is not None:
                _settle(target, conn, row.event_mark)
    finally:
        sock.close()
    target.wait_closed(conn)
    result.events = target.events_of(conn)
    engine.conclude(result.events)


def _settle(target: Target, conn: str | None, mark: int) -> None:
    """Give the server a moment to write its verdict on a leg it does not answer."""
    deadline = time.monotonic() + AUTH_SETTLE
    while time.monotonic() < deadline:
        events = target.events_of(conn)
        if any(e.get("kind") in ("ntlm.authenticate", "spnego.accept", "rpc.bind", "rpc.auth3", "malformed")
               for e in events[mark:]):
            return
        time.sleep(0.01)
