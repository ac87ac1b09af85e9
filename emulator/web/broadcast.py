"""Server-Sent Events to every open page, at a bounded cost to the listeners.

The listeners share this event loop, so the page must never make a logon wait:
- server events only mark connection views dirty; pages are updated on a timer tick (at most
  TICKS_PER_SECOND), one message per tick whatever the event rate, serialised once and handed
  to every page;
- a tick sends at most MAX_VIEWS_PER_TICK connections and reads at most MAX_FINALS_PER_TICK
  closed connections' captures. More changed connections than that in one tick is a flood (a
  load test, not a lesson): the tick then sends only how many changed and the newest one's
  identity sentence, no ladders, and the page says so;
- each page has a bounded queue; a page that does not keep up (or went away) is dropped, and
  its browser reconnects and starts again from a fresh snapshot;
- bytes written to sockets are most of what an open page costs, so a page that accepts gzip
  (every browser does) gets the stream compressed, and each message is compressed once for all
  of them: it is deflated on its own (no history, ended by a sync flush), which makes it a valid
  continuation of any page's deflate stream, whenever that page joined.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

TICK_SECONDS = 0.25
FLOOD_SECONDS = 1.0          # while flooded, pages hear about it at most this often
MAX_VIEWS_PER_TICK = 3
MAX_FINALS_PER_TICK = 2
QUEUE_SIZE = 32
KEEPALIVE_SECONDS = 15.0


# A gzip member header (RFC 1952): deflate, no flags, no time, unknown OS. The stream it starts
# never gets its trailer: it ends when the page goes away.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Events message (JSON has no raw newlines, so one data line suffices)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def deflate_alone(data: bytes) -> bytes:
    """Raw deflate blocks for `data` that refer to nothing before them and end byte-aligned,
    not final: they can follow any deflate stream."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)


class Message:
    """One message for every page, made once, deflated at most once."""

    __slots__ = ("plain", "_deflated")

    def __init__(self, plain: bytes) -> None:
        self.plain = plain
        self._deflated: bytes | None = None

    def for_page(self, gzip: bool) -> bytes:
        if not gzip:
            return self.plain
        if self._deflated is None:
            self._deflated = deflate_alone(self.plain)
        return self._deflated


@dataclass(eq=False)
class Subscriber:
    gzip: bool = False
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: bool = False


class Broadcaster:
    def __init__(self, render: Callable[[list[str]], dict[str, Any] | None]) -> None:
        # render(changed connection ids, newest last) -> the "conns" message, or None
        self._render = render
        self._subscribers: set[Subscriber] = set()
        self._dirty: dict[str, None] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sent = 0
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._keepalive = loop.call_later(KEEPALIVE_SECONDS, self._keep_alive)

    def _keep_alive(self) -> None:
        # One timer for every page (an idle proxy or browser must see bytes now and then).
        self._deliver(Message(b": keepalive\n\n"))
        if self._loop is not None:
            self._keepalive = self._loop.call_later(KEEPALIVE_SECONDS, self._keep_alive)

    def subscribe(self, gzip: bool = False) -> Subscriber:
        sub = Subscriber(gzip)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def mark(self, conn: str) -> None:
        """A connection changed. Cheap when nobody is watching: nothing is rendered."""
        if not self._subscribers:
            return
        self._dirty.pop(conn, None)
        self._dirty[conn] = None
        if self._tick is None and self._loop is not None:
            self._tick = self._loop.call_later(TICK_SECONDS, self._flush)

    def publish(self, event: str, data: Any) -> None:
        """A message for every page now (matrix rows, what-if results)."""
        self._deliver(Message(sse(event, data)))

    def _flush(self) -> None:
        self._tick = None
        dirty, self._dirty = list(self._dirty), {}
        if not dirty or not self._subscribers:
            return
        message = self._render(dirty)
        if message is not None:
            self._deliver(Message(sse("conns", message)))

    def _deliver(self, payload: Message) -> None:
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(payload)
                self.sent += 1
            except asyncio.QueueFull:
                # Too slow or gone: drop it rather than buffer without bound.
                self._subscribers.discard(sub)
                sub.dropped = True
                self.dropped += 1

    def close(self) -> None:
        for handle in (self._tick, self._keepalive):
            if handle is not None:
                handle.cancel()
        self._tick = self._keepalive = None
        for sub in list(self._subscribers):
            sub.dropped = True
            if not sub.queue.full():
                sub.queue.put_nowait(None)         # wakes its writer, which then ends
        self._subscribers.clear()
