"""The synthetic Exchange client: the KB's binding-order and "Use Network Security" logic on top
of impacket's SMB and DCE/RPC client stack (a code base independent of our server)."""

from .profile import Credentials, Profile

__all__ = ["Credentials", "Profile", "ClientReport", "run_client"]


def __getattr__(name: str):
    # The runner pulls in impacket's client stack; load it on first use only.
    if name in ("ClientReport", "run_client"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
