"""Negative matrix, protected calls and EMSMDB session handles.

impacket's DCE/RPC client signs (level 5) and seals (level 6) real calls; the tests tamper with
the bytes it hands its transport, or replay and reorder them on the same socket. The server must
fault the call, consume nothing at the interface, and log an rpc.verify event (MS-RPCE 3.3.1.5.2,
MS-NLMP 3.4.4: a wrong signature or sequence number fails the verification).
"""

from __future__ import annotations

import pytest
from impacket.dcerpc.v5 import transport
from impacket.dcerpc.v5.rpcrt import (RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_LEVEL_PKT_INTEGRITY,
                                      RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_AUTHN_WINNT, DCERPCException)
from impacket.uuid import uuidtup_to_bin

from emulator.interfaces.emsmdb import (EMSMDB_UUID, EcDoConnect, EcDummyRpc, hEcDoConnect, hEcDoDisconnect,
                                        hEcDummyRpc)

from helpers import (FAULT, Pdu, RawRpc, conn_of, dn, ec_do_connect_stub, granted_connects, wait_closed,
                     wait_records)

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))


def impacket_dce(lab, user: str, level: int):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
    rt.set_credentials(user, lab.password(user), "CORP")
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(level)
    dce.connect()
    dce.bind(EMSMDB)
    return dce, rt, conn_of(lab, rt.get_socket())


def capture_next(rt) -> list[bytes]:
    """Make the transport record what the client sends instead of sending it."""
    captured: list[bytes] = []
    rt.send = lambda data, *a, **kw: captured.append(bytes(data))
    return captured


def read_pdu(rt) -> Pdu | None:
    raw = RawRpc.__new__(RawRpc)
    raw.sock = rt.get_socket()
    return raw.recv_pdu()


def assert_verify_failed(lab, conn: str, result: str) -> None:
    verify = wait_records(lab, "rpc.verify", conn=conn)
    assert verify and verify[-1]["result"] == result
    assert wait_records(lab, "rpc.fault", conn=conn)[-1]["reason"] == result


def send_tampered(rt, dce, call, tamper):
    real_send = rt.send

    def tampered(data, *a, **kw):
        return real_send(tamper(bytearray(data)), *a, **kw)

    rt.send = tampered
    with pytest.raises(DCERPCException):
        call(dce)
    rt.send = real_send


# ---------------------------------------------------------------------- signatures and seals

def test_integrity_signature_tampered(lab):
    dce, rt, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)

    def flip_signature(data):
        data[-3] ^= 0x40          # inside the 16-byte NTLM signature
        return bytes(data)

    send_tampered(rt, dce, lambda d: hEcDoConnect(d, dn("bob")), flip_signature)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert_verify_failed(lab, conn, "bad_signature")
    wait_closed(lab, conn)


def test_integrity_signed_header_tampered(lab):
    """The signature covers the header too (whole-PDU signing): a changed opnum is caught."""
    dce, rt, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)

    def change_opnum(data):
        data[22] = 6               # EcDoConnect (0) -> EcDummyRpc (6)
        return bytes(data)

    send_tampered(rt, dce, lambda d: hEcDoConnect(d, dn("bob")), change_opnum)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert not lab.records("rpc.request", conn=conn)
    assert_verify_failed(lab, conn, "bad_signature")


def test_privacy_signature_tampered(lab):
    dce, rt, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_PKT_PRIVACY)

    def flip_signature(data):
        data[-1] ^= 0x01
        return bytes(data)

    send_tampered(rt, dce, lambda d: hEcDoConnect(d, dn("bob")), flip_signature)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert_verify_failed(lab, conn, "bad_seal")


def test_sealed_stub_with_a_flipped_bit(lab):
    dce, rt, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_PKT_PRIVACY)

    def flip_ciphertext(data):
        data[24 + 8 + 2] ^= 0x01   # a bit of the sealed stub, after header and request prefix
        return bytes(data)

    send_tampered(rt, dce, lambda d: hEcDoConnect(d, dn("bob")), flip_ciphertext)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert_verify_failed(lab, conn, "bad_seal")


def test_signed_request_replayed(lab):
    """A signed EcDummyRpc is answered once; the same bytes again carry a used sequence number."""
    dce, rt, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)
    real_send = rt.send
    sent = capture_next(rt)
    dce.call(EcDummyRpc.opnum, EcDummyRpc())
    rt.send = real_send
    rt.get_socket().sendall(sent[0])
    first = read_pdu(rt)
    assert first is not None and first.ptype != FAULT            # the original call is served
    rt.get_socket().sendall(sent[0])                             # ... and replayed
    replay = read_pdu(rt)
    assert replay is not None and replay.ptype == FAULT
    assert len(lab.records("rpc.request", conn=conn)) == 1
    assert_verify_failed(lab, conn, "bad_signature")


def test_signed_requests_reordered(lab):
    """Two signed calls sent in swapped order: the first to arrive has sequence number 1 where
    the server expects 0."""
    dce, rt, conn = impacket_dce(lab, "alice", RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)
    real_send = rt.send
    sent = capture_next(rt)
    dce.call(EcDummyRpc.opnum, EcDummyRpc())
    dce.call(EcDoConnect.opnum, ec_do_connect_stub(dn("alice")))
    rt.send = real_send
    assert len(sent) == 2
    rt.get_socket().sendall(sent[1] + sent[0])
    answer = read_pdu(rt)
    assert answer is not None and answer.ptype == FAULT
    assert not lab.records("emsmdb.connect", conn=conn)
    assert not lab.records("rpc.request", conn=conn)
    assert_verify_failed(lab, conn, "bad_signature")
    wait_closed(lab, conn)


# ---------------------------------------------------------------------- EMSMDB session handles

def test_emsmdb_handle_from_another_connection(lab):
    owner, _, owner_conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_CONNECT)
    status, handle, _ = hEcDoConnect(owner, dn("bob"))
    assert status == 0 and granted_connects(lab, owner_conn)
    thief, _, conn = impacket_dce(lab, "bob", RPC_C_AUTHN_LEVEL_CONNECT)   # even the same user
    with pytest.raises(DCERPCException, match="context_mismatch"):
        hEcDoDisconnect(thief, handle)
    refused = wait_records(lab, "emsmdb.disconnect", conn=conn)
    assert refused and refused[-1]["result"] == "unknown_handle"
    assert not lab.records("emsmdb.connect", conn=conn)
    # The owner's session was not touched.
    assert hEcDoDisconnect(owner, handle) == 0
    owner.disconnect()
    thief.disconnect()


def test_emsmdb_handle_after_disconnect(lab):
    dce, _, conn = impacket_dce(lab, "alice", RPC_C_AUTHN_LEVEL_CONNECT)
    status, handle, _ = hEcDoConnect(dce, dn("alice"))
    assert status == 0
    assert hEcDoDisconnect(dce, handle) == 0
    with pytest.raises(DCERPCException, match="context_mismatch"):
        hEcDoDisconnect(dce, handle)
    results = [r["result"] for r in lab.records("emsmdb.disconnect", conn=conn)]
    assert results == ["ok", "unknown_handle"]
    assert hEcDummyRpc(dce) == 0            # the connection itself still serves
    dce.disconnect()
