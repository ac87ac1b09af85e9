"""Seed inputs for the fuzzers: real conversations recorded from real clients against a running
lab, plus the PDUs found in the reference captures.

Every recorded conversation runs against its own seeded lab, so a sans-IO engine built from the
same seed draws the same session ids, tree ids, file ids and challenges: replaying the client's
messages in process reaches the same states the live server reached (MS-SMB2 3.3.5: ids are the
server's choice, so a replay is only meaningful when the server chooses them again the same way).
Those conversations are anonymous (the fuzz lab allows null sessions and unauthenticated binds),
because an NTLMv2 response binds the server's clock, which a replay cannot reproduce.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from emulator.config import AUTH_LEVELS, LabConfig, default_config
from emulator.lab import Lab

REFERENCE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "captures",
                                         "reference"))
RECORD_SEED = 4242
EMSMDB_IFACE = ("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81")


@functools.lru_cache(maxsize=1)
def fuzz_config() -> LabConfig:
    """The default KB lab, opened up so that unauthenticated traffic reaches every decoder.
    Frozen, so one parsed instance serves every replay."""
    base = default_config()
    policy = dataclasses.replace(base.policy, anonymous_allowed=True,
                                 min_auth_level={"ncacn_ip_tcp": AUTH_LEVELS["none"],
                                                 "ncacn_np": AUTH_LEVELS["none"]})
    return dataclasses.replace(base, policy=policy)


@dataclass
class Conversation:
    """The client-to-server messages of one TCP connection, split on the protocol's framing."""
    name: str
    service: str                      # "smb" | "epm" | "emsmdb"
    messages: list[bytes]
    replayable: bool                  # recorded against a seeded lab with no NTLM proof in it
    seed: int = RECORD_SEED


@dataclass
class Seeds:
    conversations: list[Conversation] = field(default_factory=list)
    pcaps: list[bytes] = field(default_factory=list)

    def messages(self, service: str) -> list[bytes]:
        return [m for c in self.conversations if c.service == service for m in c.messages]


# ---------------------------------------------------------------------------------- framing

def split_netbios(stream: bytes) -> list[bytes]:
    """RFC 1002 session messages, each kept with its 4-byte header."""
    out, pos = [], 0
    while pos + 4 <= len(stream):
        length = int.from_bytes(stream[pos + 1:pos + 4], "big")
        out.append(stream[pos:pos + 4 + length])
        pos += 4 + length
    return out


def split_rpc(stream: bytes) -> list[bytes]:
    """Connection-oriented DCE/RPC fragments by frag_length (C706 12.6.3.1)."""
    out, pos = [], 0
    while pos + 16 <= len(stream):
        little = stream[pos + 4] & 0x10
        length = int.from_bytes(stream[pos + 8:pos + 10], "little" if little else "big")
        if length < 16:
            break
        out.append(stream[pos:pos + length])
        pos += length
    return out


def client_streams(pcap: bytes) -> list[tuple[int, bytes]]:
    """(server port, client-to-server bytes) per TCP connection, in capture order."""
    from scapy.layers.inet import TCP
    from scapy.utils import PcapReader
    streams: dict[tuple, bytearray] = {}
    server_port: dict[tuple, int] = {}
    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        f.write(pcap)
        f.flush()
        try:
            reader = PcapReader(f.name)
        except Exception:
            return []
        with reader:
            for pkt in reader:
                if TCP not in pkt:
                    continue
                tcp = pkt[TCP]
                payload = bytes(tcp.payload)
                if not payload:
                    continue
                # The client is the side with the higher (ephemeral) port.
                if tcp.sport > tcp.dport:
                    key = (tcp.sport, tcp.dport)
                    streams.setdefault(key, bytearray()).extend(payload)
                    server_port[key] = tcp.dport
    return [(server_port[k], bytes(v)) for k, v in streams.items()]


# ---------------------------------------------------------------------------------- recording

def _record(name: str, service: str, client, *, replayable: bool, tmp: str) -> tuple[Conversation | None, bytes]:
    path = os.path.join(tmp, f"{name}.pcap")
    config = fuzz_config() if replayable else default_config()
    with Lab(config, capture_file=path, seed=RECORD_SEED) as lab:
        try:
            client(lab)
        except Exception:
            pass          # a client that gives up part way still left real messages behind
    with open(path, "rb") as f:
        pcap = f.read()
    streams = client_streams(pcap)
    if not streams:
        return None, pcap
    _, data = streams[0]
    messages = split_netbios(data) if service == "smb" else split_rpc(data)
    return Conversation(name, service, messages, replayable), pcap


def _smb_pipe_session(dialect: int | None, user: str, password_of, pipe: str, calls) -> callable:
    def run(lab: Lab) -> None:
        from impacket.dcerpc.v5 import transport
        from impacket.smbconnection import SMBConnection
        kwargs = {"preferredDialect": dialect} if dialect is not None else {}
        smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"], timeout=10, **kwargs)
        smb.login(user, password_of(lab), "CORP" if user else "")
        t = transport.SMBTransport("127.0.0.1", lab.ports["smb"], pipe, smb_connection=smb)
        dce = t.get_dce_rpc()
        dce.connect()
        calls(dce)
        dce.disconnect()
        smb.logoff()
    return run


def _emsmdb_calls(dce) -> None:
    from impacket.uuid import uuidtup_to_bin
    from emulator.interfaces.emsmdb import hEcDoConnect, hEcDoConnectEx, hEcDoDisconnect, hEcDummyRpc
    dce.bind(uuidtup_to_bin(EMSMDB_IFACE))
    hEcDummyRpc(dce)
    status, handle, *_ = hEcDoConnect(dce, "/o=Corp/ou=Site/cn=Recipients/cn=alice")
    hEcDoConnectEx(dce, "/o=Corp/ou=Site/cn=Recipients/cn=bob")
    if handle:
        hEcDoDisconnect(dce, handle)


class _AlreadyBound:
    """impacket's hept_* helpers bind on every call; one association binds once (C706 12.4)."""

    def __init__(self, dce) -> None:
        self._dce = dce

    def bind(self, *args, **kwargs) -> None:
        return None

    def request(self, *args, **kwargs):
        return self._dce.request(*args, **kwargs)


def _epm_calls(dce) -> None:
    from impacket.dcerpc.v5 import epm
    from impacket.uuid import uuidtup_to_bin
    dce.bind(epm.MSRPC_UUID_PORTMAP)
    bound = _AlreadyBound(dce)
    epm.hept_map("127.0.0.1", uuidtup_to_bin(EMSMDB_IFACE), protocol="ncacn_ip_tcp", dce=bound)
    epm.hept_map("127.0.0.1", uuidtup_to_bin(EMSMDB_IFACE), protocol="ncacn_np", dce=bound)
    epm.hept_lookup(None, dce=bound)
    epm.hept_lookup(None, ifId=uuidtup_to_bin(EMSMDB_IFACE), dce=bound)


def _tcp(port_name: str, calls, user: str | None = None) -> callable:
    def run(lab: Lab) -> None:
        from impacket.dcerpc.v5 import transport
        from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_AUTHN_WINNT
        t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports[port_name]}]")
        if user:
            t.set_credentials(user, lab.password(user), "CORP")
        dce = t.get_dce_rpc()
        if user:
            dce.set_auth_type(RPC_C_AUTHN_WINNT)
            dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY if user == "bob" else 2)
        dce.connect()
        calls(dce)
        dce.disconnect()
    return run


def _smbclient_list(lab: Lab) -> None:
    tool = shutil.which("smbclient")
    if tool is None:
        return
    subprocess.run([tool, "-L", "//127.0.0.1", "-p", str(lab.ports["smb"]), "-N", "-m", "SMB3"],
                   capture_output=True, timeout=30)


def record_lab_seeds(tmp: str) -> Seeds:
    from impacket.smb import SMB_DIALECT
    from impacket.smb3structs import SMB2_DIALECT_002, SMB2_DIALECT_21, SMB2_DIALECT_311
    anonymous = lambda lab: ""           # noqa: E731 - a null session has no password
    alice = lambda lab: lab.password("alice")  # noqa: E731
    plans = [
        ("smb311_anon_emsmdb", "smb", _smb_pipe_session(SMB2_DIALECT_311, "", anonymous, r"\emsmdb", _emsmdb_calls), True),
        ("smb21_anon_epm", "smb", _smb_pipe_session(SMB2_DIALECT_21, "", anonymous, r"\epmapper", _epm_calls), True),
        ("smb202_anon_emsmdb", "smb", _smb_pipe_session(SMB2_DIALECT_002, "", anonymous, r"\emsmdb", _emsmdb_calls), True),
        ("smb1_anon_emsmdb", "smb", _smb_pipe_session(SMB_DIALECT, "", anonymous, r"\emsmdb", _emsmdb_calls), True),
        ("smb1_alice_emsmdb", "smb", _smb_pipe_session(SMB_DIALECT, "alice", alice, r"\emsmdb", _emsmdb_calls), False),
        ("smb311_alice_emsmdb", "smb", _smb_pipe_session(SMB2_DIALECT_311, "alice", alice, r"\emsmdb", _emsmdb_calls), False),
        ("smbclient_list", "smb", _smbclient_list, True),
        ("tcp_anon_emsmdb", "emsmdb", _tcp("emsmdb", _emsmdb_calls), True),
        ("tcp_anon_epm", "epm", _tcp("epm", _epm_calls), True),
        ("tcp_alice_connect", "emsmdb", _tcp("emsmdb", _emsmdb_calls, "alice"), False),
        ("tcp_bob_privacy", "emsmdb", _tcp("emsmdb", _emsmdb_calls, "bob"), False),
    ]
    seeds = Seeds()
    for name, service, client, replayable in plans:
        conv, pcap = _record(name, service, client, replayable=replayable, tmp=tmp)
        if conv is not None and conv.messages:
            seeds.conversations.append(conv)
            seeds.pcaps.append(pcap)
    return seeds


def reference_seeds() -> Seeds:
    """PDUs from the reference captures (real Windows and Samba traffic), when present."""
    seeds = Seeds()
    if not os.path.isdir(REFERENCE):
        return seeds
    for name in sorted(os.listdir(REFERENCE)):
        if not name.endswith((".pcap", ".pcapng")):
            continue
        with open(os.path.join(REFERENCE, name), "rb") as f:
            pcap = f.read()
        seeds.pcaps.append(pcap)
        for index, (port, data) in enumerate(client_streams(pcap)):
            if port in (139, 445):
                messages, service = split_netbios(data), "smb"
            elif port == 135:
                messages, service = split_rpc(data), "epm"
            else:
                messages, service = split_rpc(data), "emsmdb"
            if messages:
                seeds.conversations.append(Conversation(f"{name}#{index}", service, messages, False))
    return seeds


def all_seeds(tmp: str | None = None) -> Seeds:
    own = tempfile.mkdtemp(prefix="rpcauth-seeds-") if tmp is None else tmp
    try:
        recorded = record_lab_seeds(own)
    finally:
        if tmp is None:
            shutil.rmtree(own, ignore_errors=True)
    ref = reference_seeds()
    return Seeds(recorded.conversations + ref.conversations, recorded.pcaps + ref.pcaps)


@functools.lru_cache(maxsize=1)
def cached_seeds() -> Seeds:
    """One recording per test session, shared by every fuzz test module."""
    return all_seeds()
