"""The contract between the RPC core and the interfaces it serves (EPM, EMSMDB, SRVSVC).

An interface sees only a `CallContext`: whoever the core decided is calling (the identity
rule lives in the core, not here), the auth level the call arrived at, and a per-connection
store for context handles. It returns the NDR response stub or raises `RpcFault`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..events import Event
from ..identity import Identity

# C706 / MS-RPCE 2.2.2.11 fault and reject codes used across the project.
NCA_S_OP_RNG_ERROR = 0x1C010002
NCA_S_UNK_IF = 0x1C010003
NCA_S_PROTO_ERROR = 0x1C01000B
NCA_S_FAULT_NDR = 0x000006F7          # RPC_X_BAD_STUB_DATA, what Windows returns for bad NDR
NCA_S_FAULT_CONTEXT_MISMATCH = 0x1C00001A
NCA_S_FAULT_ACCESS_DENIED = 0x00000005
NCA_S_FAULT_SEC_PKG_ERROR = 0x00000721
NCA_S_FAULT_REMOTE_NO_MEMORY = 0x1C000018


class RpcFault(Exception):
    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"fault 0x{status:08x} {reason}".strip())
        self.status, self.reason = status, reason


@dataclass
class CallContext:
    identity: Identity               # the identity the server acts on, per the core rule
    transport: str                   # "ncacn_ip_tcp" | "ncacn_np"
    auth_type: int                   # 0 none, 10 NTLM, 9 SPNEGO
    auth_level: int                  # 1 none .. 6 privacy (3 is treated as 4)
    conn_state: dict[str, Any]       # per RPC connection: context handles live here
    emit: Callable[[Event], None]    # interfaces report e.g. emsmdb.connect through this
    ndr64: bool = False
    # The byte order of the request's NDR stub, from the PDU's format label (C706 14.1):
    # interfaces convert a big-endian stub before decoding it (interfaces/ndr.py).
    little_endian: bool = True
    # Extra facts the transport knows (peer address, pipe name); informational only.
    info: dict[str, Any] = field(default_factory=dict)


class RpcInterface:
    """Subclass and set `uuid`, `version` and `name`; implement `call`."""

    uuid: str = ""
    version: tuple[int, int] = (0, 0)
    name: str = ""
    # The endpoint mapper must answer before anyone authenticates, so the per-transport
    # minimum auth level of the lab policy does not apply to it.
    policy_exempt: bool = False

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"opnum {opnum}")

    def connection_closed(self, ctx_state: dict[str, Any]) -> list[Event]:
        """Called once when the RPC connection ends, to release context handles."""
        return []
