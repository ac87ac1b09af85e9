"""The synthetic Exchange client: the KB's binding-order and "Use Network Security" logic on top
of impacket's SMB and DCE/RPC client stack (a code base independent of our server)."""

from .profile import Credentials, Profile
from .runner import ClientReport, run_client

__all__ = ["Credentials", "Profile", "ClientReport", "run_client"]
