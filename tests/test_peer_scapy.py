"""scapy's DCE/RPC and SMB clients against a running lab: a client stack independent of
impacket's, which also checks our signatures, seals and SPNEGO mechListMIC.

The EMSMDB stubs are built and decoded with the interface's own impacket NDR classes; scapy
carries them as opaque payloads under the opnum, so what is under test is scapy's transport,
security context and DCE/RPC framing against ours.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

import pytest
from harness.cast import dn
from impacket import ntlm as imp_ntlm
from impacket.dcerpc.v5.rpcrt import DCERPCException
from scapy.config import conf
from scapy.error import Scapy_Exception
from scapy.layers import ntlm as scapy_ntlm
from scapy.layers.dcerpc import (
    DceRpc5Fault,
    find_dcerpc_interface,
    register_dcerpc_interface,
)
from scapy.layers.msrpce.rpcclient import DCERPC_Client, DCERPC_Transport
from scapy.layers.ntlm import NTLMSSP
from scapy.layers.smbclient import SMB_RPC_SOCKET, SMB_Client
from scapy.layers.spnego import SPNEGOSSP

from emulator.config import default_config_with
from emulator.interfaces import emsmdb
from emulator.interfaces.emsmdb import (
    EMSMDB_UUID,
    hEcDoConnect,
    hEcDoConnectEx,
    hEcDoDisconnect,
)
from emulator.lab import Lab
from emulator.ntlm import keys


@pytest.fixture(autouse=True, scope="module")
def quiet_scapy():
    """scapy warns about every opnum it has no NDR class for; the stubs here are opaque on
    purpose."""
    logger = logging.getLogger("scapy.runtime")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


LEVEL_NAMES = {2: "connect", 4: "packet", 5: "integrity", 6: "privacy"}
# alice's own mailbox, bob's (no grant), carol's (grants alice), and a DN nobody owns.
CASES = [("alice", 0), ("bob", 0x3F2), ("carol", 0), ("nobody", 0x3EB)]
STATUS_NAMES = ["ecSuccess", "ecLoginPerm", "ecSuccess", "ecUnknownUser"]
SCAPY_IFACE_NAME = "rpcauth_emsmdb"


def emsmdb_interface():
    """scapy's handle on EMSMDB v0.81, registered without NDR classes: stubs travel raw."""
    try:
        return find_dcerpc_interface(SCAPY_IFACE_NAME)
    except AttributeError:
        register_dcerpc_interface(name=SCAPY_IFACE_NAME, uuid=uuid.UUID(EMSMDB_UUID),
                                  version="0.81", opnums={})
        return find_dcerpc_interface(SCAPY_IFACE_NAME)


class ScapyDce:
    """The `request(ndrcall, checkError=False)` shape the emsmdb helpers call, carried by a
    bound scapy DCERPC_Client: the request stub comes from impacket's NDRCALL, the response
    stub is decoded with the matching `<Call>Response` class, a fault raises."""

    def __init__(self, client: DCERPC_Client) -> None:
        self.client = client

    def request(self, call, checkError=False):
        resp = self.client.sr1_req(conf.raw_layer(load=call.getData()), opnum=call.opnum)
        if resp is None:
            raise DCERPCException("no answer from the server")
        if DceRpc5Fault in resp:
            raise DCERPCException(error_code=resp[DceRpc5Fault].status)
        response_class = getattr(emsmdb, type(call).__name__ + "Response")
        return response_class(bytes(resp))


def scapy_ssp(mech: str, user: str, password: str):
    ntlm = NTLMSSP(UPN=f"{user}@CORP", PASSWORD=password)
    return SPNEGOSSP([ntlm]) if mech == "spnego" else ntlm


def tcp_client(lab, ssp, level: int) -> DCERPC_Client:
    client = DCERPC_Client(DCERPC_Transport.NCACN_IP_TCP, ssp=ssp, auth_level=level, verb=False)
    client.connect("127.0.0.1", port=lab.ports["emsmdb"])
    return client


def wait_for(predicate, timeout: float = 5.0):
    """Events of a connection the client has given up on arrive when the server gets there."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def conn_of(lab, client: DCERPC_Client) -> str:
    """The lab's connection id for a scapy client, found by its local port."""
    local = client.sock.ins.getsockname()
    return next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"{local[0]}:{local[1]}")


# ----------------------------------------------------------------------------- ncacn_ip_tcp

@pytest.mark.parametrize("call", [hEcDoConnect, hEcDoConnectEx], ids=["EcDoConnect", "EcDoConnectEx"])
@pytest.mark.parametrize("level", sorted(LEVEL_NAMES), ids=[LEVEL_NAMES[k] for k in sorted(LEVEL_NAMES)])
@pytest.mark.parametrize("mech", ["ntlm", "spnego"])
def test_tcp_bind_decides_as_the_typed_user(lab, mech, level, call):
    client = tcp_client(lab, scapy_ssp(mech, "alice", lab.password("alice")), level)
    try:
        assert client.bind(emsmdb_interface())
        dce = ScapyDce(client)
        for mailbox, want in CASES:
            status, handle, _ = call(dce, dn(mailbox))
            assert status == want, mailbox
            if status == 0:
                assert hEcDoDisconnect(dce, handle) == 0
        conn = conn_of(lab, client)
    finally:
        client.close()

    binds = lab.records("rpc.bind", conn=conn)
    assert [(b["auth_type"], b["auth_level"], b["result"]) for b in binds] == [(mech, LEVEL_NAMES[level], "ok")]
    ident = lab.records("rpc.identity", conn=conn)
    assert [(i["source"], i["user"], i["domain"]) for i in ident] == [("rpc_auth", "alice", "CORP")]
    connects = lab.records("emsmdb.connect", conn=conn)
    assert [c["status_name"] for c in connects] == STATUS_NAMES
    assert [c["user_dn"] for c in connects] == [dn(m) for m, _ in CASES]
    assert {c["acting_user"] for c in connects} == {"CORP\\alice"}
    assert {c["identity_source"] for c in connects} == {"rpc_auth"}
    # scapy binds at level packet but sends its requests without a verifier (as impacket does),
    # and the server reports the protection each call really had.
    served_level = "connect" if level == 4 else LEVEL_NAMES[level]
    assert {c["auth_level"] for c in connects} == {served_level}


def test_spnego_connect_level_mech_list_mic_is_verified(lab):
    """At level connect scapy negotiates neither signing nor key exchange, yet sends a
    mechListMIC (with its checksum through RC4). The acceptor verifies it and says which
    form it saw; the bind then acts as the authenticated user."""
    client = tcp_client(lab, scapy_ssp("spnego", "bob", lab.password("bob")), 2)
    try:
        assert client.bind(emsmdb_interface())
        assert hEcDoConnect(ScapyDce(client), dn("bob"))[0] == 0
        conn = conn_of(lab, client)
    finally:
        client.close()
    accepts = lab.records("spnego.accept", conn=conn)
    assert [(a["result"], a["mech_list_mic"]) for a in accepts] == [("ok", True)]
    assert accepts[0]["mech_list_mic_form"] == "rc4_checksum_without_key_exch"


class TamperedMicNTLMSSP(NTLMSSP):
    """scapy's NTLM with one bit of the mechListMIC checksum flipped: a downgrade attempt's
    view of the exchange, with the right password."""

    def GetMechListMIC(self, Context, input):
        mic = bytearray(bytes(super().GetMechListMIC(Context, input)))
        mic[6] ^= 0x01
        return bytes(mic)


@pytest.mark.parametrize("level", [2, 5, 6], ids=["connect", "integrity", "privacy"])
def test_tampered_mech_list_mic_is_refused(lab, level):
    ssp = SPNEGOSSP([TamperedMicNTLMSSP(UPN="bob@CORP", PASSWORD=lab.password("bob"))])
    client = tcp_client(lab, ssp, level)
    try:
        bound = client.bind(emsmdb_interface())
        conn = conn_of(lab, client)
    finally:
        client.close()
    assert not bound
    assert [b["result"] for b in lab.records("rpc.bind", conn=conn)] == ["bad_mic"]
    assert not lab.records("rpc.identity", conn=conn, source="rpc_auth")
    assert not lab.records("emsmdb.connect", conn=conn)


@pytest.mark.parametrize("mech", ["ntlm", "spnego"])
@pytest.mark.parametrize("user, password, reason", [
    ("alice", "not-alices-password", "wrong_password"),
    ("zed", "whatever", "unknown_user"),
    ("mallory", None, "disabled"),
])
def test_failed_logon_grants_nothing(lab, mech, user, password, reason):
    """With NTLM the client's last leg is auth3, which has no answer (MS-RPCE 3.3.1.5.2), so
    scapy believes the bind worked and learns otherwise from the fault on its first call;
    with SPNEGO the server's final negTokenResp rejects the bind itself."""
    pw = password if password is not None else lab.password(user)
    client = tcp_client(lab, scapy_ssp(mech, user, pw), 5)
    try:
        bound = client.bind(emsmdb_interface())
        conn = conn_of(lab, client)
        if bound:
            with pytest.raises(DCERPCException) as fault:
                hEcDoConnect(ScapyDce(client), dn(user))
            assert fault.value.error_code == 5          # access denied, as Windows answers
    finally:
        client.close()
    assert bound == (mech == "ntlm")
    assert [b["result"] for b in lab.records("rpc.bind", conn=conn)] == [reason]
    assert not lab.records("rpc.identity", conn=conn, source="rpc_auth")
    assert not lab.records("emsmdb.connect", conn=conn)


# ----------------------------------------------------------------------------- ncacn_np

def np_client(lab, user: str, level: int = 2) -> DCERPC_Client:
    """scapy's SMB client logs on as `user`, opens the EMSMDB pipe; the RPC bind on the pipe
    carries no auth below level integrity (the SMB session already authenticated)."""
    pipe = lab.config.transports.smb.pipes["emsmdb"]
    client = DCERPC_Client(DCERPC_Transport.NCACN_NP, ssp=NTLMSSP(UPN=f"{user}@CORP", PASSWORD=lab.password(user)),
                           auth_level=level, verb=False)
    client.connect("127.0.0.1", endpoint=pipe, port=lab.ports["smb"])
    return client


def smb_conns(lab) -> set[str]:
    return {r["conn"] for r in lab.records("conn.open", listener="smb")}


@pytest.mark.parametrize("call", [hEcDoConnect, hEcDoConnectEx], ids=["EcDoConnect", "EcDoConnectEx"])
def test_named_pipe_acts_as_the_smb_session_user(lab, call):
    """The KB's behaviour through an SMB client that is not impacket's: the unauthenticated
    bind on the pipe inherits alice's SMB session, so bob's mailbox is refused."""
    before = smb_conns(lab)
    client = np_client(lab, "alice")
    try:
        assert client.bind(emsmdb_interface())
        dce = ScapyDce(client)
        results = [call(dce, dn(mailbox))[0] for mailbox, _ in CASES]
    finally:
        client.close()
    assert results == [want for _, want in CASES]

    (conn,) = smb_conns(lab) - before
    opens = lab.records("smb.pipe_open", conn=conn)
    assert [(o["pipe"], o["identity"], o["identity_source"]) for o in opens] == [
        (lab.config.transports.smb.pipes["emsmdb"], "CORP\\alice", "smb_session")]
    setups = lab.records("smb.session_setup", conn=conn)
    assert [(s["result"], s["user"]) for s in setups] == [("ok", "alice")]
    binds = lab.records("rpc.bind", conn=conn)
    assert [(b["transport"], b["auth_type"], b["result"]) for b in binds] == [("ncacn_np", "none", "ok")]
    ident = lab.records("rpc.identity", conn=conn)
    assert [(i["source"], i["user"]) for i in ident] == [("smb_session", "alice")]
    connects = lab.records("emsmdb.connect", conn=conn)
    assert [c["status_name"] for c in connects] == STATUS_NAMES
    assert {(c["acting_user"], c["identity_source"], c["transport"]) for c in connects} == {
        ("CORP\\alice", "smb_session", "ncacn_np")}


def test_named_pipe_session_as_bob_opens_bobs_mailbox(lab):
    """The `net use` workaround: an IPC$ session as bob makes the pipe act as bob."""
    before = smb_conns(lab)
    client = np_client(lab, "bob")
    try:
        assert client.bind(emsmdb_interface())
        statuses = [hEcDoConnect(ScapyDce(client), dn(m))[0] for m in ("bob", "alice")]
    finally:
        client.close()
    assert statuses == [0, 0x3F2]
    (conn,) = smb_conns(lab) - before
    assert {(c["acting_user"], c["identity_source"]) for c in lab.records("emsmdb.connect", conn=conn)} == {
        ("CORP\\bob", "smb_session")}


def smblink_client(lab, smb_user: str, rpc_ssp, level: int) -> DCERPC_Client:
    """An SMB session (signed) as `smb_user`, and on its EMSMDB pipe an RPC client that
    authenticates its own bind with `rpc_ssp` at `level`. DCERPC_Client.from_smblink is
    used because DCERPC_Client.connect() over NCACN_NP does not hand its SSP to the DCE/RPC
    socket and so would send unsigned requests after an authenticated bind (see below)."""
    sock = socket.create_connection(("127.0.0.1", lab.ports["smb"]), timeout=5)
    smb = SMB_Client.from_tcpsock(sock, ssp=NTLMSSP(UPN=f"{smb_user}@CORP", PASSWORD=lab.password(smb_user)),
                                  REQUIRE_SIGNATURE=True)
    client = DCERPC_Client.from_smblink(smb, ssp=rpc_ssp, auth_level=level, verb=False)
    client.host = "127.0.0.1"            # names the target in the RPC security context
    client.open_smbpipe(lab.config.transports.smb.pipes["emsmdb"])
    return client


@pytest.mark.parametrize("level", [5, 6], ids=["integrity", "privacy"])
@pytest.mark.parametrize("mech", ["ntlm", "spnego"])
def test_named_pipe_authenticated_bind_replaces_the_session_identity(lab, mech, level):
    """alice's SMB session, an RPC bind as bob on the pipe: the bind's identity wins."""
    before = smb_conns(lab)
    client = smblink_client(lab, "alice", scapy_ssp(mech, "bob", lab.password("bob")), level)
    try:
        assert client.bind(emsmdb_interface())
        dce = ScapyDce(client)
        statuses = [hEcDoConnect(dce, dn(m))[0] for m in ("bob", "alice")]
    finally:
        client.close()
    assert statuses == [0, 0x3F2]
    (conn,) = smb_conns(lab) - before
    assert [s["user"] for s in lab.records("smb.session_setup", conn=conn)] == ["alice"]
    binds = lab.records("rpc.bind", conn=conn)
    assert [(b["transport"], b["auth_type"], b["auth_level"], b["result"]) for b in binds] == [
        ("ncacn_np", mech, LEVEL_NAMES[level], "ok")]
    assert binds[0]["smb_user"] == "CORP\\alice"
    connects = lab.records("emsmdb.connect", conn=conn)
    assert {(c["acting_user"], c["identity_source"], c["auth_level"]) for c in connects} == {
        ("CORP\\bob", "rpc_auth", LEVEL_NAMES[level])}


def test_named_pipe_unsigned_request_after_integrity_bind_is_faulted(lab):
    """scapy's DCERPC_Client.connect() over NCACN_NP binds with NTLM at level integrity but
    then sends its requests without a verifier. The server refuses to serve such a call:
    a bind that promised integrity cannot be downgraded by leaving the signature out."""
    before = smb_conns(lab)
    client = np_client(lab, "alice", level=5)
    try:
        assert client.bind(emsmdb_interface())
        with pytest.raises(DCERPCException) as fault:
            hEcDoConnect(ScapyDce(client), dn("alice"))
    finally:
        client.close()
    assert fault.value.error_code == 0x721            # nca_s_fault_sec_pkg_error (RPC_S_SEC_PKG_ERROR)
    (conn,) = smb_conns(lab) - before
    assert [v["result"] for v in lab.records("rpc.verify", conn=conn)] == ["missing_verifier"]
    assert not lab.records("emsmdb.connect", conn=conn)


def test_named_pipe_privacy_through_connect_wants_smb_encryption_a_lab_may_not_offer():
    """DCERPC_Client.connect() over NCACN_NP at level privacy insists on SMB3 encryption. A lab
    that does not offer it (policy.smb_encryption: off) sees scapy stop after NEGOTIATE: no
    session, no pipe."""
    with Lab(default_config_with({"policy": {"smb_encryption": "off"}})) as lab:
        before = smb_conns(lab)
        with pytest.raises(Scapy_Exception, match="encryption"):
            np_client(lab, "alice", level=6)
        (conn,) = wait_for(lambda: smb_conns(lab) - before)
        assert wait_for(lambda: lab.records("conn.close", conn=conn))
        negotiated = lab.records("smb.negotiate", conn=conn)
        assert negotiated and negotiated[-1]["dialect"] == "3.1.1" and negotiated[-1]["cipher"] is None
        assert not lab.records("smb.session_setup", conn=conn)
        assert not lab.records("smb.pipe_open", conn=conn)


def test_named_pipe_privacy_through_connect_runs_over_smb3_encryption():
    """With encryption offered (as a Windows server does), scapy negotiates 3.1.1 with
    AES-128-CCM, logs on, seals every SMB message and binds at privacy. It then sends its calls
    with no RPC verifier (it counts on the SMB encryption), which a privacy context must refuse
    (MS-RPCE 3.3.1.5.2): nothing is served. Privacy on the pipe with an RPC seal is covered above
    on a signed session."""
    with Lab(default_config_with({"policy": {"smb_encryption": "desired"}})) as lab:
        before = smb_conns(lab)
        client = np_client(lab, "alice", level=6)
        try:
            assert client.bind(emsmdb_interface())
            with pytest.raises(DCERPCException):
                hEcDoConnect(ScapyDce(client), dn("alice"))
        finally:
            client.close()
        (conn,) = wait_for(lambda: smb_conns(lab) - before)
        [on] = lab.records("smb.encryption", conn=conn)
        assert (on["cipher"], on["dialect"]) == ("AES-128-CCM", "3.1.1")
        assert [b["auth_level"] for b in lab.records("rpc.bind", conn=conn)] == ["privacy"]
        assert [v["result"] for v in lab.records("rpc.verify", conn=conn)] == ["missing_verifier"]
        assert not lab.records("emsmdb.connect", conn=conn)


def test_named_pipe_wrong_password_opens_nothing(lab):
    before = smb_conns(lab)
    sock = socket.create_connection(("127.0.0.1", lab.ports["smb"]), timeout=5)
    with pytest.raises(Scapy_Exception, match="Session Setup failed"):
        SMB_RPC_SOCKET.from_tcpsock(sock, ssp=NTLMSSP(UPN="alice@CORP", PASSWORD="not-alices-password"))
    sock.close()
    (conn,) = smb_conns(lab) - before
    assert wait_for(lambda: lab.records("smb.session_setup", conn=conn))
    assert [s["result"] for s in lab.records("smb.session_setup", conn=conn)] == ["wrong_password"]
    assert not lab.records("smb.tree_connect", conn=conn, result="ok")
    assert not lab.records("smb.pipe_open", conn=conn)


# ----------------------------------------------------------------------------- the MIC form scapy uses

ESS_NO_KEY_EXCH = (imp_ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY | imp_ntlm.NTLMSSP_NEGOTIATE_128
                   | imp_ntlm.NTLMSSP_NEGOTIATE_NTLM | imp_ntlm.NTLMSSP_NEGOTIATE_UNICODE)
ESS_KEY_EXCH = ESS_NO_KEY_EXCH | imp_ntlm.NTLMSSP_NEGOTIATE_KEY_EXCH
MECH_LIST = bytes.fromhex("300c060a2b06010401823702020a")       # DER MechTypeList: NTLMSSP only
SESSION_KEY = bytes(range(16))


def scapy_mic(session_key: bytes, sender: str, seq: int = 0) -> bytes:
    """A mechListMIC as scapy's own NTLM code computes it: checksum always through RC4."""
    sign = keys.sign_key(session_key, ESS_NO_KEY_EXCH, sender)
    seal = keys.seal_key(session_key, ESS_NO_KEY_EXCH, sender)
    return bytes(scapy_ntlm.MAC(scapy_ntlm.RC4Init(seal), sign, seq, MECH_LIST))


def test_rc4_mic_form_is_accepted_only_without_key_exchange_and_under_the_right_key():
    server = keys.SessionSecurity(SESSION_KEY, ESS_NO_KEY_EXCH, "server")
    assert server.verify_mech_list_mic(MECH_LIST, scapy_mic(SESSION_KEY, "client")) == keys.MIC_FORM_RC4_CHECKSUM
    # The answer, in the same form, is what scapy's own MAC computes for the server direction.
    assert server.sign_mech_list_mic(MECH_LIST, keys.MIC_FORM_RC4_CHECKSUM) == scapy_mic(SESSION_KEY, "server")

    other_key = bytes(16)
    server = keys.SessionSecurity(SESSION_KEY, ESS_NO_KEY_EXCH, "server")
    assert server.verify_mech_list_mic(MECH_LIST, scapy_mic(other_key, "client")) is None

    # The specified form still verifies, and is answered in the specified form.
    client = keys.SessionSecurity(SESSION_KEY, ESS_NO_KEY_EXCH, "client")
    server = keys.SessionSecurity(SESSION_KEY, ESS_NO_KEY_EXCH, "server")
    assert server.verify_mech_list_mic(MECH_LIST, client.sign(MECH_LIST)) == keys.MIC_FORM_SPEC
    assert client.verify(MECH_LIST, server.sign_mech_list_mic(MECH_LIST, keys.MIC_FORM_SPEC))


def test_with_key_exchange_only_the_specified_form_verifies():
    """With KEY_EXCH both sides pass the checksum through RC4 (MS-NLMP 3.4.4.2); a checksum
    left in the clear is then not a second accepted form."""
    client = keys.SessionSecurity(SESSION_KEY, ESS_KEY_EXCH, "client")
    server = keys.SessionSecurity(SESSION_KEY, ESS_KEY_EXCH, "server")
    spec = client.sign(MECH_LIST)
    sign = keys.sign_key(SESSION_KEY, ESS_KEY_EXCH, "client")
    clear = spec[:4] + keys.hmac_md5(sign, bytes(4) + MECH_LIST)[:8] + spec[12:]
    assert clear != spec
    assert server.verify_mech_list_mic(MECH_LIST, clear) is None
    server = keys.SessionSecurity(SESSION_KEY, ESS_KEY_EXCH, "server")
    assert server.verify_mech_list_mic(MECH_LIST, spec) == keys.MIC_FORM_SPEC
