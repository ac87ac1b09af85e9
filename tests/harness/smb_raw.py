"""Raw SMB for tests: NetBIOS framing and feeding one engine message by message, with no socket.

The SMB engines answer with an `Output` whose data is NetBIOS-framed; `unframe` splits it back
into SMB messages, `exchange` gives a test the (messages, events, close) of one request.
"""

from __future__ import annotations

from emulator.events import Event
from emulator.smb.session_core import netbios_frame


def nb(message: bytes) -> bytes:
    return netbios_frame(message)


def unframe(data: bytes) -> list[bytes]:
    """The SMB messages of a stream of NetBIOS session messages."""
    out = []
    while data:
        if data[0] != 0:
            raise ValueError(f"NetBIOS type {data[0]:#x} where a session message was expected")
        n = int.from_bytes(data[1:4], "big")
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def exchange(engine, message: bytes) -> tuple[list[bytes], list[Event], bool]:
    """Hand one SMB message to an SMB1 or SMB2 engine: its answers, events and close flag."""
    out = engine.handle(message)
    return unframe(out.data), out.events, out.close
