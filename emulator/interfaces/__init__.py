"""The RPC interfaces the emulator serves: EMSMDB (the KB's subject), the endpoint mapper
that points clients at it, SRVSVC for the share-listing tools lab testers run first, and the
remote management interface every RPC runtime answers on every endpoint."""

from __future__ import annotations

import os
from typing import Callable

from ..config import LabConfig
from ..directory import Directory
from ..rpc.interface import RpcInterface
from .emsmdb import EMSMDB_UUID, EmsmdbInterface
from .epm import EPM_UUID, Endpoint, EpmInterface
from .mgmt import MGMT_UUID, MgmtInterface
from .srvsvc import SRVSVC_UUID, SrvsvcInterface

__all__ = ["EMSMDB_UUID", "EPM_UUID", "MGMT_UUID", "SRVSVC_UUID", "Endpoint", "EmsmdbInterface",
           "EpmInterface", "MgmtInterface", "SrvsvcInterface", "default_interfaces"]


def default_interfaces(config: LabConfig, endpoints: Callable[[], list[Endpoint]], *,
                       random_bytes: Callable[[int], bytes] = os.urandom
                       ) -> dict[str, RpcInterface]:
    """One instance of each interface for a lab, keyed by interface UUID. The management
    interface listed here reports every other interface of the lab; each endpoint serves its
    own instance from `MgmtInterface.on_endpoint`, which reports that endpoint's interfaces."""
    ifaces: list[RpcInterface] = [
        EmsmdbInterface(Directory(config), config.policy, config.server, random_bytes=random_bytes),
        EpmInterface(endpoints),
        SrvsvcInterface(config.server),
    ]
    ifaces.append(MgmtInterface(ifaces))
    return {i.uuid: i for i in ifaces}
