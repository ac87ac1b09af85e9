"""Byte-level mutators for protocol fuzzing, driven by one `random.Random` so a run replays.

Each mutator keeps most of a real PDU intact and breaks one thing, which is how decoders are
reached past their first length check: random bytes mostly die at the magic number, while a
real SMB2 CREATE with one lying NameLength reaches the code that trusts it.
"""

from __future__ import annotations

import random
import struct
from typing import Callable, Sequence

# Values at the edges of the integer types a wire decoder reads (0, 1, sign bits, all ones).
INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF)
INTERESTING_16 = (0x0000, 0x0001, 0x7FFF, 0x8000, 0xFFFF, 0x0010, 0x0040, 0x1000)
INTERESTING_32 = (0x00000000, 0x00000001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x00010000, 0x0000FFFF)

Mutator = Callable[[random.Random, bytes, Sequence[bytes]], bytes]


def bit_flip(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4))):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def byte_set(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    if not data:
        return bytes([rng.choice(INTERESTING_8)])
    buf = bytearray(data)
    buf[rng.randrange(len(buf))] = rng.choice(INTERESTING_8) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(buf)


def insert_bytes(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    at = rng.randrange(len(data) + 1)
    n = rng.choice((1, 1, 2, 4, 8, 16, 64))
    blob = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
    return data[:at] + blob + data[at:]


def delete_bytes(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    n = rng.choice((1, 1, 2, 4, 8, 16))
    return data[:at] + data[at + n:]


def truncate(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    if not data:
        return data
    return data[:rng.randrange(len(data))]


def extend(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    n = rng.choice((1, 7, 64, 300))
    return data + bytes(rng.randrange(256) for _ in range(n))


def length_lie(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    """Overwrite an aligned 16- or 32-bit field with a boundary value or a near-truth: lengths,
    offsets and counts sit on such fields in SMB, DCE/RPC, NTLMSSP and NDR alike."""
    if len(data) < 2:
        return extend(rng, data, others)
    buf = bytearray(data)
    wide = len(buf) >= 4 and rng.random() < 0.5
    size = 4 if wide else 2
    at = rng.randrange(0, len(buf) - size + 1)
    at -= at % size
    fmt = rng.choice(("<", ">")) + ("I" if wide else "H")
    if rng.random() < 0.5:
        value = rng.choice(INTERESTING_32 if wide else INTERESTING_16)
    else:
        # Near the truth: the real length of what follows, give or take a little.
        delta = rng.choice((-8, -4, -2, -1, 1, 2, 4, 8, 0x100, 0x10000))
        value = (len(buf) - at + delta) % (1 << (8 * size))
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def splice(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    """The head of this PDU with the tail of another of the same protocol."""
    if not others:
        return bit_flip(rng, data, others)
    other = rng.choice(others)
    cut_a = rng.randrange(len(data) + 1)
    cut_b = rng.randrange(len(other) + 1)
    return data[:cut_a] + other[cut_b:]


def duplicate_chunk(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    if len(data) < 2:
        return data + data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.choice((2, 4, 8, 32)))
    return data[:b] + data[a:b] + data[b:]


def tail_bit_flip(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    """Flip a bit in the last 32 bytes, where auth trailers, verifiers and MICs live."""
    if not data:
        return data
    buf = bytearray(data)
    i = len(buf) - 1 - rng.randrange(min(32, len(buf)))
    buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


MUTATORS: tuple[Mutator, ...] = (bit_flip, bit_flip, byte_set, insert_bytes, delete_bytes, truncate, extend,
                                 length_lie, length_lie, length_lie, splice, duplicate_chunk, tail_bit_flip)


def mutate(rng: random.Random, data: bytes, others: Sequence[bytes] = (), *, max_len: int = 1 << 17) -> bytes:
    """One to three stacked mutations of `data`; never the unmodified input, never huge."""
    out = data
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        out = rng.choice(MUTATORS)(rng, out, others)
    if out == data:
        out = bit_flip(rng, out, others)
    return out[:max_len]
