"""The embedded KB lab's cast as tests name it, where the shared captures live, and the skip
for a peer tool that is not installed."""

from __future__ import annotations

import os
import shutil

import pytest

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "captures")
# Real captures nobody here made, beside the checkout (never copied into the project).
REFERENCE = os.path.join(_SHARED, "reference")
CORPUS = os.path.join(_SHARED, "corpus")


def dn(user: str) -> str:
    return f"/o=Corp/ou=Site/cn=Recipients/cn={user}"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it)")
    return path
