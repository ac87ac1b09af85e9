"""SMB engines for tests: stand-in RPC engines behind a pipe, engines and connections built with a
deterministic random source, and one loopback server (EngineServer) feeding SmbConnection.

`FixedReplyEngine` and `EchoRpc` stand in for the RPC layer behind a pipe (they answer each
write with a fixed reply and remember the identity they were built with); `\\srvsvc` can also be
the real DCE/RPC engine, so a real client's RPC runs over the SMB engine under test.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from emulator.auth import AuthFactory
from emulator.config import LabConfig, default_config
from emulator.directory import Directory
from emulator.events import Event
from emulator.identity import Identity
from emulator.rpc.connection import RpcConnection
from emulator.sansio import Output
from emulator.smb.connection import SmbConnection
from emulator.smb.pipe import PipeFactory
from emulator.smb.smb1 import Smb1Engine

from .engine_server import EngineServer

CONFIG = default_config()
ALICE_PW = CONFIG.user("alice").password


class FixedReplyEngine:
    """Answers each write with REPLY and remembers the transport identity it was built with."""

    REPLY = b"\x05\x00\x02\x03" + b"R" * 60
    built: list[tuple[Identity, dict]] = []

    def __init__(self, identity: Identity, info: dict) -> None:
        FixedReplyEngine.built.append((identity, info))
        self.writes: list[bytes] = []

    def receive(self, data: bytes) -> Output:
        self.writes.append(data)
        return Output(self.REPLY, [])

    def close(self) -> list[Event]:
        return []


class EchoRpc:
    """Answers every write with a fixed, recognisable reply and an `rpc.test_write` event."""

    REPLY = b"REPLY:" + bytes(range(200))

    def __init__(self, identity: Identity, info: dict) -> None:
        self.identity, self.info, self.writes = identity, info, []

    def receive(self, data: bytes) -> Output:
        self.writes.append(data)
        return Output(self.REPLY, [Event("rpc", "rpc.test_write", {"size": len(data)})], False)

    def close(self) -> list[Event]:
        return []


def fixed_reply_pipes(auth: AuthFactory | None = None) -> PipeFactory:
    return PipeFactory({"srvsvc": FixedReplyEngine, "emsmdb": FixedReplyEngine})


def echo_and_srvsvc_pipes(config: LabConfig, auth: AuthFactory, echo_engines: list | None = None) -> PipeFactory:
    """`\\echo` (EchoRpc, each collected in `echo_engines`) and the real `\\srvsvc`."""
    from emulator.interfaces.srvsvc import SrvsvcInterface

    def echo(identity: Identity, info: dict) -> EchoRpc:
        e = EchoRpc(identity, info)
        if echo_engines is not None:
            echo_engines.append(e)
        return e

    def srvsvc(identity: Identity, info: dict) -> RpcConnection:
        return RpcConnection(transport="ncacn_np", transport_identity=identity,
                             interfaces=[SrvsvcInterface(config.server)], auth=auth, policy=config.policy,
                             info=info)
    return PipeFactory({"echo": echo, "srvsvc": srvsvc})


def smb_auth(config: LabConfig = CONFIG, **kwargs) -> AuthFactory:
    return AuthFactory(Directory(config), config.policy, config.server, **kwargs)


def smb1_engine(config: LabConfig = CONFIG, seed: int | None = None, echo_engines: list | None = None,
                now=None, pipes: PipeFactory | None = None) -> Smb1Engine:
    """An SMB1 engine alone (no NetBIOS framing), seeded when `seed` is given."""
    rng = random.Random(seed) if seed is not None else None
    kwargs = {}
    if rng is not None:
        kwargs["random_bytes"] = lambda n: bytes(rng.getrandbits(8) for _ in range(n))
    if now is not None:
        kwargs["now"] = now
    auth = smb_auth(config, **kwargs)
    return Smb1Engine(config=config, auth=auth, pipes=pipes or echo_and_srvsvc_pipes(config, auth, echo_engines),
                      info={"transport": "ncacn_np"}, **kwargs)


def smb_connection(config: LabConfig = CONFIG, seed: int = 1,
                   pipes: Callable[[AuthFactory], PipeFactory] = fixed_reply_pipes) -> SmbConnection:
    """An SmbConnection with a deterministic random source and a fixed clock."""
    counter = [seed]

    def det_random(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(counter[0].to_bytes(8, "little")).digest()[:n].ljust(n, b"\x01")

    auth = smb_auth(config)
    return SmbConnection(config=config, auth=auth, pipes=pipes(auth), info={"peer": "test"},
                         random_bytes=det_random, now=lambda: 1.7e9)


class SmbServer(EngineServer):
    """EngineServer feeding a fresh SmbConnection per client, with the pipes `pipes(auth)` gives.
    `echo_engines` collects the EchoRpc engines its `\\echo` pipes were built with."""

    def __init__(self, config: LabConfig = CONFIG,
                 pipes: Callable[[AuthFactory], PipeFactory] | None = None) -> None:
        self.config = config
        self.echo_engines: list[EchoRpc] = []

        def factory() -> SmbConnection:
            auth = smb_auth(config)
            made = pipes(auth) if pipes is not None else echo_and_srvsvc_pipes(config, auth, self.echo_engines)
            return SmbConnection(config=config, auth=auth, pipes=made, info={"transport": "ncacn_np"})
        super().__init__(factory)
