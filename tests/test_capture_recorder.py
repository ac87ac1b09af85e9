"""The recorder writes real DCE/RPC exchanges (impacket clients against the sans-IO engines on
loopback) as pcap that tshark decodes cleanly, and is deterministic with an injected clock."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import threading
from typing import Any, Callable

import pytest
from impacket.dcerpc.v5 import rpcrt, transport
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.capture import CaptureWriter, analyse
from emulator.config import default_config_with
from emulator.directory import Directory
from emulator.identity import ANONYMOUS

# impacket encrypts SMB3 whenever a server offers it; these captures are of the clear path
# (reading encrypted captures is the analyser's SMB3 decryption).
CONFIG = default_config_with({"policy": {"smb_encryption": "off"}})
BOB_DN = "/o=Corp/ou=Site/cn=Recipients/cn=bob"
EMSMDB = ("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81")
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


def fake_clock(start: float = 1_764_000_000.0) -> Callable[[], float]:
    ticks = itertools.count()
    return lambda: start + next(ticks) * 0.000125


def _auth():
    from emulator.auth import AuthFactory
    return AuthFactory(Directory(CONFIG), CONFIG.policy, CONFIG.server)


def _rpc_engine(transport_name: str, identity=ANONYMOUS, info: dict | None = None):
    from emulator.interfaces.emsmdb import EmsmdbInterface
    from emulator.rpc.connection import RpcConnection
    return RpcConnection(transport=transport_name, transport_identity=identity,
                         interfaces=[EmsmdbInterface(Directory(CONFIG), CONFIG.policy, CONFIG.server)],
                         auth=_auth(), policy=CONFIG.policy, info=info or {"peer": "test"})


def _smb_engine():
    from emulator.smb.connection import SmbConnection
    from emulator.smb.pipe import PipeFactory
    pipes = PipeFactory({"emsmdb": lambda identity, info: _rpc_engine("ncacn_np", identity, info)})
    return SmbConnection(config=CONFIG, auth=_auth(), pipes=pipes, info={"transport": "ncacn_np"})


class RecordingServer:
    """Loopback server feeding a sans-IO engine and recording every byte both ways, the way the
    live listener does. `capture_port` is the server port written into the capture."""

    def __init__(self, writer: CaptureWriter, engine_factory: Callable[[], Any], capture_port: int) -> None:
        self.writer, self.factory, self.capture_port = writer, engine_factory, capture_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, peer = self.sock.accept()
        engine = self.factory()
        stream = self.writer.stream(("10.0.0.10", peer[1]), ("10.0.0.20", self.capture_port))
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                stream.client_data(data)
                out = engine.receive(data)
                if out.data:
                    stream.server_data(out.data)
                    client.sendall(out.data)
                if out.close:
                    break
        except OSError:
            pass
        finally:
            stream.close()
            client.close()
            self.sock.close()
            self.done.set()


def record_tcp_path(path: str, user: str = "bob", level: int = rpcrt.RPC_C_AUTHN_LEVEL_CONNECT) -> int | None:
    """bob types his password; the client binds EMSMDB over TCP with NTLM and opens his mailbox."""
    from emulator.interfaces.emsmdb import hEcDoConnect
    writer = CaptureWriter(path, clock=fake_clock())
    # The port a real Exchange 5.5 server handed out in mapi.pcap. (6001, the lab default, is
    # in X11's range 6000-6063, which Wireshark decodes as X11 by port.)
    srv = RecordingServer(writer, lambda: _rpc_engine("ncacn_ip_tcp"), 1032)
    t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{srv.port}]")
    t.set_credentials(user, CONFIG.user(user).password, "CORP")
    dce = t.get_dce_rpc()
    dce.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
    dce.set_auth_level(level)
    dce.connect()
    dce.bind(uuidtup_to_bin(EMSMDB))
    status = _connect_status(lambda: hEcDoConnect(dce, BOB_DN))
    dce.disconnect()
    srv.done.wait(10)
    writer.close()
    return status


def record_pipe_path(path: str, dialect: str | None = None) -> int | None:
    """alice is logged on; the client opens \\emsmdb over her SMB session and asks for bob's
    mailbox: the bind carries no auth, so the server acts as alice (KB Q146188)."""
    from emulator.interfaces.emsmdb import hEcDoConnect
    writer = CaptureWriter(path, clock=fake_clock())
    srv = RecordingServer(writer, _smb_engine, 445)
    smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=srv.port, preferredDialect=dialect)
    smb.login("alice", CONFIG.user("alice").password, "CORP")
    t = transport.SMBTransport("127.0.0.1", srv.port, r"\emsmdb", smb_connection=smb)
    dce = t.get_dce_rpc()
    dce.connect()
    dce.bind(uuidtup_to_bin(EMSMDB))
    status = _connect_status(lambda: hEcDoConnect(dce, BOB_DN))
    dce.disconnect()
    smb.close()
    srv.done.wait(10)
    writer.close()
    return status


def _connect_status(call: Callable[[], Any]) -> int | None:
    try:
        result = call()
    except Exception as exc:  # DCERPCSessionError carries the MAPISTATUS
        return getattr(exc, "error_code", None)
    if isinstance(result, tuple):
        return result[0]
    return 0


def tshark(path: str, *args: str) -> str:
    out = subprocess.run([TSHARK, "-r", path, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def tshark_fields(path: str, display_filter: str, *fields: str) -> list[list[str]]:
    cmd = ["-Y", display_filter, "-T", "fields"] + [x for f in fields for x in ("-e", f)]
    return [line.split("\t") for line in tshark(path, *cmd).splitlines() if line.strip()]


def assert_clean_for_tshark(path: str) -> None:
    bad = tshark(path, "-Y", "_ws.malformed || _ws.expert.severity >= error")
    assert bad.strip() == "", f"tshark reports malformed or error-level packets:\n{bad}"


# ---------------------------------------------------------------------------------------------


def test_handshake_segments_and_fin(tmp_path):
    path = str(tmp_path / "s.pcap")
    w = CaptureWriter(path, clock=fake_clock(), mss=100)
    s = w.stream(("10.0.0.1", 50000), ("10.0.0.2", 135))
    s.client_data(b"\x05" * 250)
    s.server_data(b"\x06" * 30)
    s.close()
    w.close()
    from emulator.capture.pcapread import parse_tcp, read_packets
    segs = [parse_tcp(p) for p in read_packets(path)]
    flags = [seg.flags for seg in segs]
    assert flags[:3] == [0x02, 0x12, 0x10]  # SYN, SYN-ACK, ACK
    data = [seg for seg in segs if seg.payload]
    assert [len(seg.payload) for seg in data] == [100, 100, 50, 30]
    assert all(len(seg.payload) <= 100 for seg in data)
    assert data[2].flags & 0x08 and not data[0].flags & 0x08  # PSH only on the last segment
    assert data[1].seq == data[0].seq + 100
    assert data[3].ack == data[2].seq + 50  # the server acknowledges everything it got
    assert flags[-3:] == [0x11, 0x11, 0x10]  # FIN/ACK, FIN/ACK, ACK


def test_same_input_and_clock_give_identical_bytes(tmp_path):
    def write(p):
        w = CaptureWriter(p, clock=fake_clock())
        s1 = w.stream(("127.0.0.1", 40000), ("127.0.0.1", 445))
        s2 = w.stream(("127.0.0.1", 40001), ("127.0.0.1", 6001))
        s1.client_data(os.urandom(0) + b"A" * 3000)
        s2.client_data(b"B" * 10)
        s1.server_data(b"C" * 5)
        s2.close()
        s1.close(by="server")
        w.close()
        with open(p, "rb") as f:
            return f.read()

    a, b = write(str(tmp_path / "a.pcap")), write(str(tmp_path / "b.pcap"))
    assert a == b and len(a) > 24


def test_empty_capture_is_a_valid_file(tmp_path):
    path = str(tmp_path / "empty.pcap")
    w = CaptureWriter(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"\xd4\xc3\xb2\xa1"  # flushed global header before any frame
    w.close()


def test_threads_writing_one_file(tmp_path):
    path = str(tmp_path / "t.pcap")
    w = CaptureWriter(path, clock=fake_clock())
    streams = [w.stream(("10.1.0.1", 41000 + i), ("10.1.0.2", 6001)) for i in range(4)]

    def talk(s, n):
        for _ in range(20):
            s.client_data(bytes([n]) * 50)
            s.server_data(bytes([n]) * 20)
        s.close()

    threads = [threading.Thread(target=talk, args=(s, i)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    from emulator.capture.pcapread import Reassembler, parse_tcp, read_packets
    got: dict[int, bytearray] = {}

    class Sink:
        def __init__(self, st):
            self.st = st

        def data(self, from_a, payload, frame):
            if from_a:
                got.setdefault(self.st.number, bytearray()).extend(payload)

        def gap(self, from_a, frame):
            raise AssertionError("no hole expected")

    r = Reassembler(Sink)
    for p in read_packets(path):
        r.feed(parse_tcp(p))
    assert sorted(bytes(v) for v in got.values()) == sorted(bytes([i]) * 1000 for i in range(4))


@needs_tshark
def test_tcp_path_capture_decodes_cleanly_and_agrees_with_tshark(tmp_path):
    path = str(tmp_path / "tcp.pcap")
    status = record_tcp_path(path)
    assert status == 0
    assert_clean_for_tshark(path)
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username", "dcerpc.auth_level")
    assert users == [["bob", "2"]]
    rows = tshark_fields(path, "dcerpc.pkt_type == 11", "dcerpc.cn_bind_to_uuid")
    assert rows and rows[0][0] == EMSMDB[0]
    conns = analyse(path).connections
    [c] = conns
    assert (c.identity_source, c.user, c.domain, c.auth_level) == ("rpc_ntlm", "bob", "CORP", "connect")
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecSuccess")]


@needs_tshark
def test_pipe_path_capture_decodes_cleanly_and_agrees_with_tshark(tmp_path):
    path = str(tmp_path / "np.pcap")
    status = record_pipe_path(path)
    assert status == 0x3F2  # ecLoginPerm: alice may not open bob's mailbox
    assert_clean_for_tshark(path)
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username")
    names = tshark_fields(path, "smb2.filename", "smb2.filename")
    [c] = analyse(path).connections
    assert [u[0] for u in users] == [c.smb_user] == ["alice"]
    assert c.pipes[0] in {n[0] for n in names}
    assert (c.transport, c.identity_source, c.user) == ("ncacn_np", "smb_session", "alice")
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecLoginPerm")]
    assert c.binds and all(b.auth_type == "none" for b in c.binds)


@needs_tshark
def test_smb1_pipe_path_capture_agrees_with_tshark(tmp_path):
    from impacket.smb import SMB_DIALECT
    path = str(tmp_path / "np1.pcap")
    assert record_pipe_path(path, SMB_DIALECT) == 0x3F2
    assert_clean_for_tshark(path)
    files = {row[0].lstrip("\\") for row in tshark_fields(path, "smb.cmd == 0xa2", "smb.file")}
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username")
    [c] = analyse(path).connections
    assert c.pipes[0] in files and [u[0] for u in users] == ["alice"]
    assert (c.identity_source, c.user, c.smb_user) == ("smb_session", "alice", "alice")
    assert any(e["kind"] == "smb.negotiate" and e["dialect"] == "NT LM 0.12" for e in c.events)
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecLoginPerm")]
