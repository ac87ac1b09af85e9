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
from typing import Callable, Iterator, TypeVar

from impacket import LOG as _IMPACKET_LOG
from impacket.dcerpc.v5.ndr import NDRCALL

from ..rpc.interface import NCA_S_FAULT_NDR, CallContext, RpcFault

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


# ---------------------------------------------------------------------------------------------
# Big-endian callers.
#
# The format label of a PDU (C706 14.1) says in which byte order its NDR stub is written, and
# C706's rule is "receiver makes it right": a server must read a big-endian stub (Windows' NDR
# engine converts it, rpcndr.h NDR_BIG_ENDIAN; Samba's smbtorture binding option `bigendian`
# sends one). NDR aligns every item on its own size counted from the start of the stub
# (C706 14.2.2), so a big-endian stub and the little-endian stub of the same values have the
# same length and every item sits at the same offset; only the bytes inside each multi-byte
# scalar are reversed. Converting one into the other therefore means walking the stub with the
# call's type layout and reversing each scalar in place. The interfaces then decode the result
# with the little-endian decoders they already have. Replies always go out little-endian with
# a little-endian format label, as Windows sends them; the receiver makes them right.


Deferred = list[Callable[[], None]]


class Layout:
    """The NDR type of one [in] parameter or a part of one. `walk` covers the flat part and
    queues in `deferred` what embedded pointers point to: NDR writes those referents after the
    flat part of the item that contains them, in pointer order (C706 14.3.12.3)."""

    align = 1

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        raise NotImplementedError

    def whole(self, w: _Swapper) -> None:
        """The item and then its referents (each referent's own referents right after it)."""
        deferred: Deferred = []
        self.walk(w, deferred)
        for step in deferred:
            step()


class _Swapper:
    """Reads sizes and pointers big-endian from `src` and reverses each scalar in `out`; with
    `little_endian`, only reads (a walk that checks the stub is well formed)."""

    def __init__(self, src: bytes, what: str, little_endian: bool = False) -> None:
        self.src = src
        self.out = bytearray(src)
        self.pos = 0
        self.what = what
        self.order = "little" if little_endian else "big"

    def truncated(self) -> RpcFault:
        return bad_stub(f"{self.what}: truncated")

    def align(self, n: int) -> None:
        self.pos += -self.pos % n
        if self.pos > len(self.src):
            raise self.truncated()

    def scalar(self, size: int) -> int:
        self.align(size)
        end = self.pos + size
        if end > len(self.src):
            raise self.truncated()
        raw = self.src[self.pos:end]
        if self.order == "big":
            self.out[self.pos:end] = raw[::-1]
        self.pos = end
        return int.from_bytes(raw, self.order)

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.src):
            raise self.truncated()
        self.pos += n

    def count(self) -> int:
        """A size, offset or length. Every element takes at least one byte, so a count larger
        than the stub is a lie; refusing it bounds every walk by the stub's length."""
        n = self.scalar(4)
        if n > len(self.src):
            raise bad_stub(f"{self.what}: count {n} beyond the stub")
        return n


class _Prim(Layout):
    def __init__(self, size: int) -> None:
        self.align = size
        self.size = size

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        w.scalar(self.size)


U8, U16, U32, U64 = _Prim(1), _Prim(2), _Prim(4), _Prim(8)


class _Uuid(Layout):
    """GUID: an unsigned long, two unsigned shorts, eight bytes (C706 appendix A)."""
    align = 4

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        w.scalar(4)
        w.scalar(2)
        w.scalar(2)
        w.skip(8)


UUID = _Uuid()


class _Params(Layout):
    """A call's [in] parameters: each one whole, referents included, before the next (a
    top-level pointer's referent follows its referent id at once)."""

    def __init__(self, items: tuple[Layout, ...]) -> None:
        self.items = items

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        for item in self.items:
            item.whole(w)


def params(*items: Layout) -> Layout:
    return _Params(items)


class _ConfArray(Layout):
    """[size_is()] T a[]: the size, then the elements; `varying` adds the offset and the
    actual count ([length_is()] or [string]). Inside a structure the size is hoisted to the
    structure's start and handed in."""
    align = 4

    def __init__(self, item: Layout, varying: bool) -> None:
        self.item = item
        self.varying = varying

    def walk(self, w: _Swapper, deferred: Deferred, size: int | None = None) -> None:
        if size is None:
            size = w.count()
        n = size
        if self.varying:
            offset, n = w.count(), w.count()
            if offset + n > size:
                raise bad_stub(f"{w.what}: array bounds")
        item = self.item
        if item is U8:
            w.skip(n)
            return
        for _ in range(n):
            item.walk(w, deferred)


def conf_array(item: Layout) -> Layout:
    return _ConfArray(item, varying=False)


def conf_varying_array(item: Layout) -> Layout:
    return _ConfArray(item, varying=True)


class _VaryingArray(Layout):
    """A fixed-size [string] or [length_is()] array: offset and actual count, then the
    elements actually sent (C706 14.3.3.3); `bound` is the declared size."""
    align = 4

    def __init__(self, item: Layout, bound: int) -> None:
        self.item = item
        self.bound = bound

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        offset, n = w.count(), w.count()
        if offset + n > self.bound:
            raise bad_stub(f"{w.what}: array bounds")
        if self.item is U8:
            w.skip(n)
            return
        for _ in range(n):
            self.item.walk(w, deferred)


def varying_array(item: Layout, bound: int) -> Layout:
    return _VaryingArray(item, bound)


class _Struct(Layout):
    """A structure, aligned on its largest member; a conformant one (ending in a conformant
    array) starts with that array's size (C706 14.3.7.1)."""

    def __init__(self, members: tuple[Layout, ...]) -> None:
        self.members = members
        last = members[-1] if members else None
        self.tail = last if isinstance(last, _ConfArray) else None
        self.align = max([4 if self.tail else 1] + [m.align for m in members])

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        w.align(self.align)
        size = w.count() if self.tail is not None else None
        for m in self.members:
            if m is self.tail:
                self.tail.walk(w, deferred, size)
            else:
                m.walk(w, deferred)


def struct_of(*members: Layout) -> Layout:
    return _Struct(members)


class _Ptr(Layout):
    """An embedded unique or full pointer: its referent id here, its referent deferred."""
    align = 4

    def __init__(self, target: Layout) -> None:
        self.target = target

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        if w.scalar(4) != 0:
            deferred.append(lambda: self.target.whole(w))


def ptr(target: Layout) -> Layout:
    return _Ptr(target)


class _Union(Layout):
    """A non-encapsulated union in a structure ([switch_is()]): the discriminant, an unsigned
    long, then the arm it selects (C706 14.3.8)."""

    def __init__(self, arms: dict[int, Layout]) -> None:
        self.arms = arms
        self.align = max([4] + [a.align for a in arms.values()])

    def walk(self, w: _Swapper, deferred: Deferred) -> None:
        w.align(self.align)
        tag = w.scalar(4)
        arm = self.arms.get(tag)
        if arm is None:
            raise bad_stub(f"{w.what}: no union arm {tag}")
        arm.walk(w, deferred)


def union_of(arms: dict[int, Layout]) -> Layout:
    return _Union(arms)


# [string] char * and [string] wchar_t *: conformant varying arrays of bytes or of shorts.
CSTRING = conf_varying_array(U8)
WSTRING = conf_varying_array(U16)
# A context handle: attributes and a UUID (C706 appendix N; MS-RPCE 2.2.4.4 ndr_context_handle).
HANDLE = struct_of(U32, UUID)


def swap_to_little_endian(layout: Layout, stub: bytes, what: str) -> bytes:
    """The little-endian stub with the values of the big-endian `stub` of type `layout`, or
    RpcFault(NCA_S_FAULT_NDR). Bytes after the last parameter are copied as they are."""
    if len(stub) > MAX_STUB:
        raise bad_stub(f"{what}: stub of {len(stub)} bytes is too large")
    w = _Swapper(bytes(stub), what)
    try:
        layout.whole(w)
    except RecursionError:
        raise bad_stub(f"{what}: nesting too deep (big-endian)") from None
    return bytes(w.out)


def check(layout: Layout, stub: bytes, what: str, *, little_endian: bool = True) -> None:
    """RpcFault(NCA_S_FAULT_NDR) unless `stub` holds the [in] parameters of `layout`: a call
    refused whatever it asks is still unmarshalled first, as an NDR engine does, so bad stub
    data gets the bad-stub fault rather than the refusal."""
    if len(stub) > MAX_STUB:
        raise bad_stub(f"{what}: stub of {len(stub)} bytes is too large")
    try:
        layout.whole(_Swapper(bytes(stub), what, little_endian))
    except RecursionError:
        raise bad_stub(f"{what}: nesting too deep") from None


def in_little_endian(ctx: CallContext, layout: Layout | None, stub: bytes, what: str) -> bytes:
    """The request stub as the interface's little-endian decoders read it. `layout` is None
    for an opnum whose stub the interface never reads (no [in] parameters, or a call refused
    whatever it carries); such a stub is passed on untouched."""
    if ctx.little_endian or layout is None:
        return stub
    return swap_to_little_endian(layout, stub, what)
