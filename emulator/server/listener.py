"""One TCP listener: accepts connections, runs a fresh sans-IO engine for each, and does the
I/O, the limits, the event stamping and the capture recording around it.

Limits enforced here (the engines enforce message sizes, pipes and sessions themselves); each
one, when it bites, is reported as a `limit` event carrying `limit`, `listener`, `peer` and
`value`, and engine-made `limit` events are completed with the same fields:

- max_connections, max_connections_per_peer: checked on accept; the connection is closed
  before any byte is read and gets no conn.open.
- idle_timeout: no byte from the client for this long.
- slow_client_timeout: a message that has started must complete within this long, so a client
  cannot hold a connection open by trickling one byte at a time (each byte would reset the
  idle timer). "Started" is the engine's `has_partial_input`: bytes of an unfinished message
  are buffered, or (DCE/RPC) a call's last fragment has not come yet, so a multi-fragment call
  is one message and the whole call must arrive in time. A message the engine answers with
  nothing (AUTH3) has not started anything.
- handshake_timeout: an NTLM CHALLENGE was sent and no AUTHENTICATE came back in time. The
  acceptor also refuses a late AUTHENTICATE itself (result "expired", MS-NLMP 3.2.5.1.2 leaves
  the bound to the server); the listener reports that as the same limit and, for a client
  that never answers, closes the connection instead of waiting for the idle timeout.

Shutdown (`stop`) stops accepting, cancels every connection task and waits for each to write
its capture FIN and its conn.close event, so the events file ends with one conn.close per
conn.open. Connections the kernel accepted after the last snapshot are refused silently.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from dataclasses import fields as dataclass_fields
from typing import Any, Callable

from ..config import Limits
from ..events import Event, EventLog, event, limit, malformed
from ..sansio import Engine

# Connection ids are unique across all listeners of a process: c1, c2, ...
_conn_ids = itertools.count(1)

# How long stop() waits for cancelled connections to finish their bookkeeping, per round.
STOP_GRACE = 2.0
READ_SIZE = 65536
_LIMIT_NAMES = frozenset(f.name for f in dataclass_fields(Limits))


class _Deadlines:
    """The timers of one connection, on the event loop's monotonic clock."""

    def __init__(self, limits: Limits, now: float) -> None:
        self._limits = limits
        self.last_read = now
        self.message_since: float | None = None     # a message started and has not completed
        self.handshake_since: float | None = None   # a CHALLENGE is waiting for its AUTHENTICATE

    def next(self, now: float) -> tuple[float, str]:
        """Seconds until the earliest deadline, and the limit it belongs to."""
        candidates = [(self.last_read + self._limits.idle_timeout, "idle_timeout")]
        if self.message_since is not None:
            candidates.append((self.message_since + self._limits.slow_client_timeout, "slow_client_timeout"))
        if self.handshake_since is not None:
            candidates.append((self.handshake_since + self._limits.handshake_timeout, "handshake_timeout"))
        when, which = min(candidates)
        return max(0.0, when - now), which

    def after_receive(self, engine: Engine, events: list[Event], now: float) -> None:
        self.last_read = now
        if not engine.has_partial_input:
            self.message_since = None
        elif self.message_since is None:
            self.message_since = now
        for ev in events:
            if ev.kind == "ntlm.challenge" and self.handshake_since is None:
                self.handshake_since = now
            elif ev.kind in ("ntlm.authenticate", "spnego.accept"):
                self.handshake_since = None


class Listener:
    def __init__(self, name: str, host: str, port: int, engine_factory: Callable[[dict[str, Any]], Engine],
                 log: EventLog, limits: Limits, *, capture: Any = None, capture_port: int | None = None,
                 layer: str = "tcp") -> None:
        self.name = name
        self.host, self.requested_port = host, port
        self.port = 0
        self._factory = engine_factory
        self._log = log
        self._limits = limits
        self._capture = capture            # a CaptureWriter-like object or a per-connection factory
        self._capture_port = capture_port  # the server port written into captures (445, 135, ...)
        self._layer = layer
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._per_peer: Counter[str] = Counter()
        self._closing = False

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.requested_port,
                                                  reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Cancel until no connection is left: a task the server started just before close()
        # may join the set while we wait for the others. Bounded, so shutdown always ends.
        for _ in range(5):
            tasks = list(self._tasks)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), STOP_GRACE)
            except asyncio.TimeoutError:
                pass

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            # Accepted by the kernel while we were shutting down: not a lab connection.
            writer.close()
            return
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a connection handler runs outside a task")
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    def _limit(self, conn: str, which: str, peer: str, value: Any) -> None:
        self._log.emit(conn, limit(self._layer, which, listener=self.name, peer=peer, value=value))

    def _stamp(self, ev: Event, peer: str) -> Event:
        """An engine's limit event does not know the socket: add listener, peer and value."""
        if ev.kind != "limit":
            return ev
        extra: dict[str, Any] = {"listener": self.name, "peer": peer}
        which = ev.fields.get("limit")
        if "value" not in ev.fields and which in _LIMIT_NAMES:
            extra["value"] = getattr(self._limits, which)
        extra.update(ev.fields)
        return Event(ev.layer, ev.kind, extra)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = f"c{next(_conn_ids)}"
        peer_host, peer_port = writer.get_extra_info("peername")[:2]
        local_port = writer.get_extra_info("sockname")[1]
        peer = f"{peer_host}:{peer_port}"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without this, a client's AUTH3 followed by a request waits for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        if len(self._tasks) > self._limits.max_connections:
            self._limit(conn, "max_connections", peer, self._limits.max_connections)
            writer.close()
            return
        if self._per_peer[peer_host] >= self._limits.max_connections_per_peer:
            self._limit(conn, "max_connections_per_peer", peer, self._limits.max_connections_per_peer)
            writer.close()
            return
        self._per_peer[peer_host] += 1

        info = {"peer": peer, "listener": self.name, "local_port": local_port}
        self._log.emit(conn, event(self._layer, "conn.open", listener=self.name, peer=peer, port=local_port))
        stream = None
        engine = None
        reason = "peer_closed"
        loop = asyncio.get_running_loop()
        deadlines = _Deadlines(self._limits, loop.time())
        try:
            if self._capture is not None:
                stream = self._capture.stream(conn, self.name, (peer_host, peer_port),
                                              (self.host, self._capture_port or local_port))
            engine = self._factory(info)
            while True:
                wait, which = deadlines.next(loop.time())
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
                    # arrives as the read completes, and a busy client then outlives shutdown.
                    async with asyncio.timeout(wait):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    self._limit(conn, which, peer, getattr(self._limits, which))
                    reason = which
                    break
                if not data:
                    break
                if stream is not None:
                    stream.client_data(data)
                try:
                    out = engine.receive(data)
                except Exception as exc:  # an engine bug must cost one connection, not the server
                    self._log.emit(conn, malformed(self._layer, "internal_error", error=type(exc).__name__,
                                                   listener=self.name))
                    reason = "internal_error"
                    break
                for ev in out.events:
                    self._log.emit(conn, self._stamp(ev, peer))
                    if ev.kind == "ntlm.authenticate" and ev.fields.get("result") == "expired":
                        self._limit(conn, "handshake_timeout", peer, self._limits.handshake_timeout)
                deadlines.after_receive(engine, out.events, loop.time())
                if out.data:
                    if stream is not None:
                        stream.server_data(out.data)
                    writer.write(out.data)
                    await writer.drain()
                if out.close:
                    reason = "server_closed"
                    break
                if self._closing:
                    reason = "shutdown"
                    break
        except (ConnectionError, OSError):
            reason = "reset"
        except asyncio.CancelledError:
            reason = "shutdown"
        finally:
            if engine is not None:
                try:
                    self._log.emit_all(conn, [self._stamp(ev, peer) for ev in engine.close()])
                except Exception as exc:
                    self._log.emit(conn, malformed(self._layer, "internal_error", error=type(exc).__name__))
            self._per_peer[peer_host] -= 1
            if self._per_peer[peer_host] <= 0:
                del self._per_peer[peer_host]
            if stream is not None:
                try:
                    stream.close()
                except Exception as exc:  # a full disk must not lose the conn.close line
                    self._log.emit(conn, malformed(self._layer, "capture_error", error=type(exc).__name__))
            try:
                writer.close()
            except Exception:
                pass
            self._log.emit(conn, event(self._layer, "conn.close", listener=self.name, peer=peer, reason=reason))
