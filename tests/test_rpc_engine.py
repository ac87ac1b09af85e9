"""The DCE/RPC connection engine served on a real loopback socket to impacket's client stack
(and fed crafted bytes directly, since it is sans-IO)."""

from __future__ import annotations

import dataclasses
import socket
import struct

import pytest
from impacket.dcerpc.v5 import rpcrt, transport
from impacket.dcerpc.v5.rpcrt import DCERPCException
from impacket.uuid import uuidtup_to_bin

from emulator.config import default_config
from emulator.directory import Directory
from emulator.identity import ANONYMOUS, SMB_SESSION, Identity
from emulator.auth import AuthFactory
from emulator.rpc import pdu as P
from emulator.rpc.connection import RpcConnection
from emulator.auth.context import SecurityContext
from emulator.rpc.interface import NCA_S_OP_RNG_ERROR, RpcFault, RpcInterface
from harness.engine_server import EngineServer

ECHO_UUID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
NDR = ("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0")
CONFIG = default_config()
ALICE_PW = CONFIG.user("alice").password
BOB_PW = CONFIG.user("bob").password
MALLORY_PW = CONFIG.user("mallory").password


class EchoInterface(RpcInterface):
    """A test-only interface: echoes, tells who is calling, counts per connection."""
    uuid = ECHO_UUID
    version = (1, 0)
    name = "echo"
    closed: list[dict] = []

    def call(self, opnum, stub, ctx):
        if opnum == 0:
            return stub
        if opnum == 1:
            return f"{ctx.identity.qualified}|{ctx.identity.source}|{ctx.auth_level}".encode()
        if opnum == 2:
            raise ValueError("the stub does not decode")
        if opnum == 3:
            ctx.conn_state["n"] = ctx.conn_state.get("n", 0) + 1
            return bytes([ctx.conn_state["n"]])
        if opnum == 4:
            return bytes(i & 0xFF for i in range(struct.unpack("<I", stub[:4])[0]))
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"opnum {opnum}")

    def connection_closed(self, state):
        EchoInterface.closed.append(dict(state))
        return []


class ExemptInterface(EchoInterface):
    uuid = "e1af8308-5d1f-11c9-91a4-08002b14a0fa"
    version = (3, 0)
    name = "exempt"
    policy_exempt = True


def policy(**min_levels):
    levels = dict(CONFIG.policy.min_auth_level, **min_levels)
    return dataclasses.replace(CONFIG.policy, min_auth_level=levels)


def make_conn(*, transport_name="ncacn_ip_tcp", identity=ANONYMOUS, pol=None, info=None):
    pol = pol or CONFIG.policy
    factory = AuthFactory(Directory(CONFIG), pol, CONFIG.server)
    return RpcConnection(transport=transport_name, transport_identity=identity,
                         interfaces=[EchoInterface(), ExemptInterface()], auth=factory, policy=pol,
                         info=info or {"peer": "test", "local_port": 6001})


def engine_server(byte_at_a_time=False, **conn_kwargs) -> EngineServer:
    """The RPC engine with the echo interfaces on a loopback socket."""
    return EngineServer(lambda: make_conn(**conn_kwargs), byte_at_a_time=byte_at_a_time)


@pytest.fixture
def server():
    s = engine_server()
    yield s
    s.stop()


def dce_for(port, user=None, password="", level=None, auth_type=rpcrt.RPC_C_AUTHN_WINNT, frag=None,
            iface=(ECHO_UUID, "1.0")):
    t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{port}]")
    if user is not None:
        t.set_credentials(user, password, "CORP")
    if frag:
        t.set_max_fragment_size(frag)
    dce = t.get_dce_rpc()
    if level is not None:
        dce.set_auth_type(auth_type)
        dce.set_auth_level(level)
    dce.connect()
    dce.bind(uuidtup_to_bin(iface))
    return dce


def call(dce, opnum, stub=b""):
    dce.call(opnum, stub)
    return dce.recv()


def wait_for(predicate, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# ----------------------------------------------------------------------------- authentication

@pytest.mark.parametrize("level", [2, 4, 5, 6])
def test_ntlm_bind_each_level_acts_as_the_authenticated_user(server, level):
    dce = dce_for(server.port, "bob", BOB_PW, level)
    # impacket sends no verifier at packet level (4): the call's real protection is connect (2).
    seen = 2 if level == 4 else level
    assert call(dce, 1) == f"CORP\\bob|rpc_auth|{seen}".encode()
    payload = bytes(range(256)) * 12          # bigger than one fragment of the response
    assert call(dce, 0, payload) == payload
    big = call(dce, 4, struct.pack("<I", 20000))   # a response in several fragments
    assert big == bytes(i & 0xFF for i in range(20000))
    dce.disconnect()
    bind = server.kinds("rpc.bind", result="ok")
    assert bind and bind[0].get("auth_type") == "ntlm" and bind[0].get("interface") == ECHO_UUID
    assert bind[0].get("peer") == "test"
    ident = server.kinds("rpc.identity")
    assert [(e.get("source"), e.get("user")) for e in ident] == [("rpc_auth", "bob")]
    assert any(e.layer == "ntlm" for e in server.events)     # the acceptor's events are forwarded
    assert len(server.kinds("rpc.request")) == 3


@pytest.mark.parametrize("user,password,reason", [
    ("bob", "not-the-password", "wrong_password"),
    ("nobody", "whatever", "unknown_user"),
    ("mallory", MALLORY_PW, "disabled"),
])
def test_failed_ntlm_grants_nothing(server, user, password, reason):
    dce = dce_for(server.port, user, password, rpcrt.RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)
    with pytest.raises(DCERPCException) as exc:
        call(dce, 1)
    assert "access_denied" in str(exc.value)
    assert wait_for(lambda: server.kinds("rpc.fault"))
    assert [e.get("result") for e in server.kinds("rpc.bind")] == [reason]
    assert server.kinds("rpc.fault")[0].get("status") == "0x00000005"
    assert not server.kinds("rpc.request") and not server.kinds("rpc.identity")


def test_unauthenticated_tcp_bind_below_policy_is_refused(server):
    with pytest.raises(DCERPCException):
        dce_for(server.port)
    assert [e.get("result") for e in server.kinds("rpc.bind")] == ["below_policy"]


def test_policy_exempt_interface_answers_anonymously(server):
    dce = dce_for(server.port, iface=(ExemptInterface.uuid, "3.0"))
    assert call(dce, 1) == b"anonymous|anonymous|1"
    ident = server.kinds("rpc.identity")
    assert ident[0].get("source") == "anonymous" and ident[0].get("user") is None


def test_pipe_keeps_the_smb_identity_unless_the_bind_authenticates():
    alice = Identity("alice", "CORP", SMB_SESSION, "smb_session_setup/NTLMv2")
    s = engine_server(transport_name="ncacn_np", identity=alice, info={"pipe": "emsmdb"})
    try:
        dce = dce_for(s.port)
        assert call(dce, 1) == b"CORP\\alice|smb_session|1"
        dce.disconnect()
        dce = dce_for(s.port, "bob", BOB_PW, rpcrt.RPC_C_AUTHN_LEVEL_CONNECT)
        assert call(dce, 1) == b"CORP\\bob|rpc_auth|2"
        dce.disconnect()
        assert [(e.get("source"), e.get("user")) for e in s.kinds("rpc.identity")] == [
            ("smb_session", "alice"), ("rpc_auth", "bob")]
        assert all(e.get("pipe") == "emsmdb" for e in s.kinds("rpc.bind"))
    finally:
        s.stop()


def test_identity_rule_in_isolation():
    alice = Identity("alice", "CORP", SMB_SESSION)
    assert SecurityContext(alice, "rpc_auth").acting_identity is alice
    assert SecurityContext(ANONYMOUS, "rpc_auth").acting_identity is ANONYMOUS


def test_packet_level_without_verifiers_counts_as_connect():
    """impacket sends no verifier at packet level: fine under a connect minimum, refused
    when the policy asks for packet level."""
    s = engine_server(pol=policy(ncacn_ip_tcp=4))
    try:
        dce = dce_for(s.port, "bob", BOB_PW, rpcrt.RPC_C_AUTHN_LEVEL_PKT)
        with pytest.raises(DCERPCException):
            call(dce, 1)
        assert s.kinds("rpc.fault", reason="below_policy")
    finally:
        s.stop()


# ----------------------------------------------------------------------------- integrity

def tampering(dce, mutate):
    """Let the next request go out with `mutate` applied to its bytes."""
    t = dce.get_rpc_transport()
    original = t.send

    def send(data, forceWriteAndx=0, forceRecv=0):
        if isinstance(data, bytes) and data[2] == P.REQUEST:
            data = mutate(bytearray(data))
            t.send = original
        return original(data, forceWriteAndx=forceWriteAndx, forceRecv=forceRecv)

    t.send = send


@pytest.mark.parametrize("level", [5, 6])
@pytest.mark.parametrize("where", ["stub", "header", "signature"])
def test_tampered_pdu_is_faulted_and_closed(server, level, where):
    dce = dce_for(server.port, "bob", BOB_PW, level)
    assert call(dce, 0, b"first call is fine") == b"first call is fine"

    def flip(b):
        pos = {"stub": 30, "header": 22, "signature": len(b) - 3}[where]
        b[pos] ^= 0x40
        return bytes(b)

    tampering(dce, flip)
    with pytest.raises(DCERPCException):
        call(dce, 0, b"this one was changed on the wire")
    assert wait_for(lambda: server.kinds("rpc.verify"))
    assert server.kinds("rpc.verify")[0].get("result") in ("bad_signature", "bad_seal")
    assert server.kinds("rpc.fault")[0].get("status") == "0x00000721"
    assert len(server.kinds("rpc.request")) == 1


def test_multi_fragment_request_sealed(server):
    dce = dce_for(server.port, "alice", ALICE_PW, 6, frag=200)
    payload = bytes(range(256)) * 20
    assert call(dce, 0, payload) == payload
    assert call(dce, 3) == b"\x01" and call(dce, 3) == b"\x02"


def test_request_over_max_pdu_size_is_a_limit():
    small = dataclasses.replace(CONFIG.policy, min_auth_level={"ncacn_ip_tcp": 1, "ncacn_np": 1},
                                limits=dataclasses.replace(CONFIG.policy.limits, max_pdu_size=3000))
    s = engine_server(pol=small)
    try:
        dce = dce_for(s.port, frag=1000)
        with pytest.raises(Exception):
            call(dce, 0, b"z" * 5000)
        assert wait_for(lambda: s.kinds("limit"))
    finally:
        s.stop()


def test_engine_fed_one_byte_at_a_time():
    s = engine_server(byte_at_a_time=True)
    try:
        dce = dce_for(s.port, "bob", BOB_PW, 6, frag=300)
        payload = b"byte by byte " * 100
        assert call(dce, 0, payload) == payload
        assert call(dce, 1) == b"CORP\\bob|rpc_auth|6"
    finally:
        s.stop()


# ----------------------------------------------------------------------------- faults

def test_interface_faults_and_errors_keep_the_connection(server):
    dce = dce_for(server.port, "bob", BOB_PW, 5)
    with pytest.raises(DCERPCException, match="nca_s_op_rng_error"):
        call(dce, 99)
    with pytest.raises(DCERPCException):
        call(dce, 2)
    assert call(dce, 0, b"still alive") == b"still alive"
    assert [e.get("status") for e in server.kinds("rpc.fault")] == ["0x1c010002", "0x000006f7"]
    assert server.kinds("malformed", reason="interface_error")


def test_conn_state_is_per_connection_and_released(server):
    EchoInterface.closed.clear()
    for _ in range(2):
        dce = dce_for(server.port, "bob", BOB_PW, 2)
        assert call(dce, 3) == b"\x01"
        assert call(dce, 3) == b"\x02"
        dce.disconnect()
    assert wait_for(lambda: len(EchoInterface.closed) == 2)
    assert EchoInterface.closed == [{"n": 2}, {"n": 2}]


# ----------------------------------------------------------------------------- sans-IO cases

def bind_bytes(contexts, auth=None, flags=3, call_id=1, ptype=P.BIND):
    """contexts: [(ctx_id, (uuid, ver), [(uuid, ver), ...])] built with impacket's CtxItem."""
    body = struct.pack("<HHIB3x", 4280, 4280, 0, len(contexts))
    for cid, abstract, transfers in contexts:
        item = rpcrt.CtxItem()
        item["ContextID"] = cid
        item["TransItems"] = len(transfers)
        item["AbstractSyntax"] = uuidtup_to_bin(abstract)
        item["TransferSyntax"] = uuidtup_to_bin(transfers[0])
        body += item.getData() + b"".join(uuidtup_to_bin(t) for t in transfers[1:])
    h = rpcrt.MSRPCHeader()
    h["type"] = ptype
    h["flags"] = flags
    h["call_id"] = call_id
    h["pduData"] = body
    if auth is not None:
        auth_type, level, token = auth
        tr = rpcrt.SEC_TRAILER()
        tr["auth_type"], tr["auth_level"], tr["auth_ctx_id"] = auth_type, level, 1
        h["sec_trailer"] = tr
        h["auth_data"] = token
    return h.get_packet()


def test_bind_context_negotiation():
    conn = make_conn(pol=policy(ncacn_ip_tcp=1))
    out = conn.receive(bind_bytes([
        (0, (ECHO_UUID, "1.0"), [NDR]),
        (1, (ECHO_UUID, "1.0"), [("71710533-beba-4937-8319-b5dbef9ccc36", "1.0")]),
        (2, (ECHO_UUID, "1.0"), [("6cb71c2c-9812-4540-0300-000000000000", "1.0")]),
        (3, ("99999999-9999-9999-9999-999999999999", "1.0"), [NDR]),
        (4, (ECHO_UUID, "2.0"), [NDR]),
    ]))
    ack = P.decode(out.data)
    assert isinstance(ack, P.BindAck) and not out.close
    assert [(r.result, r.reason) for r in ack.results] == [(0, 0), (2, 2), (3, 2), (2, 1), (2, 1)]
    assert ack.results[0].transfer == P.SyntaxId(*P.NDR32)
    assert ack.secondary_address == "6001" and ack.max_xmit_frag == 4280
    assert [e.kind for e in out.events] == ["rpc.bind", "rpc.identity"]


def test_unusable_bind_is_acked_with_every_context_rejected():
    conn = make_conn(pol=policy(ncacn_ip_tcp=1))
    out = conn.receive(bind_bytes([(0, ("99999999-9999-9999-9999-999999999999", "1.0"), [NDR])]))
    ack = P.decode(out.data)
    assert isinstance(ack, P.BindAck) and [(r.result, r.reason) for r in ack.results] == [(2, 1)]
    assert out.events[0].get("result") == "no_usable_context"


def test_pipe_secondary_address():
    conn = make_conn(transport_name="ncacn_np", info={"pipe": "emsmdb"})
    ack = P.decode(conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])])).data)
    assert ack.secondary_address == "\\PIPE\\emsmdb"


@pytest.mark.parametrize("auth_type", [16, 68])
def test_unknown_auth_type_gets_bind_nak(auth_type):
    conn = make_conn()
    out = conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])], auth=(auth_type, 6, b"\x60\x82" + b"k" * 30)))
    nak = P.decode(out.data)
    assert isinstance(nak, P.BindNak) and nak.reject_reason == P.NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED
    assert out.events[-1].get("result") == "unsupported_auth"


def test_second_bind_is_refused():
    conn = make_conn(pol=policy(ncacn_ip_tcp=1))
    assert isinstance(P.decode(conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])])).data), P.BindAck)
    out = conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])], call_id=2))
    assert isinstance(P.decode(out.data), P.BindNak)
    assert out.events[-1].get("result") == "second_bind"


def impacket_request(stub: bytes, opnum=0, ctx=0, call_id=9) -> bytes:
    r = rpcrt.MSRPCRequestHeader()
    r["op_num"], r["ctx_id"], r["call_id"] = opnum, ctx, call_id
    r["alloc_hint"] = len(stub)
    r["pduData"] = stub
    return r.get_packet()


def test_request_before_bind_is_a_protocol_error():
    conn = make_conn()
    out = conn.receive(impacket_request(b"x", ctx=0))
    fault = P.decode(out.data)
    assert isinstance(fault, P.Fault) and fault.status == 0x1C01000B and out.close
    assert conn.receive(b"anything").close


def test_unknown_context_id_faults_without_closing():
    conn = make_conn(pol=policy(ncacn_ip_tcp=1))
    conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])]))
    out = conn.receive(impacket_request(b"x", ctx=7))
    assert P.decode(out.data).status == 0x1C010003 and not out.close


BAD_STREAMS = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "frag_length_tiny": b"\x05\x00\x00\x03\x10\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00",
    "auth_length_overrun": b"\x05\x00\x00\x03\x10\x00\x00\x00\x20\x00\xff\x00\x01\x00\x00\x00" + b"\x00" * 16,
    "unknown_ptype": b"\x05\x00\x2a\x03\x10\x00\x00\x00\x10\x00\x00\x00\x01\x00\x00\x00",
    "bad_minor_version": b"\x05\x07\x0b\x03\x10\x00\x00\x00\x10\x00\x00\x00\x01\x00\x00\x00",
    "truncated_bind": b"\x05\x00\x0b\x03\x10\x00\x00\x00\x14\x00\x00\x00\x01\x00\x00\x00\xb8\x10\xb8\x10",
}


# After a bind the fragment limit is the negotiated max_recv_frag (4280 for impacket's offer).
BAD_STREAMS["frag_length_over_negotiated"] = (
    bind_bytes([(0, (ExemptInterface.uuid, "3.0"), [NDR])])
    + b"\x05\x00\x00\x03\x10\x00\x00\x00\x00\x20\x00\x00\x02\x00\x00\x00" + b"\x00" * 64)


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_malformed_input_closes_and_a_fresh_connection_works(server, name):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(BAD_STREAMS[name])
        received = b""
        while True:              # whatever the server answers, it then closes
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert wait_for(lambda: server.kinds("malformed"))
    dce = dce_for(server.port, "bob", BOB_PW, 5)
    assert call(dce, 0, b"ok") == b"ok"


def test_engine_never_raises_on_random_streams():
    import random
    rng = random.Random(1234)
    good_bind = bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])])
    for _ in range(300):
        conn = make_conn(pol=policy(ncacn_ip_tcp=1))
        stream = bytearray(good_bind + bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])], ptype=P.ALTER_CONTEXT))
        for _ in range(rng.randint(1, 6)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        stream += bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 20)
            out = conn.receive(bytes(stream[pos:pos + n]))
            pos += n
            if out.close:
                assert conn.receive(b"more").close
                break


# ----------------------------------------------------------------------------- scapy's client

def _scapy_echo():
    import uuid

    from scapy.layers.dcerpc import (DceRpcOp, NDRIntField, NDRPacket, find_dcerpc_interface,
                                     register_dcerpc_interface)

    class RpcauthEcho_Request(NDRPacket):
        fields_desc = [NDRIntField("value", 0), NDRIntField("other", 0)]

    class RpcauthEcho_Response(NDRPacket):
        fields_desc = [NDRIntField("value", 0), NDRIntField("status", 0)]

    try:
        return find_dcerpc_interface("rpcauthecho"), RpcauthEcho_Request
    except AttributeError:
        register_dcerpc_interface(name="rpcauthecho", uuid=uuid.UUID(ECHO_UUID), version="1.0",
                                  opnums={0: DceRpcOp(RpcauthEcho_Request, RpcauthEcho_Response)})
        return find_dcerpc_interface("rpcauthecho"), RpcauthEcho_Request


@pytest.mark.parametrize("mech,level", [
    ("ntlm", 2), ("ntlm", 5), ("ntlm", 6), ("spnego", 2), ("spnego", 5), ("spnego", 6),
])
def test_scapy_client(server, mech, level):
    """A second, independent client stack; it also checks our signatures and seals."""
    from scapy.layers.msrpce.rpcclient import DCERPC_Client, DCERPC_Transport
    from scapy.layers.ntlm import NTLMSSP
    from scapy.layers.spnego import SPNEGOSSP

    iface, request = _scapy_echo()
    ntlm = NTLMSSP(UPN="bob@CORP", PASSWORD=BOB_PW)
    ssp = SPNEGOSSP([ntlm]) if mech == "spnego" else ntlm
    client = DCERPC_Client(DCERPC_Transport.NCACN_IP_TCP, ssp=ssp, auth_level=level, verb=False)
    client.connect("127.0.0.1", port=server.port)
    try:
        assert client.bind(iface)
        for value in (1234, 0x7FFF0001):
            resp = client.sr1_req(request(value=value, other=0))
            assert resp is not None and resp.value == value
    finally:
        client.close()
    assert [(e.get("auth_type"), e.get("result")) for e in server.kinds("rpc.bind")] == [(mech, "ok")]
    assert [(e.get("source"), e.get("user")) for e in server.kinds("rpc.identity")] == [("rpc_auth", "bob")]


# ----------------------------------------------------------------------------- alter_context

def ntlm_session(conn, level, user="bob", password=BOB_PW):
    """Run bind + auth3 against the engine with impacket's NTLM message builders."""
    from impacket import ntlm

    neg = ntlm.getNTLMSSPType1("", "", signingRequired=True, use_ntlmv2=True)
    out = conn.receive(bind_bytes([(0, (ECHO_UUID, "1.0"), [NDR])], auth=(10, level, neg.getData())))
    ack = P.decode(out.data)
    assert isinstance(ack, P.BindAck)
    auth, _key = ntlm.getNTLMSSPType3(neg, ack.auth.token, user, password, "CORP", "", "", use_ntlmv2=True)
    h = rpcrt.MSRPCHeader()
    h["type"] = rpcrt.MSRPC_AUTH3
    h["call_id"] = 1
    h["pduData"] = b"    "
    tr = rpcrt.SEC_TRAILER()
    tr["auth_type"], tr["auth_level"], tr["auth_ctx_id"] = 10, level, 1
    h["sec_trailer"] = tr
    h["auth_data"] = auth.getData()
    return conn.receive(h.get_packet())


def test_alter_context_cannot_downgrade_the_security_context():
    conn = make_conn()
    out = ntlm_session(conn, 5)
    assert [e.get("result") for e in out.events if e.kind == "rpc.bind"] == ["ok"]
    out = conn.receive(bind_bytes([(1, (ECHO_UUID, "1.0"), [NDR])], auth=(10, 2, b"\0" * 16), call_id=2,
                                  ptype=P.ALTER_CONTEXT))
    fault = P.decode(out.data)
    assert isinstance(fault, P.Fault) and fault.status == 5
    assert [e.get("result") for e in out.events if e.kind == "rpc.bind"] == ["downgrade"]


def test_alter_context_without_auth_adds_a_context_under_the_same_security():
    conn = make_conn()
    ntlm_session(conn, 2)
    out = conn.receive(bind_bytes([(1, (ExemptInterface.uuid, "3.0"), [NDR])], call_id=2, ptype=P.ALTER_CONTEXT))
    resp = P.decode(out.data)
    assert isinstance(resp, P.AlterContextResp) and resp.results[0].result == 0
    out = conn.receive(impacket_request(b"", opnum=1, ctx=1, call_id=3))
    assert P.decode(out.data).stub == b"CORP\\bob|rpc_auth|2"


def test_auth3_failure_is_reported_with_the_reason_and_nothing_runs():
    conn = make_conn()
    out = ntlm_session(conn, 6, password="wrong")
    assert [e.get("result") for e in out.events if e.kind == "rpc.bind"] == ["wrong_password"]
    assert not [e for e in out.events if e.kind == "rpc.identity"]
    out = conn.receive(impacket_request(b"", opnum=1, ctx=0, call_id=2))
    assert P.decode(out.data).status == 5 and out.close
    assert conn.identity is None
