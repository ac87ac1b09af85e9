"""The live view's web application, on the event loop that runs the lab's listeners.

    view = LiveView(lab, parse_address("127.0.0.1:8080"))
    await view.start()          # after the listeners; view.url is the page
    ...
    await view.stop()

Safety: every request is checked for the token when the address needs one (403 without it);
a page served on a token-free loopback name answers only to loopback Host names (a page on
another site cannot reach it by rebinding a DNS name) and refuses form posts from other
origins. Errors reach the browser as one line of text, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from ..matrix import Scenario, kb_scenarios
from .address import TOKEN_FREE_HOSTS, UiAddress
from .broadcast import (FLOOD_SECONDS, GZIP_HEADER, MAX_FINALS_PER_TICK, MAX_VIEWS_PER_TICK, Broadcaster,
                        Message, sse)
from .forms import FormError, what_if
from .labview import lab_summary
from .live import LiveConnections
from .runs import HEADINGS, result_message, run_scenario, scenario_row

if TYPE_CHECKING:
    from ..lab import Lab

log = logging.getLogger("rpcauth.ui")
ASSETS = {"live.js": "text/javascript", "live.css": "text/css"}
COOKIE = "rpcauth_token"
SNAPSHOT_CONNS = 30
MAX_BODY = 2 << 20          # larger bodies get aiohttp's 413; fields are checked at MAX_FIELD
_LOOPBACK_HOST_NAMES = {"127.0.0.1", "localhost", "[::1]"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _asset(name: str) -> bytes:
    return resources.files("emulator.web").joinpath("assets", name).read_bytes()


class LiveView:
    def __init__(self, lab: "Lab", address: UiAddress, scenarios: list[Scenario] | None = None) -> None:
        self.lab = lab
        self.address = address
        self.scenarios = {s.id: s for s in (scenarios if scenarios is not None else kb_scenarios())}
        self.conns = LiveConnections(capture_dir=lab.per_connection_capture_dir)
        self.hub = Broadcaster(self._render)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._run_lock = asyncio.Lock()
        self._stopped = False
        self._results: dict[str, dict[str, Any]] = {}
        self._last_flood = float("-inf")
        self._pushed: dict[str, int] = {}          # connection -> messages in the ladder last pushed

    @property
    def url(self) -> str:
        return self.address.url(self.port)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.hub.attach(self._loop)
        self.lab.events.subscribe(self._on_event)
        app = web.Application(middlewares=[self._errors, self._guard], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/assets/{name}", self._assets)
        r.add_get("/api/lab", self._lab)
        r.add_get("/api/matrix", self._matrix)
        r.add_post("/api/rows/{row}/run", self._run_row)
        r.add_post("/api/whatif", self._what_if)
        r.add_get("/api/events", self._events)
        r.add_get("/api/conns/{conn}", self._conn)
        r.add_get("/conn/{conn}/pcap", self._pcap)
        r.add_get("/conn/{conn}/explain", self._explain)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port, reuse_address=True)
        await site.start()
        bound = self._runner.addresses               # (host, port[, ...]) per listening socket
        self.port = bound[0][1] if bound else self.address.port

    async def stop(self) -> None:
        self._stopped = True
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ server events
    def _on_event(self, rec: dict[str, Any]) -> None:
        if self._stopped or self._loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._on_event, rec)
            return
        view = self.conns.feed(rec)
        if view is not None:
            self.hub.mark(view.conn)

    def _render(self, dirty: list[str]) -> dict[str, Any] | None:
        views = [v for v in (self.conns.get(c) for c in dirty) if v is not None]
        if not views:
            return None
        if len(views) > MAX_VIEWS_PER_TICK:
            now = self._loop.time() if self._loop is not None else 0.0
            if now - self._last_flood < FLOOD_SECONDS:
                return None
            self._last_flood = now
            newest = views[-1]
            return {"conns": [], "skipped": len(views),
                    "latest": {"conn": newest.conn, "listener": newest.listener, "words": newest.words}}
        finals = MAX_FINALS_PER_TICK
        out = []
        for v in reversed(views):                       # the newest get the capture reading first
            final = v.closed is not None and finals > 0
            if final and not v.has_final:
                finals -= 1
            # Every page gets every message, so a ladder already pushed is not pushed again.
            v.sync()
            drawn = self._pushed.get(v.conn) == v.messages
            self._pushed[v.conn] = v.messages
            out.append(v.to_message(final, ladders=False, live=not drawn))
        out.reverse()
        while len(self._pushed) > 2 * SNAPSHOT_CONNS:
            self._pushed.pop(next(iter(self._pushed)))
        return {"conns": out, "skipped": 0}

    # ------------------------------------------------------------------ middlewares
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise                                  # already a response with a one-line text
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("live view: %s %s failed", request.method, request.path)
            return web.Response(status=500, text="internal error; the server keeps serving\n")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.address.needs_token:
            if not self._token_ok(request):
                return web.Response(status=403, text="forbidden: this live view needs the token printed when "
                                                     "rpcauth started (open the URL it printed)\n")
        elif request.host.rsplit(":", 1)[0] not in _LOOPBACK_HOST_NAMES | TOKEN_FREE_HOSTS:
            return web.Response(status=403, text="forbidden: this live view answers to loopback names only\n")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return web.Response(status=403, text="forbidden: a form from another site\n")
        response = await handler(request)
        if self.address.needs_token and request.query.get("token") and not response.prepared:
            response.set_cookie(COOKIE, self.address.token or "", httponly=True, samesite="Strict")
        return response

    def _token_ok(self, request: web.Request) -> bool:
        expected = (self.address.token or "").encode()
        for given in (request.query.get("token"), request.headers.get("X-Rpcauth-Token"),
                      request.cookies.get(COOKIE)):
            if given and hmac.compare_digest(given.encode(), expected):
                return True
        return False

    # ------------------------------------------------------------------ pages and data
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _assets(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text="no such asset\n")
        return web.Response(body=_asset(name), content_type=ASSETS[name], charset="utf-8")

    def _lab_doc(self) -> dict[str, Any]:
        return lab_summary(self.lab.config, self.lab.ports, self.lab.host)

    async def _lab(self, request: web.Request) -> web.Response:
        return web.json_response(self._lab_doc())

    def _matrix_doc(self) -> dict[str, Any]:
        return {"headings": HEADINGS, "rows": [scenario_row(s) for s in self.scenarios.values()],
                "results": list(self._results.values())}

    async def _matrix(self, request: web.Request) -> web.Response:
        return web.json_response(self._matrix_doc())

    async def _run(self, scenario: Scenario) -> dict[str, Any]:
        if self._run_lock.locked():
            raise web.HTTPConflict(text="another run is in progress; try again when it has finished\n")
        async with self._run_lock:
            result = await asyncio.to_thread(run_scenario, self.lab, scenario)
        return result_message(result)

    def publish_result_threadsafe(self, row: str, msg: dict[str, Any]) -> None:
        """A row result computed outside the loop (rpcauth matrix --ui) -> every page."""
        def publish() -> None:
            self._results[row] = msg
            self.hub.publish("row", msg)

        if self._loop is not None:
            self._loop.call_soon_threadsafe(publish)

    async def _run_row(self, request: web.Request) -> web.Response:
        row = request.match_info["row"]
        scenario = self.scenarios.get(row)
        if scenario is None:
            raise web.HTTPNotFound(text=f"no matrix row {row[:40]!r}\n")
        msg = await self._run(scenario)
        self._results[row] = msg
        self.hub.publish("row", msg)
        return web.json_response(msg)

    async def _what_if(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"cannot read the form: {exc}\n") from None
        try:
            # An uploaded file in a field is read as an empty value, then refused or ignored.
            fields = {k: (v if isinstance(v, str) else "") for k, v in form.items()}
            scenario = what_if(fields, self.lab.config)
        except FormError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        msg = await self._run(scenario)
        self.hub.publish("whatif", msg)
        return web.json_response(msg)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        gzip = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        sub = self.hub.subscribe(request.transport, gzip, chunked)
        try:
            snapshot = {"lab": self._lab_doc(), "matrix": self._matrix_doc(),
                        "conns": [v.to_message(True, ladders=False) for v in self.conns.recent(SNAPSHOT_CONNS)]}
            first = Message(b"retry: 2000\n\n" + sse("snapshot", snapshot)).for_page(gzip)
            # aiohttp writes the headers and this first chunk; later messages go to the socket
            # directly, framed the same way (broadcast.Message.for_page).
            await resp.write(GZIP_HEADER + first if gzip else first)
            self.hub.ready(sub)
            await sub.done
        except (ConnectionError, RuntimeError):
            pass                                   # the page went away
        finally:
            self.hub.unsubscribe(sub)
        return resp

    def _view(self, request: web.Request):
        conn = request.match_info["conn"]
        view = self.conns.get(conn)
        if view is None:
            raise web.HTTPNotFound(text=f"no connection {conn[:20]!r} in the live view\n")
        return view

    async def _conn(self, request: web.Request) -> web.Response:
        return web.json_response(self._view(request).to_message(True))

    def _closed_capture(self, request: web.Request) -> str:
        view = self._view(request)
        if not view.capture or not os.path.exists(view.capture):
            raise web.HTTPNotFound(text="no capture was recorded for this connection\n")
        if view.closed is None:
            raise web.HTTPConflict(text="the connection is still open; its capture is complete once it closes\n")
        return view.capture

    async def _pcap(self, request: web.Request) -> web.StreamResponse:
        path = self._closed_capture(request)
        name = os.path.basename(path)
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                               "Content-Type": "application/vnd.tcpdump.pcap"})

    async def _explain(self, request: web.Request) -> web.Response:
        from ..capture import CaptureError
        from ..capture.explain import explain

        path = self._closed_capture(request)
        try:
            text = await asyncio.to_thread(explain, path, "text", progress=False)
        except CaptureError as exc:
            text = f"rpcauth explain: {exc}\n"
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

