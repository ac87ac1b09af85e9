"""Shared set-up for the fuzz test modules: seeds recorded once, targets built once."""

from __future__ import annotations

import functools
import tempfile

from seeds import cached_seeds
from targets import build_targets

# The CI campaign: about 20,000 inputs with the property tests and the live batches.
CI_SANS_IO_INPUTS = 17_000
CI_LIVE_INPUTS = 300
CI_SEED = 20260101


@functools.lru_cache(maxsize=1)
def cached_targets() -> dict:
    return build_targets(cached_seeds(), tempfile.mkdtemp(prefix="rpcauth-fuzz-"))
