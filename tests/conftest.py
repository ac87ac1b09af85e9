"""Shared fixtures: a running lab on loopback, the KB cast's DNs, and skips for missing peers."""

from __future__ import annotations

import pytest

from emulator.lab import Lab
from harness.cast import REFERENCE, dn, need_tool  # noqa: F401  (the names tests import)

@pytest.fixture(scope="module")
def lab():
    """One default KB lab per test module, on ephemeral loopback ports."""
    with Lab() as running:
        yield running


@pytest.fixture
def fresh_lab():
    with Lab() as running:
        yield running
