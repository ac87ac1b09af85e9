"""Wires one lab together: directory, authentication, interfaces, and the engine factories the
listeners call for each new TCP connection or pipe open.

The identity each engine starts from is decided here and only here: ANONYMOUS for a raw TCP
connection, the SMB session's user for a pipe (handed in by the SMB engine through
PipeFactory). The RPC core then applies the one rule: an authenticated bind replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..config import LabConfig
from ..directory import Directory
from ..identity import ANONYMOUS, Identity
from ..interfaces import EMSMDB_UUID, EPM_UUID, MGMT_UUID, SRVSVC_UUID, default_interfaces
from ..interfaces.emsmdb import EmsmdbInterface
from ..interfaces.epm import Endpoint
from ..auth import AuthFactory
from ..rpc.connection import RpcConnection
from ..smb.connection import SmbConnection
from ..smb.pipe import PipeFactory

if TYPE_CHECKING:
    from ..kerberos.acceptor import KerberosService

EPM_PIPE = "epmapper"
SRVSVC_PIPE = "srvsvc"


class LabServices:
    def __init__(self, config: LabConfig, *, random_bytes: Callable[[int], bytes],
                 now: Callable[[], float], host: str = "127.0.0.1",
                 kerberos: "KerberosService | None" = None) -> None:
        self.config = config
        self.host = host
        self.random_bytes, self.now = random_bytes, now
        self.directory = Directory(config)
        self.auth = AuthFactory(self.directory, config.policy, config.server,
                                random_bytes=random_bytes, now=now, kerberos=kerberos)
        interfaces = default_interfaces(config, self.endpoints, random_bytes=random_bytes)
        self.emsmdb = interfaces[EMSMDB_UUID]
        self.epm = interfaces[EPM_UUID]
        self.srvsvc = interfaces[SRVSVC_UUID]
        # Every endpoint also answers the remote management interface, as an RPC runtime does.
        mgmt = interfaces[MGMT_UUID]
        self._epm_ifaces = [self.epm, mgmt.on_endpoint([self.epm])]
        self._emsmdb_ifaces = [self.emsmdb, mgmt.on_endpoint([self.emsmdb])]
        # Filled in by the lab once listeners are bound (port 0 means "ask the kernel").
        self.bound_ports: dict[str, int] = {}
        self.emsmdb_pipe = config.transports.smb.pipes.get("emsmdb", "emsmdb")
        self.pipes = PipeFactory({
            self.emsmdb_pipe: self._pipe_builder(self._emsmdb_ifaces),
            EPM_PIPE: self._pipe_builder(self._epm_ifaces),
            SRVSVC_PIPE: self._pipe_builder([self.srvsvc, mgmt.on_endpoint([self.srvsvc])]),
        })

    # ------------------------------------------------------------------ endpoint map
    def endpoints(self) -> list[Endpoint]:
        """What the endpoint mapper lists: EMSMDB on both transports first, then the mapper's
        own endpoints and SRVSVC's pipe (Windows and Samba list those too)."""
        out = []
        version = EmsmdbInterface.version
        nb = self.config.server.netbios_name
        if "emsmdb" in self.bound_ports:
            out.append(Endpoint(EMSMDB_UUID, version, "ncacn_ip_tcp", str(self.bound_ports["emsmdb"]),
                                self.host, "Exchange EMSMDB (rpcauth-emulator)"))
        if "smb" in self.bound_ports:
            out.append(Endpoint(EMSMDB_UUID, version, "ncacn_np", f"\\PIPE\\{self.emsmdb_pipe}",
                                nb, "Exchange EMSMDB (rpcauth-emulator)"))
        if "epm" in self.bound_ports:
            out.append(Endpoint(EPM_UUID, self.epm.version, "ncacn_ip_tcp", str(self.bound_ports["epm"]),
                                self.host, "Endpoint mapper"))
        if "smb" in self.bound_ports:
            out.append(Endpoint(EPM_UUID, self.epm.version, "ncacn_np", f"\\PIPE\\{EPM_PIPE}", nb,
                                "Endpoint mapper"))
            out.append(Endpoint(SRVSVC_UUID, self.srvsvc.version, "ncacn_np", f"\\PIPE\\{SRVSVC_PIPE}",
                                nb, "Server service"))
        return out

    # ------------------------------------------------------------------ engine factories
    def _rpc(self, transport: str, identity: Identity, interfaces: list, info: dict[str, Any]) -> RpcConnection:
        return RpcConnection(transport=transport, transport_identity=identity, interfaces=interfaces,
                             auth=self.auth, policy=self.config.policy, info=info,
                             random_bytes=self.random_bytes, now=self.now)

    def _pipe_builder(self, interfaces: list) -> Callable[[Identity, dict[str, Any]], RpcConnection]:
        def build(identity: Identity, info: dict[str, Any]) -> RpcConnection:
            return self._rpc("ncacn_np", identity, interfaces, info)
        return build

    def smb_engine(self, info: dict[str, Any]) -> SmbConnection:
        return SmbConnection(config=self.config, auth=self.auth, pipes=self.pipes, info=info,
                             random_bytes=self.random_bytes, now=self.now)

    def epm_engine(self, info: dict[str, Any]) -> RpcConnection:
        return self._rpc("ncacn_ip_tcp", ANONYMOUS, self._epm_ifaces, info)

    def emsmdb_engine(self, info: dict[str, Any]) -> RpcConnection:
        return self._rpc("ncacn_ip_tcp", ANONYMOUS, self._emsmdb_ifaces, info)
