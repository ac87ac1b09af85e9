"""Shared fixtures: a running lab on loopback. Shared helpers live in tests/harness/."""

from __future__ import annotations

import pytest

from emulator.lab import Lab


@pytest.fixture(scope="module")
def lab():
    """One default KB lab per test module, on ephemeral loopback ports."""
    with Lab() as running:
        yield running


@pytest.fixture
def fresh_lab():
    with Lab() as running:
        yield running


@pytest.fixture(scope="module")
def krb_lab():
    """A lab with its own MIT realm and KDC (skips with a reason when MIT Kerberos is absent)."""
    from harness.kerberos import start_kerberos_lab

    lab = start_kerberos_lab()
    yield lab
    lab.stop()
