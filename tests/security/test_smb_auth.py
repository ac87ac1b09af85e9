"""Negative matrix, SMB: session setup (SMB1 and SMB2) and what a session, tree or file id
grants. A refused logon leaves no session; ids are scoped to the connection and session that
made them (MS-SMB2 3.3.5.2.9, 3.3.5.2.11); signing, once required, is enforced."""

from __future__ import annotations

import pytest
from impacket import nt_errors
from impacket import smb3structs as s3
from impacket.smb import SMB_DIALECT
from impacket.smbconnection import SessionError, SMBConnection

from emulator.lab import Lab

from helpers import (RawSmb2, lab_config, conn_of, connected_trees, file_id_of, opened_pipes, pdu, BIND, bind_body,
                     EMSMDB_SYNTAX, wait_records)

LOGON_FAILURE = nt_errors.STATUS_LOGON_FAILURE
SESSION_DELETED = nt_errors.STATUS_USER_SESSION_DELETED
NAME_DELETED = nt_errors.STATUS_NETWORK_NAME_DELETED


def smb(lab) -> tuple[RawSmb2, str]:
    client = RawSmb2(lab.ports["smb"])
    return client, conn_of(lab, client.sock)


def assert_nothing_granted(lab, conn: str) -> None:
    assert not connected_trees(lab, conn)
    assert not opened_pipes(lab, conn)
    assert not lab.records("rpc.bind", conn=conn)


def assert_setup_refused(lab, conn: str, reason: str) -> None:
    setups = wait_records(lab, "smb.session_setup", conn=conn)
    assert setups and setups[-1]["result"] == reason
    assert not [s for s in setups if s["result"] == "ok"]


def impacket_login(lab, dialect, user: str, password: str) -> str:
    conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"], preferredDialect=dialect,
                         timeout=10)
    cid = conn_of(lab, conn.getSMBServer().get_socket())
    with pytest.raises(SessionError) as info:
        conn.login(user, password, "CORP")
    assert info.value.getErrorCode() == LOGON_FAILURE
    # The client may still try the tree; nothing of it must exist.
    with pytest.raises(Exception):
        conn.connectTree("IPC$")
    conn.close()
    return cid


# ---------------------------------------------------------------------- credentials, SMB2 and SMB1

@pytest.mark.parametrize("dialect", [s3.SMB2_DIALECT_21, s3.SMB2_DIALECT_311], ids=["2.1", "3.1.1"])
def test_smb2_wrong_password(lab, dialect):
    conn = impacket_login(lab, dialect, "alice", "not-alices")
    assert_setup_refused(lab, conn, "wrong_password")
    assert_nothing_granted(lab, conn)


def test_smb2_unknown_user(lab):
    conn = impacket_login(lab, s3.SMB2_DIALECT_311, "zed", "whatever")
    assert_setup_refused(lab, conn, "unknown_user")
    assert_nothing_granted(lab, conn)


def test_smb2_disabled_user(lab):
    conn = impacket_login(lab, s3.SMB2_DIALECT_311, "mallory", lab.password("mallory"))
    assert_setup_refused(lab, conn, "disabled")
    assert_nothing_granted(lab, conn)


def test_smb1_wrong_password(lab):
    conn = impacket_login(lab, SMB_DIALECT, "bob", "not-bobs")
    assert_setup_refused(lab, conn, "wrong_password")
    assert wait_records(lab, "ntlm.authenticate", conn=conn)[-1]["result"] == "wrong_password"
    assert_nothing_granted(lab, conn)


def test_smb1_unknown_user(lab):
    conn = impacket_login(lab, SMB_DIALECT, "zed", "whatever")
    assert_setup_refused(lab, conn, "unknown_user")
    assert wait_records(lab, "ntlm.authenticate", conn=conn)[-1]["result"] == "unknown_user"
    assert_nothing_granted(lab, conn)


def test_smb1_disabled_user(lab):
    conn = impacket_login(lab, SMB_DIALECT, "mallory", lab.password("mallory"))
    assert_setup_refused(lab, conn, "disabled")
    assert wait_records(lab, "ntlm.authenticate", conn=conn)[-1]["result"] == "disabled"
    assert_nothing_granted(lab, conn)


def test_smb_anonymous_forbidden(lab):
    client, conn = smb(lab)
    r = client.login("", "", anonymous=True)
    assert r is not None and r.status == LOGON_FAILURE
    assert_setup_refused(lab, conn, "anonymous_forbidden")
    assert client.tree_connect(sid=r.packet["SessionID"]).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)


def test_smb1_anonymous_forbidden(lab):
    conn = impacket_login(lab, SMB_DIALECT, "", "")
    assert wait_records(lab, "ntlm.authenticate", conn=conn)[-1]["result"] == "anonymous_forbidden"
    assert_nothing_granted(lab, conn)


def test_smb_guest_forbidden(lab):
    client, conn = smb(lab)
    r = client.login("Guest", "")
    assert r is not None and r.status == LOGON_FAILURE
    assert_setup_refused(lab, conn, "unknown_user")
    assert_nothing_granted(lab, conn)


def test_smb_ntlmv1_forbidden(lab):
    client, conn = smb(lab)
    r = client.login("alice", lab.password("alice"), ntlmv2=False)
    assert r is not None and r.status == LOGON_FAILURE
    assert client.tree_connect(sid=r.packet["SessionID"], sign=False).status == SESSION_DELETED
    assert_setup_refused(lab, conn, "ntlmv1_forbidden")
    assert_nothing_granted(lab, conn)


def test_smb_tampered_nt_proof_str(lab):
    client, conn = smb(lab)
    r = client.login("alice", lab.password("alice"), tamper=lambda a: a.flipped(a.nt_response_offset))
    assert r is not None and r.status == LOGON_FAILURE
    assert_setup_refused(lab, conn, "wrong_password")
    assert_nothing_granted(lab, conn)


# ---------------------------------------------------------------------- what a session grants

def test_tree_connect_and_create_before_session_setup(lab):
    client, conn = smb(lab)
    client.negotiate()
    assert client.tree_connect(sid=0).status == SESSION_DELETED
    assert client.create(1, sid=0).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    refused = wait_records(lab, "smb.refused", conn=conn)
    assert [r["reason"] for r in refused] == ["no_session", "no_session"]


def test_tree_connect_after_failed_session_setup(lab):
    client, conn = smb(lab)
    r = client.login("alice", "not-alices")
    assert r.status == LOGON_FAILURE
    dead = r.packet["SessionID"]
    assert dead != 0
    assert client.tree_connect(sid=dead, sign=False).status == SESSION_DELETED
    assert client.create(1, sid=dead, sign=False).status == SESSION_DELETED
    assert_setup_refused(lab, conn, "wrong_password")
    assert_nothing_granted(lab, conn)
    assert wait_records(lab, "smb.refused", conn=conn)[-1]["reason"] == "no_session"


def test_tree_connect_and_create_after_logoff(lab):
    client, conn = smb(lab)
    assert client.login("alice", lab.password("alice")).status == 0
    tid = client.tree_connect().packet["TreeID"]
    assert client.logoff().status == 0
    assert wait_records(lab, "smb.logoff", conn=conn)
    trees_before = len(connected_trees(lab, conn))
    assert client.tree_connect().status == SESSION_DELETED
    assert client.create(tid).status == SESSION_DELETED
    assert len(connected_trees(lab, conn)) == trees_before
    assert not opened_pipes(lab, conn)
    assert wait_records(lab, "smb.refused", conn=conn)[-1]["reason"] == "no_session"


def test_session_id_from_another_connection(lab):
    owner, _ = smb(lab)
    assert owner.login("alice", lab.password("alice")).status == 0
    thief, conn = smb(lab)
    thief.negotiate()
    assert thief.tree_connect(sid=owner.session_id, sign=False).status == SESSION_DELETED
    assert thief.create(1, sid=owner.session_id, sign=False).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert wait_records(lab, "smb.refused", conn=conn)[-1]["reason"] == "no_session"


def test_tree_id_from_another_connection(lab):
    owner, _ = smb(lab)
    assert owner.login("alice", lab.password("alice")).status == 0
    owner_tid = owner.tree_connect().packet["TreeID"]
    thief, conn = smb(lab)
    assert thief.login("bob", lab.password("bob")).status == 0
    r = thief.create(owner_tid + 5)
    assert r.status == NAME_DELETED
    assert not opened_pipes(lab, conn)
    assert wait_records(lab, "smb.refused", conn=conn)[-1]["reason"] == "no_tree"


def test_file_id_from_another_connection(lab):
    owner, owner_conn = smb(lab)
    assert owner.login("alice", lab.password("alice")).status == 0
    tid = owner.tree_connect().packet["TreeID"]
    file_id = file_id_of(owner.create(tid))
    thief, conn = smb(lab)
    assert thief.login("bob", lab.password("bob")).status == 0
    thief_tid = thief.tree_connect().packet["TreeID"]
    bind = pdu(BIND, 1, bind_body([(0, EMSMDB_SYNTAX)]))
    r = thief.write(thief_tid, file_id, bind)
    assert r.status == nt_errors.STATUS_FILE_CLOSED
    assert not opened_pipes(lab, conn)
    assert not lab.records("rpc.bind", conn=conn)
    assert not lab.records("rpc.bind", conn=owner_conn)     # nothing reached the owner's pipe
    assert wait_records(lab, "smb.refused", conn=conn)[-1]["reason"] == "unknown_file"


def test_pipe_open_on_a_tree_that_is_not_ipc(lab):
    client, conn = smb(lab)
    assert client.login("alice", lab.password("alice")).status == 0
    r = client.tree_connect("C$")
    assert r.status == nt_errors.STATUS_BAD_NETWORK_NAME
    assert client.create(r.packet["TreeID"] or 1).status == NAME_DELETED
    assert client.create(0x1234).status == NAME_DELETED
    assert not connected_trees(lab, conn)
    assert not opened_pipes(lab, conn)
    trees = wait_records(lab, "smb.tree_connect", conn=conn)
    assert trees[-1]["result"] == "bad_network_name" and trees[-1]["share"] == "C$"


def test_forged_signature(lab):
    client, conn = smb(lab)
    assert client.login("alice", lab.password("alice")).status == 0
    client.signing_key = b"\x00" * 16
    assert client.tree_connect().status == nt_errors.STATUS_ACCESS_DENIED
    assert not connected_trees(lab, conn)
    bad = [m for m in wait_records(lab, "malformed", conn=conn) if m["reason"] == "bad_signature"]
    assert bad


# ---------------------------------------------------------------------- signing required

@pytest.fixture(scope="module")
def signing_lab():
    with Lab(lab_config(smb_signing_required=True)) as running:
        yield running


def test_unsigned_requests_when_signing_is_required(signing_lab):
    client, conn = smb(signing_lab)
    assert client.login("alice", signing_lab.password("alice")).status == 0
    assert client.tree_connect(sign=False).status == nt_errors.STATUS_ACCESS_DENIED
    assert not connected_trees(signing_lab, conn)
    tid = client.tree_connect().packet["TreeID"]        # signed: served
    assert client.create(tid, sign=False).status == nt_errors.STATUS_ACCESS_DENIED
    assert not opened_pipes(signing_lab, conn)
    unsigned = [m for m in wait_records(signing_lab, "malformed", conn=conn) if m["reason"] == "unsigned_request"]
    assert len(unsigned) == 2


def test_smb2_create_with_a_leading_backslash_names_no_pipe(lab):
    """SMB2 paths are relative to the share (MS-SMB2 2.2.13): `\\emsmdb` is not a pipe, as on
    Windows and Samba (smbtorture's rpc.samba3.smb2-pipe-name); `emsmdb` is."""
    client, conn = smb(lab)
    assert client.login("alice", lab.password("alice")).status == 0
    tid = client.tree_connect().packet["TreeID"]
    assert client.create(tid, "\\emsmdb").status == nt_errors.STATUS_OBJECT_NAME_NOT_FOUND
    [refused] = wait_records(lab, "smb.pipe_open", conn=conn)
    assert (refused["result"], refused["reason"], refused["pipe"]) == ("not_found", "leading_separator", "\\emsmdb")
    assert client.create(tid, "emsmdb").status == 0
    assert [p["pipe"] for p in opened_pipes(lab, conn)] == ["emsmdb"]
