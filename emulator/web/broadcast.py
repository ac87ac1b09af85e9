"""Server-Sent Events to every open page, at a bounded cost to the listeners.

The listeners share this event loop, so the page must never make a logon wait:
- server events only mark connection views dirty; pages are updated on a timer tick (at most
  TICKS_PER_SECOND), one message per tick whatever the event rate, serialised once and handed
  to every page;
- a tick sends at most MAX_VIEWS_PER_TICK connections and reads at most MAX_FINALS_PER_TICK
  closed connections' captures. More changed connections than that in one tick is a flood (a
  load test, not a lesson): the tick then sends only how many changed and the newest one's
  identity sentence, no ladders, and the page says so;
- messages are written straight to each page's socket (no task or queue per page); a page
  whose unsent bytes pass MAX_BUFFERED is dropped (it does not keep up, or went away), and its
  browser reconnects and starts again from a fresh snapshot;
- bytes written to sockets are most of what an open page costs, so a page that accepts gzip
  (every browser does) gets the stream compressed, and each message is compressed once for all
  of them: it is deflated on its own (no history, ended by a sync flush), which makes it a valid
  continuation of any page's deflate stream, whenever that page joined.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any, Callable

TICK_SECONDS = 0.25
FLOOD_SECONDS = 1.0          # while flooded, pages hear about it at most this often
MAX_VIEWS_PER_TICK = 3
MAX_FINALS_PER_TICK = 2
QUEUE_SIZE = 32              # messages held for a page whose snapshot is still being written
MAX_BUFFERED = 1 << 20       # bytes waiting in a page's socket buffer before it is dropped
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
    """One message for every page, made once: deflated at most once, framed at most once per
    kind of page."""

    __slots__ = ("plain", "_forms")

    def __init__(self, plain: bytes) -> None:
        self.plain = plain
        self._forms: dict[tuple[bool, bool], bytes] = {}

    def for_page(self, gzip: bool, chunked: bool = False) -> bytes:
        form = self._forms.get((gzip, chunked))
        if form is None:
            body = deflate_alone(self.plain) if gzip else self.plain
            # HTTP/1.1 chunked transfer coding (RFC 9112 section 7.1), as aiohttp began it.
            form = b"%x\r\n%b\r\n" % (len(body), body) if chunked else body
            self._forms[(gzip, chunked)] = form
        return form


class Subscriber:
    """One open page: its socket, how its stream is coded, and a future done when it leaves."""

    def __init__(self, transport: asyncio.BaseTransport | None, gzip: bool, chunked: bool,
                 done: asyncio.Future) -> None:
        self.transport = transport
        self.gzip, self.chunked = gzip, chunked
        self.done = done
        self.waiting: list[Message] | None = []     # held until the page's snapshot is out

    def leave(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


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
        # One timer for every page: an idle proxy or browser must see bytes now and then, and a
        # page that went away is noticed at the latest here.
        self._deliver(Message(b": keepalive\n\n"))
        if self._loop is not None:
            self._keepalive = self._loop.call_later(KEEPALIVE_SECONDS, self._keep_alive)

    def subscribe(self, transport: asyncio.BaseTransport | None, gzip: bool = False,
                  chunked: bool = False) -> Subscriber:
        """A page whose response has been prepared. Messages for it are held until `ready`."""
        loop = self._loop or asyncio.get_running_loop()
        sub = Subscriber(transport, gzip, chunked, loop.create_future())
        self._subscribers.add(sub)
        return sub

    def ready(self, sub: Subscriber) -> None:
        """The page's snapshot is written: from now on messages go straight to its socket."""
        held, sub.waiting = sub.waiting or [], None
        for message in held:
            self._write(sub, message)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.leave()

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

    def _deliver(self, message: Message) -> None:
        for sub in list(self._subscribers):
            self._write(sub, message)

    def _write(self, sub: Subscriber, message: Message) -> None:
        # Written to the socket here, with no task per page: one write per page per message.
        if sub.waiting is not None:
            if len(sub.waiting) >= QUEUE_SIZE:
                self._drop(sub, abort=True)
            else:
                sub.waiting.append(message)
            return
        t = sub.transport
        if t is None or t.is_closing():
            self._drop(sub, abort=False)
        elif t.get_write_buffer_size() > MAX_BUFFERED:      # type: ignore[attr-defined]
            self._drop(sub, abort=True)                    # too slow: drop it, never buffer more
        else:
            t.write(message.for_page(sub.gzip, sub.chunked))  # type: ignore[attr-defined]
            self.sent += 1

    def _drop(self, sub: Subscriber, abort: bool) -> None:
        self._subscribers.discard(sub)
        self.dropped += 1
        if abort and sub.transport is not None:
            sub.transport.abort()                          # type: ignore[attr-defined]
        sub.leave()

    def close(self) -> None:
        for handle in (self._tick, self._keepalive):
            if handle is not None:
                handle.cancel()
        self._tick = self._keepalive = None
        for sub in list(self._subscribers):
            sub.leave()
        self._subscribers.clear()
