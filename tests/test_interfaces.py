"""EMSMDB, endpoint mapper and SRVSVC interfaces, fed request stubs built by impacket and
answered stubs decoded by impacket (and, for EcDoConnect, by Wireshark's mapi dissector)."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from impacket.dcerpc.v5 import epm, srvs
from impacket.uuid import uuidtup_to_bin

from emulator.config import default_config
from emulator.directory import (EC_LOGIN_FAILURE, EC_LOGIN_PERM, EC_NOT_ENCRYPTED, EC_SUCCESS,
                                EC_UNKNOWN_USER, Directory)
from emulator.identity import ANONYMOUS, RPC_AUTH, SMB_SESSION, Identity
from emulator.interfaces import default_interfaces
from emulator.interfaces import emsmdb as em
from emulator.interfaces.epm import (EPM_UUID, EPT_S_NOT_REGISTERED, Endpoint, EpmInterface,
                                     build_tower, parse_tower)
from emulator.interfaces.srvsvc import SrvsvcInterface, server_get_info_level
from emulator.rpc.interface import (NCA_S_FAULT_CONTEXT_MISMATCH, NCA_S_FAULT_NDR,
                                    NCA_S_OP_RNG_ERROR, CallContext, RpcFault)

from harness.captures import mapi_connect_stub_from_pcap

DN = "/o=Corp/ou=Site/cn=Recipients/cn="
ALICE = Identity("alice", "CORP", SMB_SESSION, "smb_session_setup")
BOB = Identity("bob", "CORP", RPC_AUTH, "rpc_bind")
MALLORY = Identity("mallory", "CORP", RPC_AUTH, "rpc_bind")


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture
def config():
    return default_config()


def make_emsmdb(config, seed=1, **policy):
    pol = replace(config.policy, **policy) if policy else config.policy
    return em.EmsmdbInterface(Directory(config), pol, config.server,
                              random_bytes=random.Random(seed).randbytes)


def make_ctx(identity=ALICE, auth_level=1, transport="ncacn_np", state=None):
    events = []
    ctx = CallContext(identity=identity, transport=transport, auth_type=0 if auth_level == 1 else 10,
                      auth_level=auth_level, conn_state={} if state is None else state,
                      emit=events.append)
    return ctx, events


def connect_stub(user_dn, extended=False):
    req = em.EcDoConnectEx() if extended else em.EcDoConnect()
    em._fill_connect(req, user_dn, flags=0, con_mod=0, cpid=1252, lcid=1033,
                     client_version=(5, 3144, 0))
    if extended:
        em._set_bytes(req.fields["rgbAuxIn"], b"")
        req["cbAuxIn"] = 0
        req["pcbAuxOut"] = 0x1008
    return req.getData()


def do_connect(iface, ctx, user_dn, extended=False):
    out = iface.call(10 if extended else 0, connect_stub(user_dn, extended), ctx)
    resp = (em.EcDoConnectExResponse if extended else em.EcDoConnectResponse)(out)
    status, handle, name = em._connect_result(resp)
    return status, handle, name, resp


def disconnect_stub(handle):
    req = em.EcDoDisconnect()
    req.fields["pcxh"]["Data"] = handle
    return req.getData()


# ------------------------------------------------------------------ EcDoConnect(Ex) decisions

@pytest.mark.parametrize("extended", [False, True], ids=["EcDoConnect", "EcDoConnectEx"])
@pytest.mark.parametrize("identity,mailbox,expected", [
    (ALICE, DN + "alice", EC_SUCCESS),
    (ALICE, DN + "bob", EC_LOGIN_PERM),
    (ALICE, DN + "carol", EC_SUCCESS),          # granted
    (ALICE, DN + "nobody", EC_UNKNOWN_USER),
    (ANONYMOUS, DN + "alice", EC_LOGIN_FAILURE),
    (MALLORY, DN + "alice", EC_LOGIN_FAILURE),  # disabled
    (BOB, DN + "bob", EC_SUCCESS),
], ids=["own", "other", "granted", "unknown_dn", "anonymous", "disabled"] + ["bob_own"])
def test_connect_status(config, extended, identity, mailbox, expected):
    iface = make_emsmdb(config)
    ctx, events = make_ctx(identity)
    status, handle, name, _ = do_connect(iface, ctx, mailbox, extended)
    assert status == expected
    handles = ctx.conn_state.get("handles", {})
    if expected == EC_SUCCESS:
        assert handle[:4] == b"\0\0\0\0" and handle != em.NULL_HANDLE
        assert handles[handle] == identity
        assert name == config.mailboxes[[m.dn for m in config.mailboxes].index(mailbox)].owner
    else:
        assert handle == em.NULL_HANDLE and not handles
    ev = events[-1]
    assert ev.kind == "emsmdb.connect"
    assert ev.get("call") == ("EcDoConnectEx" if extended else "EcDoConnect")
    assert ev.get("user_dn") == mailbox
    assert ev.get("acting_user") == identity.qualified
    assert ev.get("identity_source") == identity.source
    assert ev.get("status") == f"0x{expected:08x}"


@pytest.mark.parametrize("extended", [False, True])
def test_encryption_required(config, extended):
    iface = make_emsmdb(config, encryption_required=True)
    ctx, events = make_ctx(ALICE, auth_level=5, transport="ncacn_ip_tcp")
    assert do_connect(iface, ctx, DN + "alice", extended)[0] == EC_NOT_ENCRYPTED
    assert events[-1].get("status_name") == "ecNotEncrypted"
    # ecNotEncrypted comes before the mailbox check, even for a mailbox that is not hers.
    assert do_connect(iface, ctx, DN + "bob", extended)[0] == EC_NOT_ENCRYPTED
    ctx6, _ = make_ctx(ALICE, auth_level=6, transport="ncacn_ip_tcp")
    assert do_connect(iface, ctx6, DN + "alice", extended)[0] == EC_SUCCESS


def test_connect_response_fields(config):
    iface = make_emsmdb(config)
    ctx, _ = make_ctx(BOB)
    status, _, name, resp = do_connect(iface, ctx, DN + "bob", extended=True)
    assert (status, name) == (0, "bob")
    assert resp["szDNPrefix"] == "/O=CORP/OU=SITE/CN=RECIPIENTS/CN=\x00"
    assert resp["pcmsPollsMax"] > 0 and resp["pcRetry"] > 0
    assert resp["pcbAuxOut"] == 0 and resp.fields["rgbAuxOut"]["Data"] in ([], b"")
    v = resp.fields["rgwServerVersion"]
    assert (v["Major"], v["Minor"], v["Build"]) == em.SERVER_VERSION


def test_seeded_handles_are_repeatable_and_distinct(config):
    a, b = make_emsmdb(config, seed=7), make_emsmdb(config, seed=7)
    ctx_a, _ = make_ctx(ALICE)
    ctx_b, _ = make_ctx(ALICE)
    h1 = do_connect(a, ctx_a, DN + "alice")[1]
    h2 = do_connect(a, ctx_a, DN + "alice")[1]
    assert h1 != h2
    assert do_connect(b, ctx_b, DN + "alice")[1] == h1


# ------------------------------------------------------------------ handles

def test_disconnect_once_then_context_mismatch(config):
    iface = make_emsmdb(config)
    ctx, events = make_ctx(ALICE)
    handle = do_connect(iface, ctx, DN + "alice")[1]
    resp = em.EcDoDisconnectResponse(iface.call(1, disconnect_stub(handle), ctx))
    assert resp["ErrorCode"] == 0 and resp.fields["pcxh"]["Data"] == em.NULL_HANDLE
    assert events[-1].kind == "emsmdb.disconnect" and events[-1].get("result") == "ok"
    with pytest.raises(RpcFault) as exc:
        iface.call(1, disconnect_stub(handle), ctx)
    assert exc.value.status == NCA_S_FAULT_CONTEXT_MISMATCH
    assert events[-1].get("result") == "unknown_handle"


def test_handle_from_another_connection_or_identity(config):
    iface = make_emsmdb(config)
    ctx, _ = make_ctx(ALICE)
    handle = do_connect(iface, ctx, DN + "alice")[1]
    other, _ = make_ctx(ALICE)                          # another connection
    with pytest.raises(RpcFault) as exc:
        iface.call(1, disconnect_stub(handle), other)
    assert exc.value.status == NCA_S_FAULT_CONTEXT_MISMATCH
    same_conn_other_user, events = make_ctx(BOB, state=ctx.conn_state)
    with pytest.raises(RpcFault) as exc:
        iface.call(1, disconnect_stub(handle), same_conn_other_user)
    assert exc.value.status == NCA_S_FAULT_CONTEXT_MISMATCH
    assert events[-1].get("result") == "identity_mismatch"
    # The owner can still use it.
    assert em.EcDoDisconnectResponse(iface.call(1, disconnect_stub(handle), ctx))["ErrorCode"] == 0


def test_ecdorpc_and_ext2_need_a_valid_handle(config):
    iface = make_emsmdb(config)
    ctx, events = make_ctx(ALICE)
    handle = do_connect(iface, ctx, DN + "alice")[1]
    rop = b"\xfe\x00\x00\x01" + b"\xa5" * 20

    req = em.EcDoRpc()
    req.fields["pcxh"]["Data"] = handle
    em._set_bytes(req.fields["rgb"], rop, maximum=512)
    req["pcbOut"], req["cbIn"] = len(rop), 512
    resp = em.EcDoRpcResponse(iface.call(2, req.getData(), ctx))
    assert resp["ErrorCode"] == 0 and resp["pcbOut"] == 0
    assert resp.fields["pcxh"]["Data"] == handle
    assert events[-1].kind == "emsmdb.rpc" and events[-1].get("rop_bytes") == len(rop)

    ext = em.EcDoRpcExt2()
    ext.fields["pcxh"]["Data"] = handle
    ext["pulFlags"] = 3
    em._set_bytes(ext.fields["rgbIn"], rop)
    ext["cbIn"], ext["pcbOut"] = len(rop), 0x40000
    em._set_bytes(ext.fields["rgbAuxIn"], b"")
    ext["cbAuxIn"], ext["pcbAuxOut"] = 0, 0x1008
    resp2 = em.EcDoRpcExt2Response(iface.call(11, ext.getData(), ctx))
    assert resp2["ErrorCode"] == 0 and resp2["pcbOut"] == 0 and resp2["pcbAuxOut"] == 0

    iface.call(1, disconnect_stub(handle), ctx)
    for opnum, stub in ((2, req.getData()), (11, ext.getData())):
        with pytest.raises(RpcFault) as exc:
            iface.call(opnum, stub, ctx)
        assert exc.value.status == NCA_S_FAULT_CONTEXT_MISMATCH

    ext["cbIn"] = len(rop) + 1                      # count disagrees with the array
    with pytest.raises(RpcFault) as exc:
        iface.call(11, ext.getData(), ctx)
    assert exc.value.status == NCA_S_FAULT_NDR


def test_dummy_rpc_and_unknown_opnum(config):
    iface = make_emsmdb(config)
    ctx, _ = make_ctx(ALICE)
    assert iface.call(6, b"", ctx) == b"\0\0\0\0"
    with pytest.raises(RpcFault) as exc:
        iface.call(5, b"", ctx)
    assert exc.value.status == NCA_S_OP_RNG_ERROR


def test_connection_closed_releases_handles(config):
    iface = make_emsmdb(config)
    ctx, _ = make_ctx(ALICE)
    do_connect(iface, ctx, DN + "alice")
    do_connect(iface, ctx, DN + "carol")
    released = iface.connection_closed(ctx.conn_state)
    assert [e.kind for e in released] == ["emsmdb.handle_released"]
    assert released[0].get("count") == 2
    assert iface.connection_closed(ctx.conn_state) == []


# ------------------------------------------------------------------ the real Outlook request

def test_real_outlook_ecdoconnect_request_decodes(config):
    stub = mapi_connect_stub_from_pcap()
    assert len(stub) == 104
    iface = make_emsmdb(config)
    ctx, events = make_ctx(BOB, auth_level=2, transport="ncacn_ip_tcp")
    resp = em.EcDoConnectResponse(iface.call(0, stub, ctx))
    assert events[-1].get("user_dn") == "/o=SolutionsIQ/ou=CNAMIS/cn=Recipients/cn=ALEONARD"
    assert resp["ErrorCode"] == EC_UNKNOWN_USER       # not a mailbox of this lab
    # The same bytes through the client-side class: the fields Wireshark shows.
    req = em.EcDoConnect(stub)
    assert req["ulCpid"] == 1252 and req["ulLcidString"] == 1033 and req["ulIcxrLink"] == 0xFFFFFFFF
    assert req.fields["rgwClientVersion"]["Minor"] == 3144
    # Our own encoding of the same request is byte-identical apart from padding.
    ours = connect_stub("/o=SolutionsIQ/ou=CNAMIS/cn=Recipients/cn=ALEONARD")
    assert len(ours) == len(stub)


def _pcap_of_conversation(path: Path, pdus: list[tuple[bool, bytes]]) -> None:
    from scapy.all import IP, TCP, Ether, wrpcap
    seq = {True: 1000, False: 5000}
    frames = []
    for from_client, payload in pdus:
        sport, dport = (50000, 6001) if from_client else (6001, 50000)
        src, dst = ("127.0.0.1", "127.0.0.2") if from_client else ("127.0.0.2", "127.0.0.1")
        frames.append(Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="PA",
                      seq=seq[from_client], ack=seq[not from_client]) / payload)
        seq[from_client] += len(payload)
    wrpcap(str(path), frames)


def _co_pdu(ptype: int, call_id: int, body: bytes) -> bytes:
    # MS-RPCE 2.2.2 / C706 12.6.3.1 common header, little-endian NDR, single fragment.
    return struct.pack("<BBBB4sHHI", 5, 0, ptype, 3, b"\x10\0\0\0", 16 + len(body), 0, call_id) + body


def test_wireshark_decodes_our_ecdoconnect_response(config, tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    iface = make_emsmdb(config)
    ctx, _ = make_ctx(BOB, auth_level=2, transport="ncacn_ip_tcp")
    stub_in = connect_stub(DN + "bob")
    stub_out = iface.call(0, stub_in, ctx)
    abstract = uuidtup_to_bin((em.EMSMDB_UUID, "0.81"))
    ndr = uuidtup_to_bin(("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0"))
    bind = struct.pack("<HHIBxxxHBx", 4280, 4280, 0, 1, 0, 1) + abstract + ndr
    port = b"6001\0"
    ack = struct.pack("<HHIH", 4280, 4280, 0x1234, len(port)) + port
    ack += b"\0" * ((4 - (len(ack) + 16) % 4) % 4)
    ack += struct.pack("<BxxxHH", 1, 0, 0) + ndr
    req = struct.pack("<IHH", len(stub_in), 0, 0) + stub_in
    rsp = struct.pack("<IHBx", len(stub_out), 0, 0) + stub_out
    pcap = tmp_path / "emsmdb.pcap"
    _pcap_of_conversation(pcap, [(True, _co_pdu(11, 1, bind)), (False, _co_pdu(12, 1, ack)),
                                 (True, _co_pdu(0, 2, req)), (False, _co_pdu(2, 2, rsp))])
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", "tcp.port==6001,dcerpc", "-Y", "mapi",
                          "-T", "fields", "-e", "mapi.EcDoConnect.name", "-e", "mapi.EcDoConnect.user",
                          "-e", "mapi.EcDoConnect.org_group", "-e", "mapi.MAPISTATUS_status",
                          "-e", "_ws.malformed"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert len(lines) == 2, out
    assert lines[0][0] == DN + "bob"
    assert lines[1][1] == "bob"
    assert lines[1][2] == "/O=CORP/OU=SITE/CN=RECIPIENTS/CN="
    assert lines[1][3] == "0x00000000"
    assert all(len(line) < 5 or not line[4] for line in lines), out


# ------------------------------------------------------------------ endpoint mapper

ENDPOINTS = [
    Endpoint(em.EMSMDB_UUID, (0, 81), "ncacn_ip_tcp", "6001", "127.0.0.1", "Exchange EMSMDB"),
    Endpoint(em.EMSMDB_UUID, (0, 81), "ncacn_np", "\\PIPE\\emsmdb", "EXCH01", "Exchange EMSMDB"),
    Endpoint(EPM_UUID, (3, 0), "ncacn_ip_tcp", "135", "127.0.0.1", "Endpoint mapper"),
]


def map_stub(iface_uuid, version, protseq, max_towers=4):
    """An ept_map request as impacket's hept_map builds it."""
    tower = epm.EPMTower()
    interface = epm.EPMRPCInterface()
    interface["InterfaceUUID"] = uuidtup_to_bin((iface_uuid, "%d.%d" % version))[:16]
    interface["MajorVersion"], interface["MinorVersion"] = version
    data_rep = epm.EPMRPCDataRepresentation()
    data_rep["DataRepUuid"] = uuidtup_to_bin(("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0"))[:16]
    data_rep["MajorVersion"], data_rep["MinorVersion"] = 2, 0
    proto = epm.EPMProtocolIdentifier()
    proto["ProtIdentifier"] = epm.FLOOR_RPCV5_IDENTIFIER
    if protseq == "ncacn_np":
        a, h = epm.EPMPipeName(), epm.EPMHostName()
        a["PipeName"], h["HostName"] = b"\x00", b"127.0.0.1\x00"
    else:
        a, h = epm.EPMPortAddr(), epm.EPMHostAddr()
        a["IpPort"], h["Ip4addr"] = 0, b"\0\0\0\0"
    tower["NumberOfFloors"] = 5
    tower["Floors"] = interface.getData() + data_rep.getData() + proto.getData() + a.getData() + h.getData()
    req = epm.ept_map()
    req["max_towers"] = max_towers
    req["map_tower"]["tower_length"] = len(tower)
    req["map_tower"]["tower_octet_string"] = tower.getData()
    return req.getData()


@pytest.mark.parametrize("protseq,expected_floor4,expected_binding", [
    ("ncacn_ip_tcp", struct.pack(">H", 6001), "ncacn_ip_tcp:%s[6001]"),
    ("ncacn_np", b"\\PIPE\\emsmdb\x00", "ncacn_np:%s[\\PIPE\\emsmdb]"),
])
def test_ept_map(protseq, expected_floor4, expected_binding):
    iface = EpmInterface(lambda: ENDPOINTS)
    ctx, events = make_ctx(ANONYMOUS, transport="ncacn_ip_tcp")
    resp = epm.ept_mapResponse(iface.call(3, map_stub(em.EMSMDB_UUID, (0, 81), protseq), ctx))
    assert resp["status"] == 0 and resp["num_towers"] == 1
    assert resp.fields["entry_handle"].getData() == b"\0" * 20
    tower = epm.EPMTower(b"".join(resp["ITowers"][0]["Data"]["tower_octet_string"]))
    floors = tower["Floors"]
    assert len(floors) == 5
    assert floors[0]["InterfaceUUID"] == uuidtup_to_bin((em.EMSMDB_UUID, "0.81"))[:16]
    assert floors[3]["RelatedData"] == expected_floor4
    assert epm.PrintStringBinding(floors) == expected_binding % (
        "127.0.0.1" if protseq == "ncacn_ip_tcp" else "EXCH01")
    assert events[-1].kind == "epm.map" and events[-1].get("protseq") == protseq


def test_ept_map_not_registered():
    iface = EpmInterface(lambda: ENDPOINTS[:1])
    ctx, events = make_ctx(ANONYMOUS, transport="ncacn_ip_tcp")
    for stub in (map_stub(em.EMSMDB_UUID, (0, 81), "ncacn_np"),
                 map_stub("12345778-1234-abcd-ef00-0123456789ab", (0, 0), "ncacn_ip_tcp")):
        resp = epm.ept_mapResponse(iface.call(3, stub, ctx))
        assert resp["status"] == EPT_S_NOT_REGISTERED and resp["num_towers"] == 0
        assert events[-1].get("result") == "not_registered"


def lookup(iface, ctx, handle, max_ents):
    req = epm.ept_lookup()
    req["inquiry_type"] = 0
    req["object"] = epm.NULL
    req["Ifid"] = epm.NULL
    req["vers_option"] = 1
    req["entry_handle"] = handle
    req["max_ents"] = max_ents
    return epm.ept_lookupResponse(iface.call(2, req.getData(), ctx))


def test_ept_lookup_enumerates_all_at_once():
    iface = EpmInterface(lambda: ENDPOINTS)
    ctx, _ = make_ctx(ANONYMOUS, transport="ncacn_ip_tcp")
    resp = lookup(iface, ctx, epm.ept_lookup_handle_t(), 500)
    assert resp["status"] == 0 and resp["num_ents"] == 3
    assert resp["entry_handle"].isNull()              # impacket's hept_lookup stops here
    seen = [(b"".join(e["annotation"]).rstrip(b"\0").decode(),
             epm.PrintStringBinding(epm.EPMTower(b"".join(e["tower"]["tower_octet_string"]))["Floors"]))
            for e in resp["entries"]]
    assert seen == [("Exchange EMSMDB", "ncacn_ip_tcp:127.0.0.1[6001]"),
                    ("Exchange EMSMDB", "ncacn_np:EXCH01[\\PIPE\\emsmdb]"),
                    ("Endpoint mapper", "ncacn_ip_tcp:127.0.0.1[135]")]


def test_ept_lookup_pages_one_at_a_time_like_rpcclient():
    iface = EpmInterface(lambda: ENDPOINTS)
    ctx, _ = make_ctx(ANONYMOUS, transport="ncacn_ip_tcp")
    handle, got = epm.ept_lookup_handle_t(), []
    for _ in range(10):
        resp = lookup(iface, ctx, handle, 1)
        if resp["status"] == EPT_S_NOT_REGISTERED:      # "no more entries"
            assert resp["num_ents"] == 0 and resp["entry_handle"].isNull()
            break
        assert resp["num_ents"] == 1 and not resp["entry_handle"].isNull()
        got.append(b"".join(resp["entries"][0]["tower"]["tower_octet_string"]))
        handle = resp["entry_handle"]
    else:
        pytest.fail("ept_lookup never ended")
    assert got == [build_tower(ep) for ep in ENDPOINTS]


def test_epm_refuses_registration_and_unknown_opnums():
    iface = EpmInterface(lambda: ENDPOINTS)
    ctx, _ = make_ctx(ANONYMOUS, transport="ncacn_ip_tcp")
    with pytest.raises(RpcFault) as exc:
        iface.call(0, b"\0" * 64, ctx)
    assert exc.value.status == 5
    with pytest.raises(RpcFault) as exc:
        iface.call(8, b"", ctx)
    assert exc.value.status == NCA_S_OP_RNG_ERROR
    assert iface.policy_exempt


def test_tower_round_trip():
    for ep in ENDPOINTS:
        t = parse_tower(build_tower(ep))
        assert (t.interface, t.version, t.protseq) == (ep.uuid, ep.version, ep.protseq)


# ------------------------------------------------------------------ srvsvc

def share_enum_stub(level):
    req = srvs.NetrShareEnum()
    req["ServerName"] = "\\\\EXCH01\x00"
    req["InfoStruct"]["ShareInfo"]["tag"] = level
    req["InfoStruct"]["ShareInfo"]["Level%d" % level]["Buffer"] = srvs.NULL
    req["InfoStruct"]["Level"] = level
    req["PreferedMaximumLength"] = 0xFFFFFFFF
    req["ResumeHandle"] = 0
    return req.getData()


@pytest.mark.parametrize("level", [0, 1])
def test_share_enum(config, level):
    iface = SrvsvcInterface(config.server)
    ctx, events = make_ctx(ALICE)
    resp = srvs.NetrShareEnumResponse(iface.call(15, share_enum_stub(level), ctx))
    assert resp["ErrorCode"] == 0 and resp["TotalEntries"] == 1
    entries = resp["InfoStruct"]["ShareInfo"]["Level%d" % level]["Buffer"]
    assert entries[0]["shi%d_netname" % level] == "IPC$\x00"
    if level == 1:
        assert entries[0]["shi1_type"] == 0x80000003
        assert entries[0]["shi1_remark"] == "Remote IPC\x00"
    assert events[-1].kind == "srvsvc.share_enum"


@pytest.mark.parametrize("level", [2, 502])
def test_share_enum_admin_levels_denied(config, level):
    iface = SrvsvcInterface(config.server)
    ctx, _ = make_ctx(ALICE)
    resp = srvs.NetrShareEnumResponse(iface.call(15, share_enum_stub(level), ctx))
    assert resp["ErrorCode"] == 5 and resp["TotalEntries"] == 0


@pytest.mark.parametrize("level", [100, 101, 102])
def test_server_get_info(config, level):
    iface = SrvsvcInterface(config.server)
    ctx, _ = make_ctx(ALICE)
    req = srvs.NetrServerGetInfo()
    req["ServerName"] = "\\\\EXCH01\x00"
    req["Level"] = level
    resp = srvs.NetrServerGetInfoResponse(iface.call(21, req.getData(), ctx))
    info = resp["InfoStruct"]["ServerInfo%d" % level]
    assert resp["ErrorCode"] == 0
    assert info["sv%d_platform_id" % level] == 500
    assert info["sv%d_name" % level] == "EXCH01\x00"
    if level >= 101:
        assert (info["sv%d_version_major" % level], info["sv%d_version_minor" % level]) == (10, 0)
        assert info["sv%d_type" % level] & 0x9003 == 0x9003
        assert info["sv%d_comment" % level] == "rpcauth-emulator\x00"


def test_server_get_info_invalid_level(config):
    iface = SrvsvcInterface(config.server)
    ctx, _ = make_ctx(ALICE)
    req = srvs.NetrServerGetInfo()
    req["ServerName"] = "\\\\EXCH01\x00"
    req["Level"] = 999
    assert iface.call(21, req.getData(), ctx)[-4:] == struct.pack("<I", 124)
    with pytest.raises(RpcFault) as exc:
        iface.call(16, b"", ctx)                      # NetrShareGetInfo without its parameters
    assert exc.value.status == 0x6F7
    with pytest.raises(RpcFault) as exc:
        iface.call(17, b"", ctx)                      # NetrShareSetInfo: not served
    assert exc.value.status == NCA_S_OP_RNG_ERROR


def test_default_interfaces(config):
    ifaces = default_interfaces(config, lambda: ENDPOINTS)
    assert set(ifaces) == {em.EMSMDB_UUID, EPM_UUID, "4b324fc8-1670-01d3-1278-5a47bf6ee188",
                           "afa8bd80-7d8a-11c9-bef4-08002b102989"}
    assert ifaces[EPM_UUID].version == (3, 0) and ifaces[em.EMSMDB_UUID].version == (0, 81)


# ------------------------------------------------------------------ malformed stubs

def _valid_stubs():
    handle_stub = disconnect_stub(b"\0" * 4 + b"\x11" * 16)
    return [
        ("emsmdb", 0, connect_stub(DN + "alice")),
        ("emsmdb", 10, connect_stub(DN + "alice", extended=True)),
        ("emsmdb", 1, handle_stub),
        ("epm", 3, map_stub(em.EMSMDB_UUID, (0, 81), "ncacn_ip_tcp")),
        ("srvsvc", 15, share_enum_stub(1)),
    ]


@pytest.mark.parametrize("name,opnum,stub", _valid_stubs(), ids=lambda v: str(v)[:12])
def test_every_truncation_is_bad_stub_data(config, name, opnum, stub):
    iface = {"emsmdb": make_emsmdb(config), "epm": EpmInterface(lambda: ENDPOINTS),
             "srvsvc": SrvsvcInterface(config.server)}[name]
    for cut in range(len(stub)):
        ctx, _ = make_ctx(ALICE)
        with pytest.raises(RpcFault) as exc:
            iface.call(opnum, stub[:cut], ctx)
        assert exc.value.status == NCA_S_FAULT_NDR, (cut, exc.value.reason)


def test_dn_without_terminator_is_bad_stub(config):
    stub = bytearray(connect_stub(DN + "alice"))
    nul = stub.index(b"\x00", 12)
    stub[nul] = ord("x")
    ctx, _ = make_ctx(ALICE)
    with pytest.raises(RpcFault) as exc:
        make_emsmdb(config).call(0, bytes(stub), ctx)
    assert exc.value.status == NCA_S_FAULT_NDR


_FUZZ_CONFIG = default_config()
_FUZZ_TARGETS = {
    "emsmdb": (make_emsmdb(_FUZZ_CONFIG), (0, 1, 2, 10, 11)),
    "epm": (EpmInterface(lambda: ENDPOINTS), (2, 3)),
    "srvsvc": (SrvsvcInterface(_FUZZ_CONFIG.server), (15, 21)),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(sorted(_FUZZ_TARGETS)), pick=st.integers(0, 4),
       data=st.one_of(st.binary(max_size=300),
                      st.sampled_from([s for _, _, s in _valid_stubs()]).flatmap(
                          lambda s: st.tuples(st.just(s), st.integers(0, len(s)), st.binary(max_size=8))
                          .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):]))))
def test_fuzzed_stubs_only_ever_fault(target, pick, data):
    iface, opnums = _FUZZ_TARGETS[target]
    opnum = opnums[pick % len(opnums)]
    ctx, _ = make_ctx(ALICE)
    try:
        out = iface.call(opnum, data, ctx)
    except RpcFault as exc:
        # Bad NDR, or a well-formed call naming a handle this connection does not hold.
        assert exc.status in (NCA_S_FAULT_NDR, NCA_S_FAULT_CONTEXT_MISMATCH), exc
    else:
        assert isinstance(out, bytes) and len(out) >= 4


@pytest.mark.parametrize("name", ["\\\\127.0.0.1\x00", "\\\\A\x00", "\x00", None])
@pytest.mark.parametrize("level", [100, 101, 102, 7])
def test_server_get_info_level_reads_what_impacket_writes(name, level):
    """srvsvc reads NetrServerGetInfo's level without impacket's NDR classes: every stub impacket's
    client writes, and every truncation of it, reads as impacket's own decoder reads it (the level,
    or the bad-stub fault)."""
    req = srvs.NetrServerGetInfo()
    if name is not None:
        req["ServerName"] = name
    req["Level"] = level
    stub = req.getData()
    assert server_get_info_level(stub) == level

    def impacket_level(data: bytes):
        call = srvs.NetrServerGetInfo(isNDR64=False)
        try:
            call.fromString(data)
        except Exception:
            return "fault"
        return int(call["Level"])

    for cut in range(len(stub)):
        try:
            ours = server_get_info_level(stub[:cut])
        except RpcFault as fault:
            assert fault.status == NCA_S_FAULT_NDR
            ours = "fault"
        assert ours == impacket_level(stub[:cut]), cut


def test_server_get_info_level_refuses_impossible_counts():
    for counts in ((4, 1, 2), (2, 0, 4), (5000, 0, 2)):       # offset not 0, actual > max, too long
        stub = struct.pack("<IIII", 0x20000, *counts) + b"\\\x00A\x00" + struct.pack("<I", 101)
        with pytest.raises(RpcFault) as exc:
            server_get_info_level(stub)
        assert exc.value.status == NCA_S_FAULT_NDR
