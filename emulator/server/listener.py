"""One TCP listener: accepts connections, runs a fresh sans-IO engine for each, and does the
I/O, the limits, the event stamping and the capture recording around it."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from typing import Any, Callable

from ..config import Limits
from ..events import EventLog, event, limit, malformed

# Connection ids are unique across all listeners of a process: c1, c2, ...
_conn_ids = itertools.count(1)


class Listener:
    def __init__(self, name: str, host: str, port: int, engine_factory: Callable[[dict[str, Any]], Any],
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

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.requested_port,
                                                  reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

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
            self._log.emit(conn, limit(self._layer, "max_connections", listener=self.name, peer=peer))
            writer.close()
            return
        if self._per_peer[peer_host] >= self._limits.max_connections_per_peer:
            self._log.emit(conn, limit(self._layer, "max_connections_per_peer", listener=self.name, peer=peer))
            writer.close()
            return
        self._per_peer[peer_host] += 1

        info = {"peer": peer, "listener": self.name, "local_port": local_port}
        self._log.emit(conn, event(self._layer, "conn.open", listener=self.name, peer=peer, port=local_port))
        stream = None
        if self._capture is not None:
            stream = self._capture.stream(conn, self.name, (peer_host, peer_port),
                                          (self.host, self._capture_port or local_port))
        engine = None
        reason = "peer_closed"
        try:
            engine = self._factory(info)
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), self._limits.idle_timeout)
                except asyncio.TimeoutError:
                    self._log.emit(conn, limit(self._layer, "idle_timeout", listener=self.name,
                                               seconds=self._limits.idle_timeout))
                    reason = "idle_timeout"
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
                self._log.emit_all(conn, out.events)
                if out.data:
                    if stream is not None:
                        stream.server_data(out.data)
                    writer.write(out.data)
                    await writer.drain()
                if out.close:
                    reason = "server_closed"
                    break
        except (ConnectionError, OSError):
            reason = "reset"
        except asyncio.CancelledError:
            reason = "shutdown"
        finally:
            if engine is not None:
                try:
                    self._log.emit_all(conn, list(engine.close()))
                except Exception as exc:
                    self._log.emit(conn, malformed(self._layer, "internal_error", error=type(exc).__name__))
            self._per_peer[peer_host] -= 1
            if self._per_peer[peer_host] <= 0:
                del self._per_peer[peer_host]
            if stream is not None:
                stream.close()
            try:
                writer.close()
            except Exception:
                pass
            self._log.emit(conn, event(self._layer, "conn.close", listener=self.name, peer=peer, reason=reason))
