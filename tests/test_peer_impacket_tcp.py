"""impacket's DCE/RPC client against our EMSMDB and endpoint mapper over ncacn_ip_tcp."""

from __future__ import annotations

import pytest
from impacket.dcerpc.v5 import epm, transport
from impacket.dcerpc.v5.rpcrt import (RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_LEVEL_PKT, RPC_C_AUTHN_LEVEL_PKT_INTEGRITY,
                                      RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_AUTHN_WINNT, DCERPCException)
from impacket.uuid import uuidtup_to_bin

from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect, hEcDoConnectEx, hEcDoDisconnect

from harness.cast import dn

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
LEVEL_NAMES = {2: "connect", 4: "packet", 5: "integrity", 6: "privacy"}
CASES = [("alice", 0), ("bob", 0x3F2), ("carol", 0), ("nobody", 0x3EB)]   # alice may open carol's: a grant


def tcp_dce(lab, user, password, level, *, fragment=None, byte_at_a_time=False):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
    rt.set_credentials(user, password, "CORP")
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(level)
    if fragment:
        dce.set_max_fragment_size(fragment)
    if byte_at_a_time:
        rt.set_max_fragment_size(1)      # impacket then writes one byte per send()
    dce.connect()
    dce.bind(EMSMDB)
    return dce, rt


@pytest.mark.parametrize("call", [hEcDoConnect, hEcDoConnectEx], ids=["EcDoConnect", "EcDoConnectEx"])
@pytest.mark.parametrize("level", [RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_LEVEL_PKT_INTEGRITY,
                                   RPC_C_AUTHN_LEVEL_PKT_PRIVACY], ids=["connect", "integrity", "privacy"])
def test_ntlm_bind_decides_as_the_typed_user(lab, level, call):
    dce, rt = tcp_dce(lab, "alice", lab.password("alice"), level)
    port = rt.get_socket().getsockname()[1]
    try:
        for mailbox, want in CASES:
            status, handle, _ = call(dce, dn(mailbox))
            assert status == want, mailbox
            if status == 0:
                assert hEcDoDisconnect(dce, handle) == 0
    finally:
        dce.disconnect()
    conn = next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")
    connects = lab.records("emsmdb.connect", conn=conn)
    assert [c["status_name"] for c in connects] == ["ecSuccess", "ecLoginPerm", "ecSuccess", "ecUnknownUser"]
    assert {c["acting_user"] for c in connects} == {"CORP\\alice"}
    assert {c["identity_source"] for c in connects} == {"rpc_auth"}
    ident = lab.records("rpc.identity", conn=conn)
    assert ident and ident[-1]["source"] == "rpc_auth" and ident[-1]["user"] == "alice"
    assert ident[-1]["mechanism"] == "ntlm"   # impacket's auth_type 10: raw NTLMSSP


def test_level_packet_without_verifier_counts_as_connect(lab):
    """impacket binds at RPC_C_AUTHN_LEVEL_PKT (4) but sends its requests without a verifier.
    The server serves the call (the policy minimum is connect) and reports the protection the
    call really had, not the level the bind claimed."""
    dce, rt = tcp_dce(lab, "alice", lab.password("alice"), RPC_C_AUTHN_LEVEL_PKT)
    port = rt.get_socket().getsockname()[1]
    assert hEcDoConnect(dce, dn("alice"))[0] == 0
    dce.disconnect()
    conn = next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")
    assert lab.records("rpc.bind", conn=conn)[-1]["auth_level"] == "packet"
    assert lab.records("emsmdb.connect", conn=conn)[-1]["auth_level"] == "connect"


@pytest.mark.parametrize("user, password, reason", [
    ("bob", "not-bobs-password", "wrong_password"),
    ("zed", "whatever", "unknown_user"),
    ("mallory", None, "disabled"),
])
def test_failed_ntlm_grants_nothing(lab, user, password, reason):
    pw = password if password is not None else lab.password(user)
    dce, rt = tcp_dce(lab, user, pw, RPC_C_AUTHN_LEVEL_CONNECT)
    port = rt.get_socket().getsockname()[1]
    with pytest.raises(DCERPCException):
        hEcDoConnect(dce, dn(user if user != "zed" else "bob"))
    conn = next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")
    assert not lab.records("emsmdb.connect", conn=conn)
    auths = lab.records("ntlm.authenticate", conn=conn)
    assert auths and auths[-1]["result"] == reason


@pytest.mark.parametrize("level", [RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, RPC_C_AUTHN_LEVEL_PKT_PRIVACY],
                         ids=["integrity", "privacy"])
def test_tampered_pdu_is_faulted(lab, level):
    dce, rt = tcp_dce(lab, "alice", lab.password("alice"), level)
    port = rt.get_socket().getsockname()[1]
    real_send = rt.send

    def flip_one_stub_byte(data, *a, **kw):
        data = bytearray(data)
        data[30] ^= 0x01             # inside the (signed or sealed) stub, after the 24-byte header
        return real_send(bytes(data), *a, **kw)

    rt.send = flip_one_stub_byte
    with pytest.raises(DCERPCException):
        hEcDoConnect(dce, dn("alice"))
    conn = next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")
    assert not lab.records("emsmdb.connect", conn=conn)
    faults = lab.records("rpc.fault", conn=conn)
    assert faults, "the tampered request must be faulted"


def test_request_split_into_fragments(lab):
    dce, rt = tcp_dce(lab, "bob", lab.password("bob"), RPC_C_AUTHN_LEVEL_PKT_PRIVACY, fragment=24)
    try:
        status, handle, _ = hEcDoConnect(dce, dn("bob"))
        assert status == 0
    finally:
        dce.disconnect()


def test_one_byte_at_a_time(lab):
    dce, rt = tcp_dce(lab, "bob", lab.password("bob"), RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, byte_at_a_time=True)
    try:
        status, _, _ = hEcDoConnectEx(dce, dn("bob"))
        assert status == 0
    finally:
        dce.disconnect()


def test_endpoint_mapper_returns_the_real_emsmdb_port(lab):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['epm']}]")
    dce = rt.get_dce_rpc()
    dce.connect()
    try:
        binding = epm.hept_map("127.0.0.1", EMSMDB, protocol="ncacn_ip_tcp", dce=dce)
    finally:
        dce.disconnect()
    assert binding.endswith(f"[{lab.ports['emsmdb']}]")


def test_endpoint_mapper_lookup_lists_both_transports(lab):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['epm']}]")
    dce = rt.get_dce_rpc()
    dce.connect()
    try:
        entries = epm.hept_lookup(None, dce=dce)
    finally:
        dce.disconnect()
    bindings = {epm.PrintStringBinding(e["tower"]["Floors"]) for e in entries}
    assert f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]" in bindings
    assert any(b.startswith("ncacn_np:") and b.lower().endswith("[\\pipe\\emsmdb]") for b in bindings)
