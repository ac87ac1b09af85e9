"""The RPC interfaces the emulator serves: EMSMDB (the KB's subject), the endpoint mapper
that points clients at it, and SRVSVC for the share-listing tools lab testers run first."""

from __future__ import annotations

import os
from typing import Callable

from ..config import LabConfig
from ..directory import Directory
from ..rpc.interface import RpcInterface
from .emsmdb import EMSMDB_UUID, EmsmdbInterface
from .epm import EPM_UUID, Endpoint, EpmInterface
from .srvsvc import SRVSVC_UUID, SrvsvcInterface

__all__ = ["EMSMDB_UUID", "EPM_UUID", "SRVSVC_UUID", "Endpoint", "EmsmdbInterface",
           "EpmInterface", "SrvsvcInterface", "default_interfaces"]


def default_interfaces(config: LabConfig, endpoints: Callable[[], list[Endpoint]], *,
                       random_bytes: Callable[[int], bytes] = os.urandom
                       ) -> dict[str, RpcInterface]:
    """One instance of each interface for a lab, keyed by interface UUID."""
    ifaces: list[RpcInterface] = [
        EmsmdbInterface(Directory(config), config.policy, config.server, random_bytes=random_bytes),
        EpmInterface(endpoints),
        SrvsvcInterface(config.server),
    ]
    return {i.uuid: i for i in ifaces}
