"""Every decoder of the product as a fuzz target: feed it one input, classify what came out.

Outcomes: "ok" (answered normally), "protocol_error" (our typed ProtocolError, a malformed event
or CaptureError/TowerError), "fault" (an RpcFault, an RPC fault PDU, a bind_nak or an NT error
status), "close" (the engine closed the connection). Anything else raises `Crash`: an untyped
exception escaping a decoder or an engine, or an engine's last-line-of-defence event
(`internal_error`, `interface_error`), which means a decoder raised something it should not.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import traceback
from dataclasses import dataclass, field
from typing import Callable

from emulator.auth.context import authenticated_identity
from emulator.capture import analyse
from emulator.capture.pcapread import CaptureError
from emulator.config import default_config
from emulator.determinism import SeededBytes, sources
from emulator.directory import Directory
from emulator.identity import RPC_AUTH, Identity
from emulator.interfaces import emsmdb as E
from emulator.interfaces.epm import EpmInterface, TowerError, parse_tower
from emulator.auth import AuthFactory
from emulator.rpc import pdu as P
from emulator.rpc.interface import CallContext, RpcFault
from emulator.sansio import ProtocolError
from emulator.server.services import LabServices
from emulator.smb import smb1_wire, smb2_wire

import mutators
from seeds import Conversation, Seeds, fuzz_config, split_rpc

OUTCOMES = ("ok", "protocol_error", "fault", "close", "crash")
# Reasons the engines give when their catch-all caught an exception a decoder should not raise.
CRASH_REASONS = frozenset({"internal_error", "interface_error", "interface_close_error", "close_failed"})
NTLMSSP = b"NTLMSSP\x00"
BOUND_PORTS = {"smb": 445, "epm": 135, "emsmdb": 6001}


class Crash(Exception):
    def __init__(self, target: str, data: bytes, detail: str) -> None:
        super().__init__(f"{target}: {detail}")
        self.target, self.data, self.detail = target, data, detail


# ------------------------------------------------------------------------------ classification

def classify_output(out) -> str:
    """Outcome of one engine Output; raises if the engine's catch-all fired."""
    for e in out.events:
        if e.kind == "malformed" and e.fields.get("reason") in CRASH_REASONS:
            raise AssertionError(f"engine caught {e.fields.get('error')} ({e.fields.get('reason')})")
    if out.close:
        return "close"
    if any(e.kind == "malformed" for e in out.events):
        return "protocol_error"
    if any(e.kind == "rpc.fault" or e.fields.get("result") not in (None, "ok") for e in out.events):
        return "fault"
    return "ok"


def _typed(call: Callable[[], object], *typed: type) -> str:
    try:
        call()
    except ProtocolError:
        return "protocol_error"
    except RpcFault:
        return "fault"
    except typed:
        return "protocol_error"
    return "ok"


# ------------------------------------------------------------------------------ target base

@dataclass
class Target:
    """One decoder. `inputs(rng)` yields one mutated input; `run(data)` feeds it and classifies."""
    name: str
    seeds: list[bytes]
    feed: Callable[[bytes], str]
    weight: int = 10                       # share of a campaign
    extra: list[bytes] = field(default_factory=list)   # splice partners beyond the seeds

    def make_input(self, rng: random.Random) -> bytes:
        return mutators.mutate(rng, rng.choice(self.seeds), self.seeds + self.extra)

    def run(self, data: bytes) -> str:
        try:
            return self.feed(data)
        except Exception:
            raise Crash(self.name, data, traceback.format_exc()) from None


# ------------------------------------------------------------------------------ engines

def replay_services(seed: int) -> LabServices:
    """The services of a seeded fuzz lab, drawing exactly what the recording lab drew."""
    rb, now = sources(seed)
    services = LabServices(fuzz_config(), random_bytes=rb, now=now)
    services.bound_ports = dict(BOUND_PORTS)
    return services


def new_engine(conv: Conversation):
    services = replay_services(conv.seed)
    factory = {"smb": services.smb_engine, "epm": services.epm_engine, "emsmdb": services.emsmdb_engine}
    return factory[conv.service]({"peer": "127.0.0.1:40000", "listener": conv.service})


def _frame_netbios(payload: bytes) -> bytes:
    return b"\x00" + min(len(payload), 0xFFFFFF).to_bytes(3, "big") + payload


class StatefulTarget:
    """A recorded conversation replayed into a fresh engine; message k is replaced by a mutated
    one (re-framed so the decoder sees it), then the rest of the conversation follows."""

    def __init__(self, name: str, conversations: list[Conversation], *, reframe: bool) -> None:
        self.name = name
        self.conversations = [c for c in conversations if c.messages]
        self.reframe = reframe
        self.seeds = [m for c in self.conversations for m in c.messages]
        self._pending: tuple[Conversation, int] | None = None

    def make_input(self, rng: random.Random) -> bytes:
        conv = rng.choice(self.conversations)
        k = rng.randrange(len(conv.messages))
        msg = conv.messages[k]
        if self.reframe and conv.service == "smb" and len(msg) > 4:
            body = mutators.mutate(rng, msg[4:], [m[4:] for m in conv.messages])
            mutated = _frame_netbios(body)
        else:
            mutated = mutators.mutate(rng, msg, conv.messages)
        # The input is self-describing, so a saved crasher replays on its own (see encode_case).
        return encode_case(self.conversations.index(conv), k, mutated)

    def run(self, data: bytes) -> str:
        try:
            index, k, mutated = decode_case(data)
            conv = self.conversations[index % len(self.conversations)]
            k %= len(conv.messages)
            engine = new_engine(conv)
            for m in conv.messages[:k]:
                classify_output(engine.receive(m))
            outcome = classify_output(engine.receive(mutated))
            if outcome != "close":
                for m in conv.messages[k + 1:]:
                    if classify_output(engine.receive(m)) == "close":
                        break
            engine.close()
            return outcome
        except Exception:
            raise Crash(self.name, data, traceback.format_exc()) from None


def encode_case(conversation: int, k: int, mutated: bytes) -> bytes:
    return struct.pack("<HH", conversation, k) + mutated


def decode_case(data: bytes) -> tuple[int, int, bytes]:
    if len(data) < 4:
        return 0, 0, data
    conversation, k = struct.unpack_from("<HH", data)
    return conversation, k, data[4:]


def netbios_target(conversations: list[Conversation]) -> Target:
    """NetBIOS framing: a whole client stream, mutated anywhere (framing bytes included), fed to
    SmbConnection.receive in chunks of random sizes, as TCP may deliver it."""
    smb = [c for c in conversations if c.service == "smb" and c.replayable]
    streams = [b"".join(c.messages) for c in smb]

    def feed(data: bytes) -> str:
        engine = new_engine(smb[0])
        rng = random.Random(len(data))
        pos, worst = 0, "ok"
        rank = {o: i for i, o in enumerate(OUTCOMES)}
        while pos < len(data):
            n = rng.choice((1, 3, 4, 5, 64, 1500, 65536))
            outcome = classify_output(engine.receive(data[pos:pos + n]))
            pos += n
            worst = max(worst, outcome, key=rank.__getitem__)
            if outcome == "close":
                break
        engine.close()
        return worst

    return Target("netbios", streams, feed, weight=8)


# ------------------------------------------------------------------------------ wire parsers

SMB2_PARSERS = {
    smb2_wire.NEGOTIATE: smb2_wire.parse_negotiate,
    smb2_wire.SESSION_SETUP: smb2_wire.parse_session_setup,
    smb2_wire.LOGOFF: smb2_wire.parse_simple,
    smb2_wire.TREE_DISCONNECT: smb2_wire.parse_simple,
    smb2_wire.ECHO: smb2_wire.parse_simple,
    smb2_wire.TREE_CONNECT: smb2_wire.parse_tree_connect,
    smb2_wire.CREATE: smb2_wire.parse_create,
    smb2_wire.CLOSE: smb2_wire.parse_close,
    smb2_wire.READ: smb2_wire.parse_read,
    smb2_wire.WRITE: smb2_wire.parse_write,
    smb2_wire.IOCTL: smb2_wire.parse_ioctl,
    smb2_wire.QUERY_INFO: smb2_wire.parse_query_info,
}


def _smb2_wire(data: bytes) -> None:
    for element in smb2_wire.split_compound(data):
        h = smb2_wire.parse_header(element)
        parser = SMB2_PARSERS.get(h.command)
        if parser is None:
            continue
        parsed = parser(element)
        if h.command == smb2_wire.NEGOTIATE:
            for ctx in parsed.contexts:
                if ctx.type == smb2_wire.PREAUTH_INTEGRITY_CAPABILITIES:
                    smb2_wire.parse_preauth_context(ctx.data)
                else:
                    smb2_wire.parse_id_list_context(ctx.data, "fuzz")
        if h.command == smb2_wire.IOCTL and parsed.ctl_code == smb2_wire.FSCTL_VALIDATE_NEGOTIATE_INFO:
            smb2_wire.parse_validate_negotiate(parsed.input)
    smb2_wire.smb1_negotiate_dialects(data)


def _smb1_wire(data: bytes) -> None:
    header = smb1_wire.parse_header(data)
    for block in smb1_wire.parse_chain(data, header.command):
        if block.command == smb1_wire.COM_NEGOTIATE:
            smb1_wire.parse_dialects(block.data)
        if block.data:
            smb1_wire.read_string(data, block.data_offset, block.data_offset + len(block.data), header.unicode)
    smb2_wire.smb1_negotiate_dialects(data)


# ------------------------------------------------------------------------------ authentication

CONFIG = default_config()
DIRECTORY = Directory(CONFIG)
AUTH_SEED = 99
FIXED_NOW = 1.8e9


def auth_factory() -> AuthFactory:
    # The same seed and clock on every input: the challenge never changes, so one AUTHENTICATE
    # computed by impacket stays valid for every fresh acceptor and mutations start from a
    # message that would have succeeded.
    return AuthFactory(DIRECTORY, CONFIG.policy, CONFIG.server, random_bytes=SeededBytes(AUTH_SEED),
                       now=lambda: FIXED_NOW)


def _ntlm_messages(user: str = "bob") -> tuple[bytes, bytes]:
    from impacket import ntlm
    type1 = ntlm.getNTLMSSPType1("WKS01", "CORP", signingRequired=True)
    acceptor = auth_factory().ntlm()
    challenge = acceptor.step(type1.getData()).token
    type3, _ = ntlm.getNTLMSSPType3(type1, challenge, user, CONFIG.user(user).password, "CORP")
    return type1.getData(), type3.getData()


def _spnego_messages() -> tuple[bytes, bytes]:
    from impacket import ntlm
    from impacket.spnego import SPNEGO_NegTokenInit, SPNEGO_NegTokenResp, TypesMech
    type1 = ntlm.getNTLMSSPType1("WKS01", "CORP", signingRequired=True)
    init = SPNEGO_NegTokenInit()
    init["MechTypes"] = [TypesMech["NTLMSSP - Microsoft NTLM Security Support Provider"]]
    init["MechToken"] = type1.getData()
    acceptor = auth_factory().spnego()
    reply = acceptor.step(init.getData()).token
    challenge = SPNEGO_NegTokenResp(reply)["ResponseToken"]
    type3, _ = ntlm.getNTLMSSPType3(type1, challenge, "bob", CONFIG.user("bob").password, "CORP")
    resp = SPNEGO_NegTokenResp()
    resp["ResponseToken"] = type3.getData()
    return init.getData(), resp.getData()


def _step_outcome(result) -> str:
    for e in result.events:
        if e.kind == "malformed":
            return "protocol_error"
    return "ok" if result.ok or not result.complete else "fault"


def ntlm_feed(data: bytes) -> str:
    """Byte 0 picks the stage: mutate the NEGOTIATE, or a valid NEGOTIATE then a mutated
    AUTHENTICATE, or a NEGOTIATE, an AUTHENTICATE and a mutated extra token."""
    stage, token = (data[0] % 2, data[1:]) if data else (0, b"")
    acceptor = auth_factory().ntlm()
    if stage == 1:
        acceptor.step(NTLM_TYPE1)
    outcome = _step_outcome(acceptor.step(token))
    authenticated_identity(acceptor.result, RPC_AUTH)
    if acceptor.complete and acceptor.result is not None and acceptor.result.ok:
        acceptor.verify(b"message", b"\x01" + bytes(15))
    return outcome


def spnego_feed(data: bytes) -> str:
    stage, token = (data[0] % 2, data[1:]) if data else (0, b"")
    acceptor = auth_factory().spnego()
    if stage == 1:
        acceptor.step(SPNEGO_INIT)
    outcome = _step_outcome(acceptor.step(token))
    authenticated_identity(acceptor.result, RPC_AUTH)
    return outcome


NTLM_TYPE1, NTLM_TYPE3 = _ntlm_messages()
SPNEGO_INIT, SPNEGO_RESP = _spnego_messages()


def _embedded_ntlm(seeds: Seeds) -> list[bytes]:
    """NTLMSSP tokens inside recorded and reference traffic (bind verifiers, session setups)."""
    found = []
    for c in seeds.conversations:
        for m in c.messages:
            at = m.find(NTLMSSP)
            if at >= 0:
                found.append(m[at:])
    return found[:64]


# ------------------------------------------------------------------------------ interfaces

ALICE = Identity("alice", "CORP", RPC_AUTH, "rpc_bind/NTLMv2")
ALICE_DN = "/o=Corp/ou=Site/cn=Recipients/cn=alice"


def _emsmdb() -> tuple[E.EmsmdbInterface, dict]:
    iface = E.EmsmdbInterface(DIRECTORY, CONFIG.policy, CONFIG.server, random_bytes=SeededBytes(7))
    return iface, {}


def _ctx(state: dict) -> CallContext:
    return CallContext(identity=ALICE, transport="ncacn_ip_tcp", auth_type=10, auth_level=6,
                       conn_state=state, emit=lambda e: None)


def _connect_stub(cls=E.EcDoConnect) -> bytes:
    req = cls()
    E._fill_connect(req, ALICE_DN, flags=0, con_mod=0, cpid=1252, lcid=1033, client_version=(8, 0, 4013))
    if cls is E.EcDoConnectEx:
        E._set_bytes(req.fields["rgbAuxIn"], b"")
        req["cbAuxIn"] = 0
        req["pcbAuxOut"] = E.MAX_CB_AUX_OUT
    return req.getData()


def emsmdb_seeds() -> list[bytes]:
    """(opnum byte + stub) for every EMSMDB call, built with the context handle a fresh
    interface (seeded the same way each time) really hands out, so mutations start valid."""
    iface, state = _emsmdb()
    resp = E.EcDoConnectResponse()
    resp.fromString(iface.call(E.OP_EC_DO_CONNECT, _connect_stub(), _ctx(state)))
    handle = bytes(resp.fields["pcxh"]["Data"])
    out = [bytes([E.OP_EC_DO_CONNECT]) + _connect_stub(), bytes([E.OP_EC_DUMMY_RPC]),
           bytes([E.OP_EC_DO_CONNECT_EX]) + _connect_stub(E.EcDoConnectEx)]
    disc = E.EcDoDisconnect()
    disc.fields["pcxh"]["Data"] = handle
    out.append(bytes([E.OP_EC_DO_DISCONNECT]) + disc.getData())
    rop = b"\x08\x00\xfe\x00\x00\x00\xff\xff"
    rpc = E.EcDoRpc()
    rpc.fields["pcxh"]["Data"] = handle
    E._set_bytes(rpc.fields["rgb"], rop)
    rpc["pcbOut"] = 0x8000
    rpc["cbIn"] = len(rop)
    out.append(bytes([E.OP_EC_DO_RPC]) + rpc.getData())
    ext2 = E.EcDoRpcExt2()
    ext2.fields["pcxh"]["Data"] = handle
    ext2["pulFlags"] = 0
    E._set_bytes(ext2.fields["rgbIn"], rop)
    ext2["cbIn"] = len(rop)
    ext2["pcbOut"] = 0x8000
    E._set_bytes(ext2.fields["rgbAuxIn"], b"")
    ext2["cbAuxIn"] = 0
    ext2["pcbAuxOut"] = E.MAX_CB_AUX_OUT
    out.append(bytes([E.OP_EC_DO_RPC_EXT2]) + ext2.getData())
    return out


def emsmdb_feed(data: bytes) -> str:
    opnum, stub = (data[0] % 16, data[1:]) if data else (0, b"")
    iface, state = _emsmdb()
    ctx = _ctx(state)
    iface.call(E.OP_EC_DO_CONNECT, CONNECT_STUB, ctx)     # a live handle for the mutated call
    try:
        iface.call(opnum, stub, ctx)
    except RpcFault:
        return "fault"
    finally:
        iface.connection_closed(state)
    return "ok"


CONNECT_STUB = _connect_stub()


def _epm_endpoints():
    return replay_services(1).endpoints()


def epm_feed(data: bytes) -> str:
    opnum, stub = (data[0] % 8, data[1:]) if data else (0, b"")
    iface = EpmInterface(_epm_endpoints)
    state: dict = {}
    try:
        iface.call(opnum, stub, _ctx(state))
    except RpcFault:
        return "fault"
    finally:
        iface.connection_closed(state)
    return "ok"


def _stubs_of(seeds: Seeds, service: str, opnums: set[int] | None = None) -> list[bytes]:
    """(opnum byte + stub) from the unprotected requests of recorded TCP conversations."""
    out = []
    for c in seeds.conversations:
        if c.service != service:
            continue
        for frag in c.messages:
            try:
                pdu = P.decode(frag)
            except ProtocolError:
                continue
            if isinstance(pdu, P.Request) and pdu.auth is None and (opnums is None or pdu.opnum in opnums):
                out.append(bytes([pdu.opnum]) + bytes(pdu.stub))
    return out


def tower_seeds(epm_stubs: list[bytes]) -> list[bytes]:
    from emulator.interfaces.epm import Endpoint, build_tower
    towers = [build_tower(Endpoint(E.EMSMDB_UUID, (0, 81), "ncacn_ip_tcp", "6001", "127.0.0.1")),
              build_tower(Endpoint(E.EMSMDB_UUID, (0, 81), "ncacn_np", "\\PIPE\\emsmdb", "EXCH01"))]
    for stub in epm_stubs:
        # A map request carries its tower after a referent id and a 4-byte length (C706 L).
        at = stub.find(b"\x05\x00\x13\x00")
        if at >= 2:
            towers.append(stub[at - 2:])
    return towers


def tower_feed(data: bytes) -> str:
    return _typed(lambda: parse_tower(data), TowerError)


# ------------------------------------------------------------------------------ pcap reader

def pcap_feed_factory(tmpdir: str) -> Callable[[bytes], str]:
    path = os.path.join(tmpdir, "fuzzed.pcap")

    def feed(data: bytes) -> str:
        with open(path, "wb") as f:
            f.write(data)
        try:
            analyse(path)
        except CaptureError:
            return "protocol_error"
        return "ok"
    return feed


def _pcap_mutate(rng: random.Random, data: bytes, others) -> bytes:
    # Most mutations go into packet bodies; a few into the global and record headers.
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 8))):
        if not out:
            break
        op = rng.random()
        if op < 0.5:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op < 0.7 and len(out) > 40:
            i = rng.randrange(24, len(out) - 4)
            struct.pack_into("<I", out, i, rng.choice(mutators.INTERESTING_32))
        elif op < 0.85:
            del out[rng.randrange(len(out)):]
        else:
            i = rng.randrange(len(out))
            del out[i:i + rng.choice((1, 16, 100))]
    return bytes(out)


# ------------------------------------------------------------------------------ assembly

def build_targets(seeds: Seeds, tmpdir: str) -> dict[str, object]:
    convs = seeds.conversations
    replayable = [c for c in convs if c.replayable]
    smb2_convs = [c for c in replayable if c.service == "smb" and c.messages[0][4:8] == b"\xfeSMB"]
    smb1_convs = [c for c in replayable if c.service == "smb" and c.messages[0][4:8] == b"\xffSMB"
                  and b"SMB 2" not in c.messages[0]]
    smb_payloads = [m[4:] for c in convs if c.service == "smb" for m in c.messages if len(m) > 4]
    smb2_msgs = [m for m in smb_payloads if m[:4] == b"\xfeSMB"]
    smb1_msgs = [m for m in smb_payloads if m[:4] == b"\xffSMB"]
    rpc_frags = [m for c in convs if c.service in ("epm", "emsmdb") for m in c.messages]
    rpc_frags += [m for c in convs if c.service == "smb" for p in c.messages
                  for m in split_rpc(p[p.find(b"\x05\x00"):]) if p.find(b"\x05\x00") >= 0
                  and m[:2] == b"\x05\x00" and m[2] <= 20][:200]
    tcp_convs = [c for c in convs if c.service in ("epm", "emsmdb")]
    epm_stubs = _stubs_of(seeds, "epm") or [b"\x03" + bytes(64)]
    ntlm_seeds = [b"\x00" + NTLM_TYPE1, b"\x01" + NTLM_TYPE3] + [b"\x01" + t for t in _embedded_ntlm(seeds)]
    spnego_seeds = [b"\x00" + SPNEGO_INIT, b"\x01" + SPNEGO_RESP, b"\x00" + NTLM_TYPE1]
    pcap = Target("pcap", [p for p in seeds.pcaps if len(p) < 400_000], pcap_feed_factory(tmpdir), weight=1)
    pcap.make_input = lambda rng, t=pcap: _pcap_mutate(rng, rng.choice(t.seeds), t.seeds)  # type: ignore[method-assign]
    targets: dict[str, object] = {
        "smb2_engine": StatefulTarget("smb2_engine", smb2_convs, reframe=True),
        "smb1_engine": StatefulTarget("smb1_engine", smb1_convs, reframe=True),
        "netbios": netbios_target(convs),
        "smb2_wire": Target("smb2_wire", smb2_msgs, lambda d: _typed(lambda: _smb2_wire(d)), weight=12),
        "smb1_wire": Target("smb1_wire", smb1_msgs, lambda d: _typed(lambda: _smb1_wire(d)), weight=12),
        "rpc_pdu": Target("rpc_pdu", rpc_frags, lambda d: _typed(lambda: P.decode(d)), weight=14),
        "rpc_connection": StatefulTarget("rpc_connection", [dataclasses.replace(c) for c in tcp_convs
                                                            if c.replayable] + _nonreplay(tcp_convs), reframe=False),
        "ntlm": Target("ntlm", ntlm_seeds, ntlm_feed, weight=12),
        "spnego": Target("spnego", spnego_seeds, spnego_feed, weight=10),
        "emsmdb": Target("emsmdb", emsmdb_seeds() + _stubs_of(seeds, "emsmdb"), emsmdb_feed, weight=12),
        "epm": Target("epm", epm_stubs, epm_feed, weight=8),
        "epm_tower": Target("epm_tower", tower_seeds(epm_stubs), tower_feed, weight=6),
        "pcap": pcap,
    }
    return targets


def _nonreplay(convs: list[Conversation]) -> list[Conversation]:
    # NTLM-bound and reference conversations still exercise binds and auth trailers; replayed
    # into a fuzz-lab engine they fail authentication, which is itself a path worth feeding.
    return [c for c in convs if not c.replayable]


WEIGHTS = {"smb2_engine": 10, "smb1_engine": 8, "netbios": 4, "rpc_connection": 10, "pcap": 1}


def weight_of(name: str, target) -> int:
    return WEIGHTS.get(name, getattr(target, "weight", 10))
