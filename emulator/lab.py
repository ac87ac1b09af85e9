"""Lab: every listener of one lab config, started on an asyncio loop, for the CLI, the tests and
the pytest plugin.

    with Lab() as lab:                      # the embedded KB cast, ephemeral loopback ports
        lab.ports["emsmdb"], lab.ports["smb"], lab.ports["epm"]
        lab.events.records("emsmdb.connect")

`Lab.run_forever()` serves in the calling thread (rpcauth serve); `start()`/`stop()` (and the
context manager) serve from a background thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Iterator

from .config import LabConfig, coerce_config
from .determinism import sources
from .events import EventLog, event
from .kerberos.realm import Realm
from .server.captures import PerConnectionCaptures, SharedCapture
from .server.listener import Listener
from .server.services import LabServices

if TYPE_CHECKING:
    from .kerberos.acceptor import KerberosService

# Ports written into captures, so Wireshark decodes SMB and the endpoint mapper by port.
CAPTURE_PORTS = {"smb": 445, "epm": 135}


class Lab:
    def __init__(self, config: Any = None, *, host: str = "127.0.0.1", ephemeral: bool = True,
                 captures: str | None = None, capture_file: str | None = None,
                 events_path: str | None = None, seed: int | None = None,
                 ports: dict[str, int | None] | None = None, keep_events: int = 200_000,
                 ui: Any = None) -> None:
        cfg: LabConfig = coerce_config(config)
        if ephemeral:
            cfg = cfg.with_ports(smb=0, epm=0, emsmdb=0, kdc=0)
        if ports:
            cfg = cfg.with_ports(**ports)
        self.config = cfg
        self.host = host
        self.seed = seed
        self.random_bytes, self.now = sources(seed)
        # Records kept in memory for `records()`; the events file, if any, gets every one.
        self.events = EventLog(events_path, clock=self.now, keep=keep_events)
        self.captures_dir = captures
        # The live view (`ui`: "[HOST:]PORT" or a web.UiAddress) offers each connection's pcap,
        # so it records one per connection, into a directory of its own unless told where.
        self.ui_address = None
        self.ui: Any = None
        self._own_captures_dir = False
        if ui is not None:
            from .web import UiAddress, parse_address

            self.ui_address = ui if isinstance(ui, UiAddress) else parse_address(ui)
            if captures is None and capture_file is None:
                self.captures_dir = tempfile.mkdtemp(prefix="rpcauth-live-")
                self._own_captures_dir = True
        self._capture_file = capture_file
        self._capture: Any = None
        self.ports: dict[str, int] = {}
        self.listeners: list[Listener] = []
        self.services: LabServices | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        # The lab's private Kerberos realm and its running KDC, when config.kerberos.enabled.
        self.realm: Realm | None = None

    # ------------------------------------------------------------------ async core
    async def start_async(self) -> None:
        kerberos = None
        if self.config.kerberos.enabled:
            kerberos = await asyncio.to_thread(self._start_realm)
        try:
            await self._start_listeners(kerberos)
        except BaseException:
            # A listener that could not bind must not leave the KDC running.
            await asyncio.gather(*(lst.stop() for lst in self.listeners))
            self.listeners = []
            if self.realm is not None:
                await asyncio.to_thread(self.realm.stop)
                self.realm = None
            raise

    async def _start_listeners(self, kerberos: "KerberosService | None") -> None:
        self.services = LabServices(self.config, random_bytes=self.random_bytes, now=self.now,
                                    host=self.host, kerberos=kerberos)
        stable = self.seed is not None
        if self._capture_file:
            self._capture = SharedCapture(self._capture_file, self.now, stable_ports=stable)
        elif self.captures_dir:
            self._capture = PerConnectionCaptures(self.captures_dir, self.now, stable_ports=stable)
        t = self.config.transports
        specs = [
            ("epm", t.epm.enabled, t.epm.port, self.services.epm_engine, "rpc"),
            ("emsmdb", t.emsmdb.enabled, t.emsmdb.port, self.services.emsmdb_engine, "rpc"),
            ("smb", t.smb.enabled, t.smb.port, self.services.smb_engine, "smb"),
        ]
        for name, enabled, port, factory, layer in specs:
            if not enabled:
                continue
            lst = Listener(name, self.host, port, factory, self.events, self.config.policy.limits,
                           capture=self._capture, capture_port=CAPTURE_PORTS.get(name), layer=layer)
            await lst.start()
            self.listeners.append(lst)
            self.ports[name] = lst.port
        self.services.bound_ports = dict(self.ports)
        if self.ui_address is not None:
            from .web.app import LiveView

            self.ui = LiveView(self, self.ui_address)
            await self.ui.start()
        self.events.emit("lab", event("lab", "lab.ready", host=self.host, ports=dict(self.ports),
                                      config=self.config.source))

    def _start_realm(self) -> "KerberosService":
        """Create the realm and start its KDC (blocking: MIT's tools run as child processes)."""
        from .kerberos.acceptor import KerberosService

        k = self.config.kerberos
        self.realm = Realm.create(self.config, realm=k.realm_for(self.config.server),
                                  hostname=k.hostname, port=k.kdc_port, host=self.host)
        for user in self.realm.ntlm_only:
            self.events.emit("lab", event("kerberos", "kerberos.ntlm_only", user=user,
                                          detail="configured by NT hash only; its RC4-HMAC key "
                                                 "could not be placed in the KDC"))
        self.events.emit("lab", event("kerberos", "kerberos.kdc_ready", realm=self.realm.name,
                                      kdc=self.realm.port, host=self.host,
                                      services=self.realm.service_principals()))
        return KerberosService(keytab=self.realm.keytab, rcache=self.realm.rcache,
                               realm=self.realm.name, domain=self.config.server.domain)

    async def stop_async(self) -> None:
        if self.ui is not None:
            await self.ui.stop()
        # All listeners at once: one busy listener must not hold the others' connections open.
        await asyncio.gather(*(lst.stop() for lst in self.listeners))
        self.listeners = []
        if self.realm is not None:
            await asyncio.to_thread(self.realm.stop)
            self.realm = None
        if self._capture is not None:
            self._capture.close()
        self.events.emit("lab", event("lab", "lab.stopped"))
        self.events.close()
        if self._own_captures_dir and self.captures_dir:
            shutil.rmtree(self.captures_dir, ignore_errors=True)

    async def serve_until(self, stop: asyncio.Event) -> None:
        await self.start_async()
        try:
            await stop.wait()
        finally:
            await self.stop_async()

    # ------------------------------------------------------------------ background thread
    def start(self) -> "Lab":
        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stopped = asyncio.Event()
            try:
                loop.run_until_complete(self._run_in_thread())
            except BaseException as exc:  # reported to start()
                self._error = exc
                self._ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="rpcauth-lab", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("lab did not start within 30 s")
        return self

    async def _run_in_thread(self) -> None:
        if self._stopped is None:
            raise RuntimeError("the lab thread started before its stop event was made")
        await self.start_async()
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await self.stop_async()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ conveniences
    @property
    def per_connection_capture_dir(self) -> str | None:
        """Where each connection's own pcap is written, if captures are per connection."""
        return self.captures_dir if self._capture_file is None and self.captures_dir else None

    @property
    def ui_url(self) -> str | None:
        return self.ui.url if self.ui is not None else None

    @property
    def capture_paths(self) -> list[str]:
        if isinstance(self._capture, SharedCapture):
            return [self._capture.path]
        if isinstance(self._capture, PerConnectionCaptures):
            return list(self._capture.paths)
        return []

    def password(self, user: str) -> str:
        """The lab password of a user, for tests that play that user."""
        u = self.config.user(user)
        if u is None or u.password is None:
            raise KeyError(f"no password for {user!r} in this lab")
        return u.password

    def records(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return self.events.records(kind, **match)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def ready_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"host": self.host, "smb": self.ports.get("smb"),
                                "epm": self.ports.get("epm"), "emsmdb": self.ports.get("emsmdb"),
                                "pid": os.getpid(), "ui": self.ui_url}
        if self.realm is not None:
            info.update(self.realm.ready_info())
        return info
