"""Randomness and time for the engines, seedable so that `--seed N` replays a run exactly.

Without a seed the server uses the operating system's CSPRNG and the wall clock. With a seed,
challenges, GUIDs and context handles come from a keyed stream and time advances in fixed
steps: every run with the same seed and the same client traffic gives the same server bytes.
A seeded lab is for reproducible captures, never for a listener that real users log on to.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Callable

# 2026-01-01T00:00:00Z: seeded captures start here, so they look like plausible traffic.
SEEDED_EPOCH = 1767225600.0


class SeededBytes:
    """A SHA-256 counter-mode stream: deterministic, and unrelated across different seeds."""

    def __init__(self, seed: int) -> None:
        self._key = hashlib.sha256(b"rpcauth-emulator seed " + str(seed).encode()).digest()
        self._counter = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> bytes:
        out = bytearray()
        with self._lock:
            while len(out) < n:
                out += hashlib.sha256(self._key + self._counter.to_bytes(8, "big")).digest()
                self._counter += 1
        return bytes(out[:n])


class StepClock:
    """A clock that starts at a fixed instant and moves 1 ms per reading."""

    def __init__(self, start: float = SEEDED_EPOCH, step: float = 0.001) -> None:
        self._t = start
        self._step = step
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._t += self._step
            return self._t


def sources(seed: int | None) -> tuple[Callable[[int], bytes], Callable[[], float]]:
    """(random_bytes, now) for a lab: the OS's, or seeded ones."""
    if seed is None:
        return os.urandom, time.time
    return SeededBytes(seed), StepClock()
