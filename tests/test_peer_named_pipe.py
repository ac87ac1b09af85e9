"""The named-pipe half of the KB with real peers: the RPC layer inherits the SMB session's
identity, unless an authenticated bind on the pipe replaces it."""

from __future__ import annotations

import subprocess

import pytest
from impacket.dcerpc.v5 import epm, srvs, transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_WINNT
from impacket.smb import SMB_DIALECT
from impacket.smb3structs import SMB2_DIALECT_002, SMB2_DIALECT_21, SMB2_DIALECT_30, SMB2_DIALECT_311
from impacket.smbconnection import SessionError, SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect

from harness.cast import dn, need_tool

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
DIALECTS = {"SMB1": SMB_DIALECT, "2.0.2": SMB2_DIALECT_002, "2.1": SMB2_DIALECT_21, "3.0": SMB2_DIALECT_30,
            "3.1.1": SMB2_DIALECT_311}


def smb_login(lab, user, dialect="3.1.1", password=None):
    conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"], preferredDialect=DIALECTS[dialect],
                         timeout=10)
    conn.login(user, lab.password(user) if password is None else password, "CORP")
    return conn


def pipe_dce(lab, smb, pipe=r"\emsmdb"):
    t = transport.SMBTransport("127.0.0.1", lab.ports["smb"], pipe, smb_connection=smb)
    dce = t.get_dce_rpc()
    dce.connect()
    return dce


def conn_of(lab, smb):
    port = smb.getSMBServer().get_socket().getsockname()[1]
    return next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_bind_without_auth_inherits_the_session_user(lab, dialect):
    smb = smb_login(lab, "alice", dialect)
    conn = conn_of(lab, smb)
    dce = pipe_dce(lab, smb)
    dce.bind(EMSMDB)
    assert hEcDoConnect(dce, dn("alice"))[0] == 0
    assert hEcDoConnect(dce, dn("bob"))[0] == 0x3F2        # the KB: alice cannot open bob's mailbox
    dce.disconnect()
    smb.logoff()
    connects = lab.records("emsmdb.connect", conn=conn)
    assert [(c["acting_user"], c["identity_source"], c["status_name"]) for c in connects] == [
        ("CORP\\alice", "smb_session", "ecSuccess"), ("CORP\\alice", "smb_session", "ecLoginPerm")]
    assert lab.records("smb.session_setup", conn=conn)[-1]["result"] == "ok"
    opens = lab.records("smb.pipe_open", conn=conn)
    assert opens and opens[-1]["user"] == "alice" and opens[-1]["identity_source"] == "smb_session"
    inherited = lab.records("rpc.identity", conn=conn)[-1]
    # The pipe's identity is the session's, with the mechanism the session setup used (impacket
    # wraps NTLM in SPNEGO there).
    assert (inherited["source"], inherited["mechanism"]) == ("smb_session", "spnego-ntlm")


@pytest.mark.parametrize("dialect", ["SMB1", "3.1.1"])
def test_bobs_session_opens_bobs_mailbox(lab, dialect):
    smb = smb_login(lab, "bob", dialect)
    dce = pipe_dce(lab, smb)
    dce.bind(EMSMDB)
    assert hEcDoConnect(dce, dn("bob"))[0] == 0
    dce.disconnect()
    smb.logoff()


@pytest.mark.parametrize("dialect", ["SMB1", "2.1", "3.1.1"])
def test_authenticated_bind_on_the_pipe_replaces_the_session_identity(lab, dialect):
    smb = smb_login(lab, "alice", dialect)
    conn = conn_of(lab, smb)
    t = transport.SMBTransport("127.0.0.1", lab.ports["smb"], r"\emsmdb", smb_connection=smb)
    t.set_credentials("bob", lab.password("bob"), "CORP")
    dce = t.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_CONNECT)
    dce.connect()
    dce.bind(EMSMDB)
    assert hEcDoConnect(dce, dn("bob"))[0] == 0
    dce.disconnect()
    smb.logoff()
    c = lab.records("emsmdb.connect", conn=conn)[-1]
    assert (c["acting_user"], c["identity_source"]) == ("CORP\\bob", "rpc_auth")


@pytest.mark.parametrize("dialect", ["SMB1", "2.0.2", "3.1.1"])
def test_wrong_password_is_a_logon_failure(lab, dialect):
    with pytest.raises(SessionError) as info:
        smb_login(lab, "alice", dialect, password="not-alices")
    assert "STATUS_LOGON_FAILURE" in str(info.value)


def test_endpoint_mapper_over_the_epmapper_pipe(lab):
    smb = smb_login(lab, "alice")
    dce = pipe_dce(lab, smb, r"\epmapper")
    binding = epm.hept_map("127.0.0.1", EMSMDB, protocol="ncacn_np", dce=dce)
    dce.disconnect()
    smb.logoff()
    assert binding.lower().endswith("[\\pipe\\emsmdb]")


def test_srvsvc_server_info_and_shares(lab):
    smb = smb_login(lab, "alice", "2.1")
    dce = pipe_dce(lab, smb, r"\srvsvc")
    dce.bind(srvs.MSRPC_UUID_SRVS)
    info = srvs.hNetrServerGetInfo(dce, 101)
    assert info["InfoStruct"]["ServerInfo101"]["sv101_name"].rstrip("\x00")
    shares = srvs.hNetrShareEnum(dce, 1)
    names = [s["shi1_netname"].rstrip("\x00") for s in shares["InfoStruct"]["ShareInfo"]["Level1"]["Buffer"]]
    assert "IPC$" in names
    dce.disconnect()
    smb.logoff()


def test_unknown_pipe_is_not_found(lab):
    smb = smb_login(lab, "alice")
    tid = smb.connectTree("IPC$")
    with pytest.raises(SessionError) as info:
        smb.openFile(tid, r"\lsarpc")
    assert "STATUS_OBJECT_NAME_NOT_FOUND" in str(info.value)


def test_only_ipc_share_exists(lab):
    smb = smb_login(lab, "alice")
    with pytest.raises(SessionError) as info:
        smb.connectTree("C$")
    assert "STATUS_BAD_NETWORK_NAME" in str(info.value)


# ---------------------------------------------------------------------- Samba's tools
def _smbclient(lab, *args, user="alice", password=None):
    need_tool("smbclient")
    pw = lab.password(user) if password is None else password
    cmd = ["smbclient", "//127.0.0.1/IPC$", "-p", str(lab.ports["smb"]), "-U", f"CORP/{user}%{pw}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("proto", ["SMB2", "SMB3"])
def test_smbclient_connects_to_ipc(lab, proto):
    before = len(lab.records("smb.tree_connect"))
    r = _smbclient(lab, "-m", proto, "-c", "exit")
    assert r.returncode == 0, r.stdout + r.stderr
    trees = lab.records("smb.tree_connect")[before:]
    assert any(t.get("result") == "ok" and "ipc$" in str(t.get("share", "")).lower() for t in trees)


def test_smbclient_wrong_password(lab):
    r = _smbclient(lab, "-m", "SMB3", "-c", "exit", password="wrong-password")
    assert r.returncode != 0 and "NT_STATUS_LOGON_FAILURE" in r.stdout + r.stderr


def test_smbclient_lists_shares(lab):
    need_tool("smbclient")
    r = subprocess.run(["smbclient", "-L", "//127.0.0.1", "-p", str(lab.ports["smb"]), "-m", "SMB3",
                        "-U", f"CORP/alice%{lab.password('alice')}"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "IPC$" in r.stdout, r.stdout + r.stderr


def _rpcclient(lab, command):
    need_tool("rpcclient")
    cmd = ["rpcclient", "-p", str(lab.ports["smb"]), "-U", f"CORP/alice%{lab.password('alice')}",
           "-c", command, "127.0.0.1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_rpcclient_srvinfo_over_named_pipe(lab):
    r = _rpcclient(lab, "srvinfo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "platform_id" in r.stdout and "500" in r.stdout


def test_rpcclient_epmlookup_over_named_pipe(lab):
    r = _rpcclient(lab, "epmlookup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert EMSMDB_UUID in r.stdout.lower()
