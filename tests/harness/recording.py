"""Recorded exchanges for the capture tests: impacket clients against the sans-IO engines on
loopback, written by the CaptureWriter with an injected clock, so the same run gives the same
bytes. tshark, not our reader, is the truth these captures are checked against."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from typing import Any, Callable

from impacket.dcerpc.v5 import rpcrt, transport
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.auth import AuthFactory
from emulator.capture import CaptureWriter
from emulator.config import default_config_with
from emulator.directory import Directory
from emulator.identity import ANONYMOUS, Identity
from emulator.interfaces.emsmdb import EmsmdbInterface, hEcDoConnect
from emulator.rpc.connection import RpcConnection
from emulator.smb.connection import SmbConnection
from emulator.smb.pipe import PipeFactory

from .engine_server import EngineServer

# impacket encrypts SMB3 whenever a server offers it; these captures are of the clear path
# (reading encrypted captures needs the session's keys).
CONFIG = default_config_with({"policy": {"smb_encryption": "off"}})
BOB_DN = "/o=Corp/ou=Site/cn=Recipients/cn=bob"
EMSMDB = ("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81")
# The port a real Exchange 5.5 server handed out in mapi.pcap. (6001, the lab default, is in
# X11's range 6000-6063, which Wireshark decodes as X11 by port.)
CAPTURED_EMSMDB_PORT = 1032


def fake_clock(start: float = 1_764_000_000.0) -> Callable[[], float]:
    ticks = itertools.count()
    return lambda: start + next(ticks) * 0.000125


def rpc_engine(transport_name: str, identity: Identity = ANONYMOUS,
               info: dict | None = None) -> RpcConnection:
    directory = Directory(CONFIG)
    return RpcConnection(transport=transport_name, transport_identity=identity,
                         interfaces=[EmsmdbInterface(directory, CONFIG.policy, CONFIG.server)],
                         auth=AuthFactory(directory, CONFIG.policy, CONFIG.server),
                         policy=CONFIG.policy, info=info or {"peer": "test"})


def smb_engine() -> SmbConnection:
    pipes = PipeFactory({"emsmdb": lambda identity, info: rpc_engine("ncacn_np", identity, info)})
    return SmbConnection(config=CONFIG, auth=AuthFactory(Directory(CONFIG), CONFIG.policy, CONFIG.server),
                         pipes=pipes, info={"transport": "ncacn_np"})


def connect_status(call: Callable[[], Any]) -> int | None:
    """The MAPI status of an EcDoConnect made through impacket: 0, or the fault's error code."""
    try:
        result = call()
    except rpcrt.DCERPCException as exc:  # DCERPCSessionError carries the MAPISTATUS
        return exc.error_code
    if isinstance(result, tuple):
        return result[0]
    return 0


def record_tcp_path(path: str, user: str = "bob", level: int = rpcrt.RPC_C_AUTHN_LEVEL_CONNECT) -> int | None:
    """bob types his password; the client binds EMSMDB over TCP with NTLM and opens his mailbox."""
    writer = CaptureWriter(path, clock=fake_clock())
    with EngineServer(lambda: rpc_engine("ncacn_ip_tcp"), recorder=writer,
                      capture_server=("10.0.0.20", CAPTURED_EMSMDB_PORT)) as srv:
        t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{srv.port}]")
        t.set_credentials(user, CONFIG.user(user).password, "CORP")
        dce = t.get_dce_rpc()
        dce.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
        dce.set_auth_level(level)
        dce.connect()
        dce.bind(uuidtup_to_bin(EMSMDB))
        status = connect_status(lambda: hEcDoConnect(dce, BOB_DN))
        dce.disconnect()
        srv.wait_served(1)
    writer.close()
    return status


def record_pipe_path(path: str, dialect: str | None = None) -> int | None:
    """alice is logged on; the client opens \\emsmdb over her SMB session and asks for bob's
    mailbox: the bind carries no auth, so the server acts as alice (KB Q146188)."""
    writer = CaptureWriter(path, clock=fake_clock())
    with EngineServer(smb_engine, recorder=writer, capture_server=("10.0.0.20", 445)) as srv:
        smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=srv.port, preferredDialect=dialect)
        smb.login("alice", CONFIG.user("alice").password, "CORP")
        t = transport.SMBTransport("127.0.0.1", srv.port, r"\emsmdb", smb_connection=smb)
        dce = t.get_dce_rpc()
        dce.connect()
        dce.bind(uuidtup_to_bin(EMSMDB))
        status = connect_status(lambda: hEcDoConnect(dce, BOB_DN))
        dce.disconnect()
        smb.close()
        srv.wait_served(1)
    writer.close()
    return status


def tshark(path: str, *args: str) -> str:
    tool = shutil.which("tshark")
    if tool is None:
        raise RuntimeError("tshark is not installed")
    out = subprocess.run([tool, "-r", path, *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"tshark failed: {out.stderr}")
    return out.stdout


def tshark_fields(path: str, display_filter: str, *fields: str) -> list[list[str]]:
    cmd = ["-Y", display_filter, "-T", "fields"] + [x for f in fields for x in ("-e", f)]
    return [line.split("\t") for line in tshark(path, *cmd).splitlines() if line.strip()]


def tshark_problems(path: str) -> str:
    """The packets tshark calls malformed or marks at error level; empty when the file is clean."""
    return tshark(path, "-Y", "_ws.malformed || _ws.expert.severity >= error").strip()
