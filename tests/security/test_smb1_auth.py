"""Negative matrix, SMB1 (NT LM 0.12 with extended security): what a Uid, Tid or Fid grants.

A Uid exists for use only once its SPNEGO exchange succeeded; a failed logon or a LOGOFF_ANDX
destroys it; Uids, Tids and Fids are scoped to the connection, session and tree that made them
(MS-CIFS 3.3.5.2); signing, once running or required, is enforced (MS-CIFS 3.3.5.2, MS-SMB
3.3.5.3). Each case asserts the NT status answered, that nothing was granted, and the event
that says why.
"""

from __future__ import annotations

import struct

import pytest
from impacket import nt_errors
from impacket.spnego import SPNEGO_NegTokenResp

from emulator.lab import Lab
from emulator.smb import smb1_wire as w

from helpers import (BIND, EMSMDB_SYNTAX, RawSmb1, authenticate_message, bind_body, conn_of,
                     connected_trees, lab_config, negotiate_message, opened_pipes, pdu, smb1_fid,
                     spnego_init, spnego_resp, wait_records)

SESSION_DELETED = nt_errors.STATUS_USER_SESSION_DELETED
LOGON_FAILURE = nt_errors.STATUS_LOGON_FAILURE
ACCESS_DENIED = nt_errors.STATUS_ACCESS_DENIED
BAD_TID = w.STATUS_SMB_BAD_TID                 # MS-CIFS 2.2.2.4: ERRSRV/ERRinvtid
INVALID_HANDLE = nt_errors.STATUS_INVALID_HANDLE
MADE_UP_UID, MADE_UP_TID, MADE_UP_FID = 0x1234, 0x4321, 0x2468


def smb1(lab) -> tuple[RawSmb1, str]:
    client = RawSmb1(lab.ports["smb"])
    return client, conn_of(lab, client.sock)


def rpc_bind() -> bytes:
    return pdu(BIND, 1, bind_body([(0, EMSMDB_SYNTAX)]))


def assert_nothing_granted(lab, conn: str) -> None:
    assert not connected_trees(lab, conn)
    assert not opened_pipes(lab, conn)
    assert not lab.records("rpc.bind", conn=conn)


def refusals(lab, conn: str, count: int) -> list[tuple[str, str, str]]:
    """(command, reason, status) of the connection's smb.refused events, once `count` exist."""
    found = wait_records(lab, "smb.refused", conn=conn)
    assert len(found) == count, found
    return [(r["command"], r["reason"], r["status"]) for r in found]


def logged_on(lab, user: str = "alice") -> tuple[RawSmb1, str]:
    client, conn = smb1(lab)
    _, final = client.login(user, lab.password(user))
    assert final is not None and final.status == 0
    return client, conn


def pipe_owner(lab) -> tuple[RawSmb1, str, int, int]:
    """Connection A: alice logged on, IPC$ connected, \\emsmdb open. Returns (client, conn, tid, fid)."""
    owner, conn = logged_on(lab)
    tree = owner.tree_connect()
    assert tree.status == 0
    opened = owner.nt_create(tree.tid)
    assert opened.status == 0
    return owner, conn, tree.tid, smb1_fid(opened)


# ---------------------------------------------------------------------- before any session setup

def test_tree_connect_before_session_setup(lab):
    client, conn = smb1(lab)
    client.negotiate()
    assert client.tree_connect(uid=0).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert refusals(lab, conn, 1) == [("TREE_CONNECT_ANDX", "no_session", "STATUS_USER_SESSION_DELETED")]


def test_nt_create_before_session_setup(lab):
    client, conn = smb1(lab)
    client.negotiate()
    assert client.nt_create(MADE_UP_TID, uid=MADE_UP_UID).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    [refused] = wait_records(lab, "smb.refused", conn=conn)
    assert (refused["command"], refused["reason"]) == ("NT_CREATE_ANDX", "no_session")
    assert (refused["uid"], refused["tid"]) == (MADE_UP_UID, MADE_UP_TID)


# ---------------------------------------------------------------------- a failed or unfinished setup

def failed_logon(lab) -> tuple[RawSmb1, str, int]:
    """A wrong-password logon; returns the Uid handed out in its MORE_PROCESSING_REQUIRED leg."""
    client, conn = smb1(lab)
    first, final = client.login("alice", "not-alices")
    assert final is not None and final.status == LOGON_FAILURE
    assert first.uid != 0 and final.uid == first.uid
    setups = wait_records(lab, "smb.session_setup", conn=conn)
    assert [s["result"] for s in setups] == ["wrong_password"]
    return client, conn, first.uid


def test_tree_connect_after_failed_session_setup(lab):
    client, conn, dead_uid = failed_logon(lab)
    assert client.tree_connect(uid=dead_uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert refusals(lab, conn, 1) == [("TREE_CONNECT_ANDX", "no_session", "STATUS_USER_SESSION_DELETED")]


def test_nt_create_after_failed_session_setup(lab):
    client, conn, dead_uid = failed_logon(lab)
    assert client.nt_create(MADE_UP_TID, uid=dead_uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert refusals(lab, conn, 1) == [("NT_CREATE_ANDX", "no_session", "STATUS_USER_SESSION_DELETED")]


def test_session_setup_continued_on_a_failed_uid(lab):
    """The right password sent on the Uid of a failed logon does not revive it."""
    client, conn, dead_uid = failed_logon(lab)
    neg = negotiate_message()
    first = client.session_setup(spnego_init(neg.getData()))
    challenge = challenge_of(first)
    auth = authenticate_message(neg, challenge, "alice", lab.password("alice"), mic=False)
    assert client.session_setup(spnego_resp(auth.raw), uid=dead_uid).status == SESSION_DELETED
    assert client.tree_connect(uid=dead_uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert [r[:2] for r in refusals(lab, conn, 2)] == [("SESSION_SETUP_ANDX", "no_session"),
                                                       ("TREE_CONNECT_ANDX", "no_session")]
    assert [s["result"] for s in lab.records("smb.session_setup", conn=conn)] == ["wrong_password"]


def challenge_of(first) -> bytes:
    blob_len = struct.unpack_from("<H", first.words, 6)[0]
    return SPNEGO_NegTokenResp(first.data[:blob_len])["ResponseToken"]


def test_tree_connect_on_an_unfinished_session_setup(lab):
    """Between the two legs the Uid exists but carries no identity: nothing rides on it."""
    client, conn = smb1(lab)
    client.negotiate()
    first = client.session_setup(spnego_init(negotiate_message().getData()))
    assert first.status == nt_errors.STATUS_MORE_PROCESSING_REQUIRED
    assert client.tree_connect(uid=first.uid).status == ACCESS_DENIED
    assert client.nt_create(MADE_UP_TID, uid=first.uid).status == ACCESS_DENIED
    assert_nothing_granted(lab, conn)
    assert [r[:2] for r in refusals(lab, conn, 2)] == [("TREE_CONNECT_ANDX", "no_session"),
                                                       ("NT_CREATE_ANDX", "no_session")]
    assert not lab.records("smb.session_setup", conn=conn)


def test_session_setup_finished_on_another_connection(lab):
    """A's NEGOTIATE leg, B's AUTHENTICATE leg on A's Uid: B has no such Uid, A never completes."""
    owner, owner_conn = smb1(lab)
    owner.negotiate()
    neg = negotiate_message()
    first = owner.session_setup(spnego_init(neg.getData()))
    auth = authenticate_message(neg, challenge_of(first), "alice", lab.password("alice"), mic=False)
    thief, conn = smb1(lab)
    thief.negotiate()
    assert thief.session_setup(spnego_resp(auth.raw), uid=first.uid).status == SESSION_DELETED
    assert thief.tree_connect(uid=first.uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert [r[:2] for r in refusals(lab, conn, 2)] == [("SESSION_SETUP_ANDX", "no_session"),
                                                       ("TREE_CONNECT_ANDX", "no_session")]
    assert not lab.records("ntlm.authenticate", conn=conn)
    assert not lab.records("ntlm.authenticate", conn=owner_conn)


# ---------------------------------------------------------------------- after LOGOFF_ANDX

def test_tree_connect_after_logoff(lab):
    client, conn = logged_on(lab)
    uid = client.uid
    assert client.logoff().status == 0
    assert wait_records(lab, "smb.logoff", conn=conn)
    assert client.tree_connect(uid=uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert refusals(lab, conn, 1) == [("TREE_CONNECT_ANDX", "no_session", "STATUS_USER_SESSION_DELETED")]


def test_nt_create_after_logoff(lab):
    client, conn = logged_on(lab)
    tree = client.tree_connect()
    assert tree.status == 0
    assert client.logoff().status == 0
    # The tree went with the session (MS-CIFS 3.3.5.6): its Tid opens nothing.
    assert client.nt_create(tree.tid).status == SESSION_DELETED
    assert not opened_pipes(lab, conn)
    assert not lab.records("rpc.bind", conn=conn)
    assert refusals(lab, conn, 1) == [("NT_CREATE_ANDX", "no_session", "STATUS_USER_SESSION_DELETED")]


# ---------------------------------------------------------------------- ids from another connection

def test_uid_tid_fid_from_another_connection(lab):
    """B, never logged on, sends A's Uid, Tid and Fid in WRITE_ANDX, TRANSACTION and NT_CREATE."""
    owner, owner_conn, tid, fid = pipe_owner(lab)
    thief, conn = smb1(lab)
    thief.negotiate()
    assert thief.write_andx(tid, fid, rpc_bind(), uid=owner.uid).status == SESSION_DELETED
    assert thief.transact_pipe(tid, fid, rpc_bind(), uid=owner.uid).status == SESSION_DELETED
    assert thief.nt_create(tid, uid=owner.uid).status == SESSION_DELETED
    assert_nothing_granted(lab, conn)
    assert not lab.records("rpc.bind", conn=owner_conn)      # nothing reached A's pipe
    assert [r[:2] for r in refusals(lab, conn, 3)] == [
        ("WRITE_ANDX", "no_session"), ("TRANSACTION", "no_session"), ("NT_CREATE_ANDX", "no_session")]


def thief_with_own_tree(lab, owner_tid: int) -> tuple[RawSmb1, str, int]:
    """Connection B logged on as bob with its own IPC$ tree. Tids start at a random base per
    connection; B reconnects in the (1 in 65534) case that its own Tid equals A's, so that A's
    Tid is foreign to B. B opens nothing, so every Fid is foreign to it."""
    for _ in range(4):
        thief, conn = logged_on(lab, "bob")
        tree = thief.tree_connect()
        assert tree.status == 0
        if tree.tid != owner_tid:
            return thief, conn, tree.tid
        thief.close()
    raise AssertionError("four connections in a row drew A's Tid")


def test_tid_from_another_connection(lab):
    owner, owner_conn, tid, fid = pipe_owner(lab)
    thief, conn, _ = thief_with_own_tree(lab, tid)
    assert thief.nt_create(tid).status == BAD_TID
    assert not opened_pipes(lab, conn)
    assert refusals(lab, conn, 1) == [("NT_CREATE_ANDX", "no_tree", "STATUS_SMB_BAD_TID")]


def test_fid_from_another_connection(lab):
    """B (bob, own tree) writes an RPC bind to A's Fid and transacts on it: B opened nothing,
    so the Fid is unknown there, and nothing reaches alice's pipe on A."""
    owner, owner_conn, tid, fid = pipe_owner(lab)
    thief, conn, thief_tid = thief_with_own_tree(lab, tid)
    assert thief.write_andx(thief_tid, fid, rpc_bind()).status == INVALID_HANDLE
    assert thief.transact_pipe(thief_tid, fid, rpc_bind()).status == INVALID_HANDLE
    assert not opened_pipes(lab, conn)
    assert not lab.records("rpc.bind", conn=conn)
    assert not lab.records("rpc.bind", conn=owner_conn)
    refused = refusals(lab, conn, 2)
    assert refused == [("WRITE_ANDX", "unknown_file", "STATUS_INVALID_HANDLE"),
                       ("TRANSACTION", "unknown_file", "STATUS_INVALID_HANDLE")]
    # A's pipe is still A's and still serves.
    assert owner.transact_pipe(tid, fid, rpc_bind()).status == 0
    assert wait_records(lab, "rpc.bind", conn=owner_conn)[-1]["result"] == "ok"


# ---------------------------------------------------------------------- signing

def test_forged_signature(lab):
    client, conn = logged_on(lab)
    assert client.signing_key is not None
    assert client.tree_connect(key=b"\x11" * 16).status == ACCESS_DENIED
    assert not connected_trees(lab, conn)
    results = [s["result"] for s in wait_records(lab, "smb.signature", conn=conn)]
    assert results == ["bad_signature"]
    # The right key still works, so the refusal was the signature's.
    assert client.tree_connect().status == 0


@pytest.fixture(scope="module")
def signing_lab():
    with Lab(lab_config(smb_signing_required=True)) as running:
        yield running


def test_unsigned_requests_when_signing_is_required(signing_lab):
    lab = signing_lab
    client, conn = smb1(lab)
    # The client does not ask for signing; the policy starts it anyway.
    _, final = client.login("alice", lab.password("alice"), signing=False)
    assert final.status == 0 and client.signing_key is not None
    assert client.tree_connect(sign=False).status == ACCESS_DENIED
    assert not connected_trees(lab, conn)
    tree = client.tree_connect()                      # signed: served
    assert tree.status == 0
    assert client.nt_create(tree.tid, sign=False).status == ACCESS_DENIED
    assert not opened_pipes(lab, conn)
    results = [s["result"] for s in wait_records(lab, "smb.signature", conn=conn)]
    assert results == ["unsigned_request", "unsigned_request"]
    assert wait_records(lab, "smb.negotiate", conn=conn)[-1]["signing_required"] is True


# ---------------------------------------------------------------------- a tree that is not IPC$

def test_pipe_open_on_a_tree_that_is_not_ipc(lab):
    client, conn = logged_on(lab)
    r = client.tree_connect("C$")
    assert r.status == nt_errors.STATUS_BAD_NETWORK_NAME
    assert client.nt_create(r.tid or MADE_UP_TID).status == BAD_TID
    assert client.nt_create(MADE_UP_TID + 1).status == BAD_TID
    assert not connected_trees(lab, conn)
    assert not opened_pipes(lab, conn)
    trees = wait_records(lab, "smb.tree_connect", conn=conn)
    assert [(t["result"], t["share"]) for t in trees] == [("bad_network_name", "C$")]
    assert [r[:2] for r in refusals(lab, conn, 2)] == [("NT_CREATE_ANDX", "no_tree")] * 2


def test_smb1_nt_create_of_a_bare_pipe_prefix_names_no_pipe(lab):
    """On IPC$ the NT_CREATE_ANDX name follows the root's backslash: `pipe\\emsmdb` names
    nothing, as on Windows and Samba (smbtorture's rpc.samba3.smb1-pipe-name)."""
    client = RawSmb1(lab.ports["smb"])
    conn = conn_of(lab, client.sock)
    _, final = client.login("alice", lab.password("alice"))
    assert final is not None and final.status == 0
    tid = client.tree_connect().tid
    assert client.nt_create(tid, "pipe\\emsmdb").status == nt_errors.STATUS_OBJECT_NAME_NOT_FOUND
    [refused] = wait_records(lab, "smb.pipe_open", conn=conn)
    assert (refused["result"], refused["reason"]) == ("not_found", "pipe_prefix")
    assert client.nt_create(tid, "\\emsmdb").status == 0
