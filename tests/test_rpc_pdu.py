"""The DCE/RPC PDU codec against bytes built by impacket, and against fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from impacket.dcerpc.v5 import rpcrt
from impacket.uuid import uuidtup_to_bin

from emulator.rpc import pdu as P
from emulator.sansio import ProtocolError

IFACE = ("12345678-1234-abcd-ef00-0123456789ab", "1.2")
NDR = ("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0")
NDR64 = ("71710533-beba-4937-8319-b5dbef9ccc36", "1.0")


def impacket_bind(ptype=rpcrt.MSRPC_BIND, transfers=(NDR,), auth: bytes | None = None,
                  call_id=7, level=rpcrt.RPC_C_AUTHN_LEVEL_PKT_INTEGRITY) -> bytes:
    bind = rpcrt.MSRPCBind()
    for i, ts in enumerate(transfers):
        item = rpcrt.CtxItem()
        item["ContextID"] = i
        item["TransItems"] = 1
        item["AbstractSyntax"] = uuidtup_to_bin(IFACE)
        item["TransferSyntax"] = uuidtup_to_bin(ts)
        bind.addCtxItem(item)
    h = rpcrt.MSRPCHeader()
    h["type"] = ptype
    h["pduData"] = bind.getData()
    h["call_id"] = call_id
    if auth is not None:
        trailer = rpcrt.SEC_TRAILER()
        trailer["auth_type"] = rpcrt.RPC_C_AUTHN_WINNT
        trailer["auth_level"] = level
        trailer["auth_ctx_id"] = 79231
        pad = (4 - (len(h.get_packet()) % 4)) % 4
        if pad:
            h["pduData"] += b"\xff" * pad
            trailer["auth_pad_len"] = pad
        h["sec_trailer"] = trailer
        h["auth_data"] = auth
    return h.get_packet()


def impacket_request(stub: bytes, opnum=3, ctx=1, call_id=9, obj: bytes | None = None) -> bytes:
    r = rpcrt.MSRPCRequestHeader()
    r["op_num"] = opnum
    r["ctx_id"] = ctx
    r["call_id"] = call_id
    r["alloc_hint"] = len(stub)
    r["pduData"] = stub
    if obj is not None:
        r["flags"] |= rpcrt.PFC_OBJECT_UUID
        r["uuid"] = obj
    return r.get_packet()


def test_bind_with_two_contexts():
    pdu = P.decode(impacket_bind(transfers=(NDR, NDR64)))
    assert isinstance(pdu, P.Bind) and not isinstance(pdu, P.AlterContext)
    assert pdu.header.call_id == 7 and pdu.header.ptype == P.BIND
    assert pdu.max_xmit_frag == 4280 and pdu.auth is None
    assert [c.as_tuple()[:3] for c in pdu.contexts] == [
        (0, IFACE[0], (1, 2)), (1, IFACE[0], (1, 2))]
    assert pdu.contexts[0].transfer_syntaxes[0] == P.SyntaxId(NDR[0], (2, 0))
    assert pdu.contexts[1].transfer_syntaxes[0] == P.SyntaxId(NDR64[0], (1, 0))


def test_alter_context_with_auth_verifier():
    token = b"NTLMSSP\x00" + b"\x01\x00\x00\x00" + b"x" * 20
    pdu = P.decode(impacket_bind(ptype=rpcrt.MSRPC_ALTERCTX, auth=token))
    assert isinstance(pdu, P.AlterContext)
    assert pdu.auth is not None
    assert (pdu.auth.auth_type, pdu.auth.auth_level, pdu.auth.context_id) == (10, 5, 79231)
    assert pdu.auth.token == token
    assert "NTLMSSP" not in repr(pdu)     # tokens may carry responses: kept out of reprs


def test_request_and_object_uuid():
    pdu = P.decode(impacket_request(b"hello world!"))
    assert isinstance(pdu, P.Request)
    assert (pdu.opnum, pdu.context_id, pdu.alloc_hint, pdu.stub, pdu.object_uuid) == (3, 1, 12, b"hello world!", None)
    obj = uuidtup_to_bin(("11111111-2222-3333-4444-555555555555", "0.0"))[:16]
    pdu = P.decode(impacket_request(b"abcd", obj=obj))
    assert pdu.object_uuid == "11111111-2222-3333-4444-555555555555"
    assert pdu.stub == b"abcd"


def test_bind_ack_roundtrip_through_impacket():
    results = [P.ContextResult(0, 0, P.SyntaxId(*P.NDR32)),
               P.ContextResult(2, 2, P.NULL_SYNTAX),
               P.ContextResult(3, 2, P.NULL_SYNTAX)]
    body = P.bind_ack_body(5840, 5840, 0x1234, "6001", results)
    raw = P.assemble(P.BIND_ACK, 3, 5, body, (10, 6, 1, b"TOKEN"))
    ack = rpcrt.MSRPCBindAck(raw)
    assert ack["SecondaryAddr"].rstrip("\x00") == "6001"
    assert ack["ctx_num"] == 3 and ack["max_rfrag"] == 5840
    assert ack.getCtxItem(2)["Result"] == 2 and ack.getCtxItem(2)["Reason"] == 2
    assert ack["auth_data"] == b"TOKEN"
    ours = P.decode(raw)
    assert isinstance(ours, P.BindAck)
    assert ours.secondary_address == "6001" and ours.results == tuple(results)
    assert ours.auth.token == b"TOKEN"


def test_fault_and_nak_decode():
    raw = P.assemble(P.FAULT, 0x23, 4, P.fault_body(0x1C010002, 1))
    f = P.decode(raw)
    assert isinstance(f, P.Fault) and f.status == 0x1C010002 and f.context_id == 1
    hdr = rpcrt.MSRPCRespHeader(raw)
    assert struct.unpack("<L", raw[24:28])[0] == 0x1C010002 and hdr["call_id"] == 4
    nak = P.decode(P.assemble(P.BIND_NAK, 3, 1, P.bind_nak_body(8)))
    assert isinstance(nak, P.BindNak) and nak.reject_reason == 8 and nak.versions == ((5, 0),)


@pytest.mark.parametrize("ptype,cls", [(16, P.Auth3), (17, P.Shutdown), (18, P.CoCancel), (19, P.Orphaned)])
def test_simple_pdus(ptype, cls):
    assert isinstance(P.decode(P.assemble(ptype, 3, 1, b"    ")), cls)


def test_framebuffer_any_split():
    stream = impacket_bind() + impacket_request(b"x" * 100) + impacket_request(b"")
    fb = P.FrameBuffer()
    frags = []
    for i in range(len(stream)):
        frags += fb.feed(stream[i:i + 1])
    assert [len(f) for f in frags] == [72, 124, 24]
    assert b"".join(frags) == stream and fb.pending == 0


@pytest.mark.parametrize("bad,reason", [
    (b"\x04\x00" + b"\x00" * 14, "version"),
    (b"\x05\x00\x00\x03\x10\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00", "smaller"),
    (b"\x05\x00\x00\x03\x10\x00\x00\x00\xff\xff\x00\x00\x01\x00\x00\x00", "exceeds"),
])
def test_framebuffer_rejects(bad, reason):
    with pytest.raises(ProtocolError) as e:
        P.FrameBuffer(max_fragment_size=4096).feed(bad)
    assert reason in e.value.reason


def test_decode_rejects_lies():
    req = bytearray(impacket_request(b"abcdefgh"))
    short = bytes(req[:20])
    with pytest.raises(ProtocolError):
        P.decode(short)
    lying = bytearray(req)
    struct.pack_into("<H", lying, 10, 200)       # auth_length beyond the fragment
    with pytest.raises(ProtocolError, match="overruns"):
        P.decode(bytes(lying))
    unknown = bytearray(req)
    unknown[2] = 42
    with pytest.raises(ProtocolError, match="ptype"):
        P.decode(bytes(unknown))
    # A bind claiming more contexts than it carries.
    bind = bytearray(impacket_bind())
    bind[24] = 9
    with pytest.raises(ProtocolError, match="truncated"):
        P.decode(bytes(bind))
    # auth_pad_length longer than the body.
    signed = bytearray(impacket_bind(auth=b"T" * 16))
    signed[len(signed) - 16 - 8 + 2] = 250
    with pytest.raises(ProtocolError, match="pad"):
        P.decode(bytes(signed))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decode_raises_only_protocol_error(data):
    try:
        P.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 71), st.integers(0, 255), st.integers(1, 8))
def test_mutated_bind_raises_only_protocol_error(pos, value, cut):
    raw = bytearray(impacket_bind(auth=b"N" * 24))
    raw[pos] = value
    for data in (bytes(raw), bytes(raw[:-cut])):
        try:
            P.decode(data)
        except ProtocolError:
            pass
        try:
            P.FrameBuffer(max_fragment_size=4096).feed(data)
        except ProtocolError:
            pass
