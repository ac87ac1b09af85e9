"""Shared NDR helpers for the interfaces: decoding request stubs without ever leaking an exception.

The wire structures themselves are impacket's NDR classes, so the server and the synthetic
client speak from one definition. impacket's decoder, however, raises whatever Python raises
on hostile input (struct.error, IndexError, KeyError, ...) and logs every failure at ERROR
level. A server must answer bad stub data with a fault, not a traceback, so every request
decode goes through `decode_call`: any failure becomes RpcFault(NCA_S_FAULT_NDR), the status
Windows returns for bad stub data (RPC_X_BAD_STUB_DATA, MS-RPCE 2.2.2.11 / C706 appendix E).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, TypeVar

from impacket import LOG as _IMPACKET_LOG
from impacket.dcerpc.v5.ndr import NDRCALL

from ..rpc.interface import NCA_S_FAULT_NDR, RpcFault

T = TypeVar("T", bound=NDRCALL)

# Stubs bigger than this are refused before any decoding; no request of these interfaces
# comes near it (EcDoRpcExt2's rgbIn is bounded by 0x40000 in MS-OXCRPC 3.1.4.2).
MAX_STUB = 0x48000

_quiet_lock = threading.Lock()
_quiet_depth = 0


@contextmanager
def _impacket_quiet() -> Iterator[None]:
    """impacket logs each decoding failure before re-raising it; a malformed stub is an
    expected event for a server (reported as a `malformed` event by the core), not a log line."""
    global _quiet_depth
    with _quiet_lock:
        _quiet_depth += 1
        if _quiet_depth == 1:
            _IMPACKET_LOG.disabled = True
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                _IMPACKET_LOG.disabled = False


def bad_stub(reason: str) -> RpcFault:
    return RpcFault(NCA_S_FAULT_NDR, reason)


def decode_call(cls: type[T], stub: bytes) -> T:
    """Decode a request stub into impacket NDRCALL `cls`, or raise RpcFault(NCA_S_FAULT_NDR)."""
    if len(stub) > MAX_STUB:
        raise bad_stub(f"{cls.__name__}: stub of {len(stub)} bytes is too large")
    with _impacket_quiet():
        try:
            call = cls(isNDR64=False)
            call.fromString(bytes(stub))
        except RecursionError:
            raise bad_stub(f"{cls.__name__}: nesting too deep") from None
        except Exception as exc:  # impacket raises anything on bad input; all of it is bad NDR
            raise bad_stub(f"{cls.__name__}: {type(exc).__name__}") from None
    return call


def encode_call(call: NDRCALL) -> bytes:
    return call.getData()


def dos_string(value: object, what: str, *, max_len: int = 1024) -> str:
    """An `[string, charset(DOS)] char *` decoded by impacket's STR: it must carry its NUL
    terminator (C706 14.3.4.1: a conformant varying string's counts include it), no other NUL,
    and sensible counts."""
    fields = getattr(value, "fields", {})
    data = fields.get("Data", b"")
    if not isinstance(data, bytes):
        data = str(data).encode("latin-1", "replace")
    max_count = fields.get("MaximumCount")
    offset = fields.get("Offset")
    actual = fields.get("ActualCount")
    if offset not in (0, None):
        raise bad_stub(f"{what}: non-zero string offset")
    if actual is not None and len(data) != actual:
        raise bad_stub(f"{what}: string shorter than its count")
    if max_count is not None and actual is not None and actual > max_count:
        raise bad_stub(f"{what}: actual count above maximum count")
    if not data or data[-1:] != b"\x00":
        raise bad_stub(f"{what}: string without terminator")
    text = data[:-1]
    if b"\x00" in text:
        raise bad_stub(f"{what}: NUL inside string")
    if len(text) > max_len:
        raise bad_stub(f"{what}: string longer than {max_len}")
    # charset(DOS): the client's OEM code page. Exchange DNs are ASCII; latin-1 maps every
    # byte, so decoding never fails and never invents characters.
    return text.decode("latin-1")


def wide_string(value: object, what: str, *, max_len: int = 1024) -> str:
    """A `[string] wchar_t *` decoded by impacket's WSTR (already text)."""
    text = str(value)
    if "\x00" in text.rstrip("\x00"):
        raise bad_stub(f"{what}: NUL inside string")
    text = text.rstrip("\x00")
    if len(text) > max_len:
        raise bad_stub(f"{what}: string longer than {max_len}")
    return text
