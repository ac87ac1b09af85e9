"""What a sans-IO engine gives back after it is fed bytes.

Every protocol engine (SMB, DCE/RPC) follows h11's shape: `receive(data) -> Output`. It never
touches a socket or a clock; the transport writes `data`, stamps and logs `events`, and closes
the connection when `close` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .events import Event


@dataclass
class Output:
    data: bytes = b""
    events: list[Event] = field(default_factory=list)
    close: bool = False

    def extend(self, other: "Output") -> None:
        self.data += other.data
        self.events.extend(other.events)
        self.close = self.close or other.close


class ProtocolError(Exception):
    """The one exception type a decoder may raise on bad input. `layer` names the decoder."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer, self.reason = layer, reason


class Engine(Protocol):
    """What a listener drives: the SMB connection and the DCE/RPC connection both are one."""

    def receive(self, data: bytes) -> Output: ...

    def close(self) -> list[Event]:
        """Release what the connection holds; returns the events that releases."""
        ...

    @property
    def has_partial_input(self) -> bool:
        """Bytes of an unfinished message are buffered (the slow-client timer runs)."""
        ...
