"""The hand-written EcDoConnect(Ex)/EcDoDisconnect codec against impacket's NDR of the same calls.

The server decodes and encodes the logon stubs itself (emulator/interfaces/emsmdb_wire.py);
the impacket NDRCALL classes in emsmdb.py remain the client's definition. These tests hold
the two to each other: every response is byte-for-byte impacket's encoding, and every request
stub - Outlook's own from the reference capture, impacket-built ones and mutations of them -
is accepted with the same values, or refused with RpcFault(NCA_S_FAULT_NDR), exactly when
impacket's decoder plus the checks the interface made on its result accept or refuse it.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.interfaces import emsmdb as em
from emulator.interfaces import emsmdb_wire as wire
from emulator.interfaces.ndr import decode_call, dos_string
from emulator.rpc.interface import NCA_S_FAULT_NDR, RpcFault

from harness.captures import mapi_connect_stub_from_pcap

DN = "/o=Corp/ou=Site/cn=Recipients/cn="


# ------------------------------------------------------------------ impacket references

def impacket_decode(stub: bytes, extended: bool):
    """What the interface accepted when it decoded with impacket: decode_call, then the
    string rules of dos_string and the EcDoConnectEx count checks."""
    req = decode_call(em.EcDoConnectEx if extended else em.EcDoConnect, stub)
    user_dn = dos_string(req.fields["szUserDN"], "szUserDN")
    v = req.fields["rgwClientVersion"]
    aux, cb_aux_out = b"", 0
    if extended:
        aux = em._array_bytes(req.fields["rgbAuxIn"])
        if req["cbAuxIn"] != len(aux) or em._conformance(req.fields["rgbAuxIn"]) != len(aux):
            raise RpcFault(NCA_S_FAULT_NDR, "cbAuxIn")
        if req["pcbAuxOut"] > em.MAX_CB_AUX_OUT:
            raise RpcFault(NCA_S_FAULT_NDR, "pcbAuxOut")
        cb_aux_out = req["pcbAuxOut"]
    return (user_dn, (v["Major"], v["Minor"], v["Build"]), req["pulTimeStamp"], aux, cb_aux_out)


def wire_decode(stub: bytes, extended: bool):
    r = wire.decode_connect(stub, extended=extended)
    return (r.user_dn, r.client_version, r.timestamp, r.aux_in, r.cb_aux_out)


def outcome(decoder, stub: bytes, extended: bool):
    try:
        return decoder(stub, extended)
    except RpcFault as fault:
        return ("fault", fault.status)


def impacket_request(extended: bool, user_dn: str, aux: bytes = b"",
                     version: tuple[int, int, int] = (8, 0, 4013)) -> bytes:
    req = em.EcDoConnectEx() if extended else em.EcDoConnect()
    em._fill_connect(req, user_dn, flags=0, con_mod=0, cpid=1252, lcid=1033, client_version=version)
    if extended:
        em._set_bytes(req.fields["rgbAuxIn"], aux)
        req["cbAuxIn"] = len(aux)
        req["pcbAuxOut"] = em.MAX_CB_AUX_OUT
    return req.getData()


def impacket_response(extended: bool, **v) -> bytes:
    resp = em.EcDoConnectExResponse() if extended else em.EcDoConnectResponse()
    resp.fields["pcxh"]["Data"] = v["handle"]
    resp["pcmsPollsMax"], resp["pcRetry"] = v["polls_max"], v["retry"]
    resp["pcmsRetryDelay"], resp["picxr"] = v["retry_delay"], v["icxr"]
    resp["szDNPrefix"] = v["dn_prefix"] + "\x00"
    resp["szDisplayName"] = v["display_name"] + "\x00"
    resp.fields["szDNPrefix"].fields["ReferentID"] = 0x00020000
    resp.fields["szDisplayName"].fields["ReferentID"] = 0x00020004
    for name, triple in (("rgwServerVersion", v["server_version"]), ("rgwBestVersion", v["best_version"])):
        resp.fields[name]["Major"], resp.fields[name]["Minor"], resp.fields[name]["Build"] = triple
    resp["pulTimeStamp"] = v["timestamp"]
    if extended:
        em._set_bytes(resp.fields["rgbAuxOut"], b"")
        resp["pcbAuxOut"] = 0
    resp["ErrorCode"] = v["status"]
    return resp.getData()


# ------------------------------------------------------------------ requests

def test_outlook_stub_from_the_reference_capture_decodes_as_impacket_decodes_it():
    stub = mapi_connect_stub_from_pcap()
    ours = wire_decode(stub, False)
    assert ours == impacket_decode(stub, False)
    assert ours[0].lower().startswith("/o=")


def test_outlook_stub_truncations_are_refused_like_impacket_refuses_them():
    stub = mapi_connect_stub_from_pcap()
    for cut in range(len(stub)):
        mine, theirs = outcome(wire_decode, stub[:cut], False), outcome(impacket_decode, stub[:cut], False)
        assert mine == theirs, cut
        assert mine == ("fault", NCA_S_FAULT_NDR), cut


@pytest.mark.parametrize("extended", [False, True], ids=["EcDoConnect", "EcDoConnectEx"])
@pytest.mark.parametrize("dn_len", [0, 1, 2, 3, 4, 37])
def test_impacket_built_requests_decode_to_the_same_values(extended, dn_len):
    stub = impacket_request(extended, DN[:dn_len], aux=b"\x01\x02\x03"[: dn_len % 4])
    assert wire_decode(stub, extended) == impacket_decode(stub, extended)


def _mutate(rng: random.Random, stub: bytes) -> bytes:
    s = bytearray(stub)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0:
            s = s[:rng.randrange(len(s) + 1)]
        elif op == 1 and s:
            s[rng.randrange(len(s))] = rng.choice([0, 1, 2, 3, 0x10, 0x7F, 0xFF, rng.randrange(256)])
        elif op == 2:
            s += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        elif op == 3 and len(s) > 12:
            at = rng.choice([0, 4, 8, len(s) - 12, len(s) - 8, len(s) - 4])
            s[at:at + 4] = rng.choice([0, 1, 2, 3, 5, 0x1008, 0x1009, 0xFFFFFFFF,
                                       rng.randrange(64)]).to_bytes(4, "little")
        elif op == 4 and s:
            at = rng.randrange(len(s))
            del s[at:at + rng.randrange(1, 5)]
    return bytes(s)


@pytest.mark.parametrize("extended", [False, True], ids=["EcDoConnect", "EcDoConnectEx"])
def test_mutated_requests_get_the_same_verdict_as_impacket(extended):
    rng = random.Random(7 + extended)
    accepted = refused = 0
    for _ in range(3000):
        base = impacket_request(extended, DN + "b" * rng.randrange(9),
                                aux=bytes(rng.randrange(256) for _ in range(rng.randrange(7))))
        stub = _mutate(rng, base)
        mine, theirs = outcome(wire_decode, stub, extended), outcome(impacket_decode, stub, extended)
        assert mine == theirs, stub.hex()
        if mine[0] == "fault":
            assert mine == ("fault", NCA_S_FAULT_NDR)
            refused += 1
        else:
            accepted += 1
    # The mutations must exercise both sides of the verdict, or the comparison proves little.
    assert accepted > 300 and refused > 300


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_arbitrary_bytes_get_the_same_verdict_as_impacket(stub, extended):
    assert outcome(wire_decode, stub, extended) == outcome(impacket_decode, stub, extended)


def test_disconnect_handle_matches_impacket_and_short_stubs_fault():
    handle = bytes(range(20))
    req = em.EcDoDisconnect()
    req.fields["pcxh"]["Data"] = handle
    stub = req.getData()
    assert wire.decode_disconnect(stub) == bytes(decode_call(em.EcDoDisconnect, stub).fields["pcxh"]["Data"])
    assert wire.decode_disconnect(stub + b"\xff") == handle
    for cut in range(20):
        with pytest.raises(RpcFault) as info:
            wire.decode_disconnect(stub[:cut])
        assert info.value.status == NCA_S_FAULT_NDR
        with pytest.raises(RpcFault):
            decode_call(em.EcDoDisconnect, stub[:cut])


def test_oversized_stub_faults():
    with pytest.raises(RpcFault) as info:
        wire.decode_connect(impacket_request(False, DN + "bob") + b"\x00" * 0x48000, extended=False)
    assert info.value.status == NCA_S_FAULT_NDR


# ------------------------------------------------------------------ responses

versions = st.tuples(*[st.integers(0, 0xFFFF)] * 3)
u32 = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=300, deadline=None)
@given(extended=st.booleans(), handle=st.binary(min_size=20, max_size=20), polls_max=u32, retry=u32,
       retry_delay=u32, icxr=st.integers(0, 0xFFFF),
       dn_prefix=st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=40),
       display_name=st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=40),
       server_version=versions, best_version=versions, timestamp=u32, status=u32)
def test_connect_response_is_byte_for_byte_impackets(extended, **values):
    assert wire.encode_connect_response(extended=extended, **values) == impacket_response(extended, **values)


def test_connect_response_decodes_with_the_client_classes():
    data = wire.encode_connect_response(
        extended=True, handle=b"\x00" * 4 + bytes(range(16)), polls_max=60000, retry=6, retry_delay=10000,
        icxr=7, dn_prefix="/O=CORP/OU=SITE/CN=RECIPIENTS/CN=", display_name="Bob",
        server_version=em.SERVER_VERSION, best_version=(8, 0, 4013), timestamp=5, status=0)
    status, handle, name = em._connect_result(em.EcDoConnectExResponse(data))
    assert (status, handle, name) == (0, b"\x00" * 4 + bytes(range(16)), "Bob")


def test_disconnect_response_is_byte_for_byte_impackets():
    for status in (0, 0x80040111):
        resp = em.EcDoDisconnectResponse()
        resp.fields["pcxh"]["Data"] = em.NULL_HANDLE
        resp["ErrorCode"] = status
        assert wire.encode_disconnect_response(status) == resp.getData()
