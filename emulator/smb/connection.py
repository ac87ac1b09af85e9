"""One SMB connection: NetBIOS session framing and the SMB1-or-SMB2 decision.

Direct TCP (port 445) and NetBIOS (port 139) both carry SMB in NetBIOS session messages: a type
byte and a 24-bit big-endian length (MS-SMB2 2.1, RFC 1002 4.3). The first SMB message decides
the protocol (MS-SMB2 3.3.5.3): an SMB2 NEGOTIATE goes to the SMB2 engine; an SMB1 NEGOTIATE that
offers "SMB 2.002" or "SMB 2.???" is answered with an SMB2 NEGOTIATE response (multi-protocol
negotiate, MS-SMB2 3.3.5.3.1); any other SMB1 NEGOTIATE makes this an SMB1 connection.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from ..auth.factory import AuthFactory
from ..config import LabConfig
from ..events import Event, limit, malformed
from ..sansio import Output, ProtocolError
from . import smb2_wire as w
from .pipe import PipeFactory
from .smb1 import Smb1Engine
from .smb2 import Smb2Engine

LAYER = "smb"
NB_SESSION_MESSAGE = 0x00
NB_SESSION_REQUEST = 0x81
NB_POSITIVE_RESPONSE = 0x82
NB_KEEPALIVE = 0x85
SMB2_DIALECT_STRINGS = ("SMB 2.002", "SMB 2.???")


class SmbConnection:
    def __init__(self, *, config: LabConfig, auth: AuthFactory, pipes: PipeFactory, info: dict | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time) -> None:
        self._config = config
        self._max_message = config.policy.limits.max_pdu_size
        self._config_args = (config, auth, pipes, dict(info or {}), random_bytes, now)
        self._buffer = bytearray()
        self._engine: Smb2Engine | Smb1Engine | None = None    # once the first message decides
        self._smb1 = False
        self._engine_closed = False
        self.closed = False

    @property
    def has_partial_input(self) -> bool:
        return bool(self._buffer)

    @property
    def protocol(self) -> str | None:
        if self._engine is None:
            return None
        return "smb1" if self._smb1 else "smb2"

    def receive(self, data: bytes) -> Output:
        out = Output()
        if self.closed:
            out.close = True
            return out
        self._buffer += data
        while len(self._buffer) >= 4 and not out.close:
            kind = self._buffer[0]
            length = int.from_bytes(self._buffer[1:4], "big")
            if kind == NB_SESSION_MESSAGE and length > self._max_message:
                # Refuse before buffering: a 16 MiB claim must not cost 16 MiB.
                out.events.append(limit(LAYER, "max_pdu_size", claimed=length, value=self._max_message))
                out.events.append(malformed(LAYER, "netbios_length_too_large", claimed=length))
                self._shutdown(out)
                break
            if kind not in (NB_SESSION_MESSAGE, NB_SESSION_REQUEST, NB_KEEPALIVE):
                out.events.append(malformed(LAYER, "bad_netbios_type", type=kind))
                self._shutdown(out)
                break
            if length > 1024 and kind != NB_SESSION_MESSAGE:
                out.events.append(malformed(LAYER, "netbios_control_too_large", type=kind))
                self._shutdown(out)
                break
            if len(self._buffer) < 4 + length:
                break
            payload = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            if kind == NB_KEEPALIVE:
                continue
            if kind == NB_SESSION_REQUEST:
                # Port 139 clients call the server's NetBIOS name first; any name is ours.
                if self._engine is not None:
                    out.events.append(malformed(LAYER, "netbios_session_request_after_smb"))
                    self._shutdown(out)
                    break
                out.data += bytes([NB_POSITIVE_RESPONSE, 0, 0, 0])
                continue
            self._message(payload, out)
        return out

    def _message(self, message: bytes, out: Output) -> None:
        if not message:
            out.events.append(malformed(LAYER, "empty_netbios_message"))
            self._shutdown(out)
            return
        if self._engine is None:
            self._first_message(message, out)
            return
        result = self._engine.handle(message)
        out.extend(result)
        if result.close:
            self.closed = True

    def _first_message(self, message: bytes, out: Output) -> None:
        head = message[:4]
        if head == w.PROTOCOL_ID:
            self._engine = self._smb2()
            self._message(message, out)
            return
        if head != w.SMB1_PROTOCOL_ID:
            out.events.append(malformed(LAYER, "bad_protocol_id", protocol_id=head.hex()))
            self._shutdown(out)
            return
        try:
            dialects = w.smb1_negotiate_dialects(message)
        except ProtocolError as exc:
            out.events.append(malformed(LAYER, exc.reason))
            self._shutdown(out)
            return
        if dialects is None:
            out.events.append(malformed(LAYER, "smb1_request_before_negotiate"))
            self._shutdown(out)
            return
        if any(d in SMB2_DIALECT_STRINGS for d in dialects):
            engine = self._smb2()
            self._engine = engine
            out.extend(engine.negotiate_from_smb1(dialects))
            return
        config, auth, pipes, info, random_bytes, now = self._config_args
        self._engine = Smb1Engine(config=config, auth=auth, pipes=pipes, info=info,
                                  random_bytes=random_bytes, now=now)
        self._smb1 = True
        self._message(message, out)

    def _smb2(self) -> Smb2Engine:
        config, auth, pipes, info, random_bytes, now = self._config_args
        return Smb2Engine(config=config, auth=auth, pipes=pipes, info=info,
                          random_bytes=random_bytes, now=now)

    def _shutdown(self, out: Output) -> None:
        out.close = True
        out.events.extend(self.close())

    def close(self) -> list[Event]:
        """Close every pipe and session of this connection; idempotent."""
        self.closed = True
        self._buffer.clear()
        if self._engine is None or self._engine_closed:
            return []
        self._engine_closed = True
        try:
            return list(self._engine.close())
        except Exception as exc:  # a failing engine must not stop the connection's teardown
            return [malformed(LAYER, "close_failed", error=type(exc).__name__)]
