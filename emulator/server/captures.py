"""Where a listener's connections are recorded: one pcap per connection, or one shared pcap
(one per matrix row). Both hand out per-stream recorders from emulator.capture.recorder."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Callable

# In seeded captures client ports are numbered from here in connection order, so that two runs
# of the same scenario write the same frames (the kernel's ephemeral ports differ every run).
STABLE_CLIENT_PORT = 50000


# Wireshark decodes TCP 6000-6063 as X11 by port, before any DCE/RPC heuristic gets a look. An
# EMSMDB listener there (6001 is the lab's default) is written into captures as this port.
X11_PORTS = range(6000, 6064)
X11_SAFE_PORT = 49601


def capture_server(server: tuple[str, int]) -> tuple[str, int]:
    return (server[0], X11_SAFE_PORT) if server[1] in X11_PORTS else server


class _ClientPorts:
    def __init__(self, stable: bool) -> None:
        self._next = itertools.count(STABLE_CLIENT_PORT) if stable else None
        self._lock = threading.Lock()

    def __call__(self, client: tuple[str, int]) -> tuple[str, int]:
        if self._next is None:
            return client
        with self._lock:
            return (client[0], next(self._next))


class _ClosingStream:
    """A stream recorder that also closes its own file when the connection ends."""

    def __init__(self, writer, stream) -> None:
        self._writer, self._stream = writer, stream

    def client_data(self, data: bytes) -> None:
        self._stream.client_data(data)

    def server_data(self, data: bytes) -> None:
        self._stream.server_data(data)

    def close(self) -> None:
        self._stream.close()
        self._writer.close()


class PerConnectionCaptures:
    def __init__(self, directory: str, clock: Callable[[], float], stable_ports: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self._clock = directory, clock
        self._client_port = _ClientPorts(stable_ports)
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def stream(self, conn: str, listener: str, client: tuple[str, int], server: tuple[str, int]):
        from ..capture.recorder import CaptureWriter

        path = os.path.join(self.directory, f"{conn}-{listener}.pcap")
        with self._lock:
            self.paths.append(path)
        writer = CaptureWriter(path, clock=self._clock)
        return _ClosingStream(writer, writer.stream(self._client_port(client), capture_server(server)))

    def close(self) -> None:
        pass


class SharedCapture:
    """All connections into one file, e.g. everything one matrix row did."""

    def __init__(self, path: str, clock: Callable[[], float], stable_ports: bool = False) -> None:
        from ..capture.recorder import CaptureWriter

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._writer = CaptureWriter(path, clock=clock)
        self._client_port = _ClientPorts(stable_ports)

    def stream(self, conn: str, listener: str, client: tuple[str, int], server: tuple[str, int]):
        return self._writer.stream(self._client_port(client), capture_server(server))

    def close(self) -> None:
        self._writer.close()
