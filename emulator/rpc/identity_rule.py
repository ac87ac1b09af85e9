"""The rule of KB Q146188, in one place: whose identity the server acts on.

Samba's dcesrv_auth.c and Windows do the same: the transport hands the RPC core the identity it
already established (the SMB session's user on a named pipe, nobody on raw TCP). A bind without
authentication keeps that identity; an authenticated bind replaces it with the identity proven
in the bind. A failed authentication never yields an identity.
"""

from __future__ import annotations

from typing import Any

from ..identity import ANONYMOUS, RPC_AUTH, Identity


def acting_identity(transport_identity: Identity, acceptor: Any | None) -> Identity:
    if acceptor is None:
        return transport_identity
    result = getattr(acceptor, "result", None)
    if result is None or not result.ok:
        return ANONYMOUS
    return acceptor.identity(RPC_AUTH)
