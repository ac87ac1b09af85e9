"""The remote management interface on every endpoint (impacket's mgmt client over real
sockets, including the EMSMDB endpoints smbtorture never maps), and the reading of big-endian
NDR stubs (interfaces/ndr.py) on hand-written and hostile input."""

from __future__ import annotations

import random
import struct
import uuid

import pytest
from impacket.dcerpc.v5 import epm, mgmt, transport
from impacket.dcerpc.v5.rpcrt import DCERPCException
from impacket.uuid import uuidtup_to_bin

from emulator.identity import ANONYMOUS
from emulator.interfaces import ndr
from emulator.interfaces.emsmdb import EMSMDB_UUID
from emulator.interfaces.epm import EPM_UUID, Endpoint, EpmInterface
from emulator.interfaces.epm import REQUESTS as EPM_REQUESTS
from emulator.interfaces.mgmt import MgmtInterface
from emulator.interfaces.srvsvc import REQUESTS as SRVSVC_REQUESTS
from emulator.rpc.interface import NCA_S_FAULT_NDR, CallContext, RpcFault

SRVSVC_UUID = "4b324fc8-1670-01d3-1278-5a47bf6ee188"


def _ids(resp) -> set[str]:
    out = set()
    for item in resp["if_id_vector"]["if_id"]:
        data = item["Data"]
        out.add(f"{uuid.UUID(bytes_le=bytes(data['Uuid']))}/{data['VersMajor']}.{data['VersMinor']}")
    return out


def _tcp(lab, port):
    dce = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{port}]").get_dce_rpc()
    dce.connect()
    return dce


def _pipe(lab, pipe):
    t = transport.DCERPCTransportFactory(f"ncacn_np:127.0.0.1[\\pipe\\{pipe}]")
    t.set_dport(lab.ports["smb"])
    t.set_credentials("alice", lab.password("alice"), "CORP")
    dce = t.get_dce_rpc()
    dce.connect()
    return dce


@pytest.mark.parametrize("where, served", [
    ("emsmdb-tcp", {f"{EMSMDB_UUID}/0.81"}),
    ("epm-tcp", {f"{EPM_UUID}/3.0"}),
    ("emsmdb-pipe", {f"{EMSMDB_UUID}/0.81"}),
    ("srvsvc-pipe", {f"{SRVSVC_UUID}/3.0"}),
])
def test_mgmt_answers_without_authentication_on_every_endpoint(lab, where, served):
    """RpcMgmtSetAuthorizationFn's default authorizations: every client may list the
    interfaces, even on the EMSMDB TCP endpoint whose lab policy demands level connect."""
    dce = (_tcp(lab, lab.ports[where.split("-")[0]]) if where.endswith("tcp")
           else _pipe(lab, where.split("-")[0]))
    try:
        dce.bind(mgmt.MSRPC_UUID_MGMT)
        assert _ids(mgmt.hinq_if_ids(dce)) == served
        # [out] error_status_t status, then the boolean32 result (impacket's response class
        # models the status only, so the raw answer is read).
        dce.call(mgmt.is_server_listening.opnum, mgmt.is_server_listening())
        assert struct.unpack("<II", dce.recv()) == (0, 1)
        with pytest.raises(DCERPCException) as exc:
            mgmt.hstop_server_listening(dce)            # disabled for every client
        assert exc.value.get_error_code() == 5
        stats = mgmt.hinq_stats(dce)
        assert stats["count"] == 4 and list(stats["statistics"]) == [0, 0, 0, 0]
    finally:
        dce.disconnect()
    assert lab.records("mgmt.call", op="stop_server_listening", result="access_denied")


def _call(iface, opnum, stub, little_endian=True):
    events = []
    ctx = CallContext(identity=ANONYMOUS, transport="ncacn_ip_tcp", auth_type=0, auth_level=1,
                      conn_state={}, emit=events.append, little_endian=little_endian)
    return iface.call(opnum, stub, ctx)


@pytest.mark.parametrize("proto, name_ok", [(9, True), (10, True), (16, False), (0, False)])
def test_inq_princ_name_sizes(proto, name_ok):
    """Windows names an empty principal for each service it accepts: size 1 holds it; an
    unknown service is RPC_S_UNKNOWN_AUTHN_SERVICE; a size of 0 is bad stub data."""
    iface = MgmtInterface()
    out = _call(iface, 4, struct.pack("<II", proto, 1))
    max_count, offset, actual = struct.unpack_from("<III", out)
    assert (max_count, offset, actual) == (1, 0, 1) and out[12:13] == b"\0"
    assert struct.unpack("<I", out[-4:])[0] == (0 if name_ok else 1747)
    with pytest.raises(RpcFault) as exc:
        _call(iface, 4, struct.pack("<II", proto, 0))
    assert exc.value.status == NCA_S_FAULT_NDR


def test_inq_if_ids_layout_matches_impackets_decoder():
    served = [EpmInterface(list), MgmtInterface()]
    stub = _call(MgmtInterface().on_endpoint(served), 0, b"")
    resp = mgmt.inq_if_idsResponse(stub)
    assert _ids(resp) == {f"{EPM_UUID}/3.0"}         # the management interface lists not itself
    assert resp["status"] == 0


# ------------------------------------------------------------------ big-endian stubs

ENDPOINTS = [Endpoint(EMSMDB_UUID, (0, 81), "ncacn_ip_tcp", "6001", "127.0.0.1", "x"),
             Endpoint(EPM_UUID, (3, 0), "ncacn_ip_tcp", "135", "127.0.0.1", "y")]


def _be_uuid(u: str) -> bytes:
    return uuid.UUID(u).bytes                        # fields 1-3 big-endian, as NDR big-endian sends


def test_big_endian_ept_map_reads_as_its_little_endian_twin():
    """A big-endian ept_map written by hand (unique pointers, a conformant struct with its
    conformance first, a context handle) reads as impacket's little-endian encoding."""
    tower = epm.EPMTower()
    iface_floor = epm.EPMRPCInterface()
    iface_floor["InterfaceUUID"] = uuidtup_to_bin((EMSMDB_UUID, "0.81"))[:16]
    iface_floor["MajorVersion"], iface_floor["MinorVersion"] = 0, 81
    tower["NumberOfFloors"] = 1
    tower["Floors"] = iface_floor.getData()
    octets = tower.getData()                         # tower octets are not NDR: never swapped
    le = (struct.pack("<I", 0x20000) + uuid.UUID(int=0).bytes_le
          + struct.pack("<III", 0x20004, len(octets), len(octets)) + octets)
    le += b"\0" * (-len(le) % 4) + struct.pack("<I", 0) + b"\x11" * 16 + struct.pack("<I", 4)
    be = (struct.pack(">I", 0x20000) + _be_uuid("00000000-0000-0000-0000-000000000000")
          + struct.pack(">III", 0x20004, len(octets), len(octets)) + octets)
    be += b"\0" * (-len(be) % 4) + struct.pack(">I", 0) + b"\x11" * 16 + struct.pack(">I", 4)
    assert ndr.swap_to_little_endian(EPM_REQUESTS[3], be, "epm") == le


def test_big_endian_srvsvc_share_enum_with_union_and_deferred_pointers():
    """NetrShareEnum level 1 with a container holding one entry: the union discriminant, the
    pointers' deferred referents and the wide strings all come out little-endian."""
    def wstr(text, e):
        chars = (text + "\0").encode("utf-16-be" if e == ">" else "utf-16-le")
        n = len(chars) // 2
        return struct.pack(e + "III", n, 0, n) + chars + b"\0" * (-len(chars) % 4)

    def stub(e):
        s = struct.pack(e + "I", 0x20000) + wstr("\\\\EXCH01", e)
        s += struct.pack(e + "IIII", 1, 1, 0x20004, 1)          # level, union tag, container ptr, EntriesRead
        s += struct.pack(e + "II", 0x20008, 1)                  # Buffer ptr, conformance
        s += struct.pack(e + "III", 0x2000C, 0x80000003, 0x20010)   # netname ptr, type, remark ptr
        s += wstr("IPC$", e) + wstr("Remote IPC", e)
        return s + struct.pack(e + "II", 0xFFFFFFFF, 0)          # PreferedMaximumLength, no resume
    assert ndr.swap_to_little_endian(SRVSVC_REQUESTS[15], stub(">"), "srvsvc") == stub("<")


def test_big_endian_request_is_served():
    iface = MgmtInterface()
    assert _call(iface, 4, struct.pack(">II", 10, 1), little_endian=False) == \
        _call(iface, 4, struct.pack("<II", 10, 1))


@pytest.mark.parametrize("layout_name", ["epm-3", "epm-2", "epm-0", "srvsvc-15", "srvsvc-16"])
def test_hostile_big_endian_stubs_only_ever_fault(layout_name):
    """Random and truncated stubs: the conversion returns or raises the bad-stub fault, never
    anything else, and in bounded time (every count is checked against the stub's length)."""
    table, op = layout_name.split("-")
    layout = (EPM_REQUESTS if table == "epm" else SRVSVC_REQUESTS)[int(op)]
    rng = random.Random(1234)
    for i in range(400):
        size = rng.randrange(0, 200)
        data = bytes(rng.randrange(256) if rng.random() < 0.7 else 0 for _ in range(size))
        if i % 3 == 0:
            data = struct.pack(">I", rng.choice([0, 1, 0x20000])) + data
        try:
            ndr.swap_to_little_endian(layout, data, "fuzz")
        except RpcFault as exc:
            assert exc.status == NCA_S_FAULT_NDR


def test_malformed_registration_gets_bad_stub_before_access_denied():
    iface = EpmInterface(lambda: ENDPOINTS)
    with pytest.raises(RpcFault) as exc:
        _call(iface, 0, b"")                         # ept_insert with no parameters at all
    assert exc.value.status == NCA_S_FAULT_NDR
    with pytest.raises(RpcFault) as exc:
        _call(iface, 0, struct.pack("<III", 0, 0, 0))   # well formed: refused
    assert exc.value.status == 5


def _connect_ex(e: str, dn: str) -> bytes:
    """EcDoConnectEx's [in] parameters written by hand in byte order `e` (MS-OXCRPC 3.1.4.11):
    the DN as a conformant varying string, seven longs, four shorts, the timestamp, an empty
    rgbAuxIn, cbAuxIn and *pcbAuxOut."""
    text = dn.encode("ascii") + b"\0"
    s = struct.pack(e + "III", len(text), 0, len(text)) + text
    s += b"\0" * (-len(s) % 4)
    s += struct.pack(e + "7I4HI", 0, 0, 0, 1252, 1033, 1033, 0xFFFFFFFF, 1, 5, 3144, 0, 0)
    return s + struct.pack(e + "III", 0, 0, 0x1008)


def test_big_endian_ec_do_connect_ex_is_read_and_answered_alike():
    from emulator.config import default_config
    from emulator.directory import Directory
    from emulator.identity import Identity
    from emulator.interfaces.emsmdb import REQUESTS as EMSMDB_REQUESTS
    from emulator.interfaces.emsmdb import EmsmdbInterface
    dn = "/o=Corp/ou=Site/cn=Recipients/cn=alice"
    assert ndr.swap_to_little_endian(EMSMDB_REQUESTS[10], _connect_ex(">", dn), "emsmdb") == \
        _connect_ex("<", dn)
    cfg = default_config()
    answers = []
    for little in (True, False):
        iface = EmsmdbInterface(Directory(cfg), cfg.policy, cfg.server, random_bytes=lambda n: b"\x42" * n)
        events = []
        ctx = CallContext(identity=Identity("alice", "CORP", "rpc_auth"), transport="ncacn_ip_tcp",
                          auth_type=10, auth_level=6, conn_state={}, emit=events.append,
                          little_endian=little)
        answers.append(iface.call(10, _connect_ex("<" if little else ">", dn), ctx))
        assert [e.fields["status_name"] for e in events if e.kind == "emsmdb.connect"] == ["ecSuccess"]
    assert answers[0] == answers[1]                 # replies are little-endian either way
