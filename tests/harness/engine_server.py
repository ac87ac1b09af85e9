"""One loopback server that feeds a sans-IO engine, the way the real listener does, for tests
that want an engine without the whole lab (a custom interface, a custom pipe, a recording).

Every accepted connection gets a fresh engine from `factory`; bytes go in with `receive`, the
`Output` goes back on the socket, its events are kept, and `close()` runs when the peer goes.
`byte_at_a_time` feeds every byte on its own, to prove the framing copes with any split.
`recorder`, when given, is a CaptureWriter: each connection is written as a stream between the
fixed addresses a capture should show.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

from emulator.events import Event
from emulator.sansio import Engine

HOST = "127.0.0.1"


class EngineServer:
    def __init__(self, factory: Callable[[], Engine], *, byte_at_a_time: bool = False,
                 recorder: Any = None, capture_client: str = "10.0.0.10",
                 capture_server: tuple[str, int] = ("10.0.0.20", 445)) -> None:
        self._factory = factory
        self._byte_at_a_time = byte_at_a_time
        self._recorder = recorder
        self._capture_client = capture_client
        self._capture_server = capture_server
        self.events: list[Event] = []
        self.errors: list[BaseException] = []
        self.engines: list[Engine] = []
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._open = 0
        self._served = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> "EngineServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what tests read

    def kinds(self, kind: str, **match: Any) -> list[Event]:
        with self._lock:
            return [e for e in self.events
                    if e.kind == kind and all(e.get(k) == v for k, v in match.items())]

    def wait_served(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until `count` connections have been served to the end (engine closed)."""
        with self._finished:
            return self._finished.wait_for(lambda: self._served >= count, timeout)

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()

    # ------------------------------------------------------------------ serving

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def _log(self, events: list[Event]) -> None:
        with self._lock:
            self.events.extend(events)

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        engine = self._factory()
        with self._lock:
            self.engines.append(engine)
        stream = None
        if self._recorder is not None:
            stream = self._recorder.stream((self._capture_client, peer[1]), self._capture_server)
        client.settimeout(30)
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if stream is not None:
                    stream.client_data(data)
                pieces = [data[i:i + 1] for i in range(len(data))] if self._byte_at_a_time else [data]
                closing = False
                for piece in pieces:
                    out = engine.receive(piece)
                    self._log(out.events)
                    if out.data:
                        if stream is not None:
                            stream.server_data(out.data)
                        client.sendall(out.data)
                    if out.close:
                        closing = True
                        break
                if closing:
                    break
        except OSError:
            pass
        except BaseException as exc:  # an engine exception is a test failure: tests check errors
            with self._lock:
                self.errors.append(exc)
        finally:
            self._log(engine.close())
            if stream is not None:
                stream.close()
            client.close()
            with self._finished:
                self._served += 1
                self._finished.notify_all()
