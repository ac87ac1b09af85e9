"""Shared fixtures: a running lab on loopback, the KB cast's DNs, and skips for missing peers."""

from __future__ import annotations

import os
import shutil

import pytest

from emulator.lab import Lab

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "captures", "reference")


def dn(user: str) -> str:
    return f"/o=Corp/ou=Site/cn=Recipients/cn={user}"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it)")
    return path


@pytest.fixture(scope="module")
def lab():
    """One default KB lab per test module, on ephemeral loopback ports."""
    with Lab() as running:
        yield running


@pytest.fixture
def fresh_lab():
    with Lab() as running:
        yield running
