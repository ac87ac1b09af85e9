"""The seam between SMB and DCE/RPC: a named pipe is an RPC connection whose transport
identity is the SMB session's user.

The SMB engines call `PipeFactory.open(name, identity, info)` when a client opens a pipe on
IPC$, and then `write`/`read`/`transceive` on the returned `Pipe`. This module is where the
session identity is handed to the RPC core, explicitly and nowhere else.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from ..events import Event, event
from ..identity import Identity


class Pipe:
    """A message-mode pipe in front of a sans-IO RPC connection.

    Each response PDU the RPC engine produces is one pipe message. A read smaller than the
    pending message returns a part and `more=True` (SMB answers STATUS_BUFFER_OVERFLOW); the
    rest comes with the next read.
    """

    def __init__(self, name: str, engine: Any) -> None:
        self.name = name
        self._engine = engine
        self._messages: deque[bytes] = deque()
        self.closed = False

    def write(self, data: bytes) -> list[Event]:
        out = self._engine.receive(data)
        if out.data:
            self._messages.append(bytes(out.data))
        if out.close:
            self.closed = True
        return out.events

    def pending(self) -> int:
        return len(self._messages[0]) if self._messages else 0

    def read(self, max_len: int) -> tuple[bytes, bool]:
        """(data, more): `more` is true when the current message did not fit in `max_len`."""
        if not self._messages:
            return b"", False
        msg = self._messages[0]
        if len(msg) <= max_len:
            self._messages.popleft()
            return msg, False
        self._messages[0] = msg[max_len:]
        return msg[:max_len], True

    def transceive(self, data: bytes, max_len: int) -> tuple[bytes, bool, list[Event]]:
        events = self.write(data)
        chunk, more = self.read(max_len)
        return chunk, more, events

    def close(self) -> list[Event]:
        self.closed = True
        self._messages.clear()
        return list(self._engine.close())


class PipeFactory:
    """Maps pipe names (case-insensitive, without the \\pipe\\ prefix) to RPC engine builders.

    `builders[name](identity, info)` returns a fresh RPC connection engine; the SMB session's
    identity goes in as the transport identity.
    """

    def __init__(self, builders: dict[str, Callable[[Identity, dict[str, Any]], Any]]) -> None:
        self._builders = {k.lower(): v for k, v in builders.items()}

    @staticmethod
    def normalise(name: str) -> str:
        n = name.replace("/", "\\").lstrip("\\")
        if n.lower().startswith("pipe\\"):
            n = n[5:]
        return n.rstrip("\x00").lower()

    def names(self) -> list[str]:
        return sorted(self._builders)

    def open(self, name: str, identity: Identity, info: dict[str, Any]) -> tuple[Pipe | None, list[Event]]:
        key = self.normalise(name)
        builder = self._builders.get(key)
        if builder is None:
            return None, []
        engine = builder(identity, dict(info, pipe=key))
        return Pipe(key, engine), [event(
            "smb", "smb.pipe_open", pipe=key, user=identity.user, domain=identity.domain,
            identity=identity.qualified, identity_source=identity.source)]
