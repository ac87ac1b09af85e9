"""Negative matrix, DCE/RPC over ncacn_ip_tcp: NTLM in the bind (MS-RPCE 3.3.1.5.2, MS-NLMP 3.2).

Every case drives the real EMSMDB listener with crafted PDUs and asserts two things: the server
granted nothing (no ecSuccess EcDoConnect, no authenticated rpc.identity) and it said why in an
event.
"""

from __future__ import annotations

import struct

import pytest
from impacket import ntlm
from impacket.spnego import SPNEGO_NegTokenInit, TypesMech

from emulator.lab import Lab

from helpers import (AUTHN_KERBEROS, AUTHN_SPNEGO, AUTHN_WINNT, BIND_NAK, FAULT,
                     LEVEL_CONNECT, LEVEL_INTEGRITY, LEVEL_PRIVACY, NCA_S_PROTO_ERROR, NCA_S_UNK_IF,
                     OP_EC_DO_CONNECT, ALTER_CONTEXT, EMSMDB_SYNTAX, Authenticate, RawRpc,
                     anonymous_authenticate, authenticate_message, bind_body, conn_of, dn,
                     ec_do_connect_stub, granted_connects, negotiate_message, ntlm_bind, pdu,
                     wait_closed, wait_records, lab_config)


def rpc(lab) -> tuple[RawRpc, str]:
    client = RawRpc(lab.ports["emsmdb"])
    return client, conn_of(lab, client.sock)


def try_connect(client: RawRpc, user: str = "bob"):
    """EcDoConnect on the bound context; returns the answer PDU (None when the server hung up)."""
    return client.call(OP_EC_DO_CONNECT, ec_do_connect_stub(dn(user)))


def assert_refused_logon(lab, client: RawRpc, conn: str, reason: str, user: str = "bob") -> None:
    answer = try_connect(client, user)
    assert answer is None or answer.ptype == FAULT
    assert not granted_connects(lab, conn)
    assert not lab.records("emsmdb.connect", conn=conn)
    auths = wait_records(lab, "ntlm.authenticate", conn=conn)
    assert auths and auths[-1]["result"] == reason
    binds = lab.records("rpc.bind", conn=conn)
    assert binds and binds[-1]["result"] == reason
    assert not [r for r in lab.records("rpc.identity", conn=conn) if r["source"] == "rpc_auth"]
    faults = lab.records("rpc.fault", conn=conn)
    assert faults and faults[-1]["reason"] == "auth_failed"


# ---------------------------------------------------------------------- credentials

def test_rpc_bind_wrong_password(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", "not-bobs-password")
    assert_refused_logon(lab, client, conn, "wrong_password")


def test_rpc_bind_unknown_user(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "zed", "whatever")
    assert_refused_logon(lab, client, conn, "unknown_user")


def test_rpc_bind_disabled_user(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "mallory", lab.password("mallory"))
    assert_refused_logon(lab, client, conn, "disabled", user="mallory")


def test_rpc_bind_anonymous_forbidden(lab):
    client, conn = rpc(lab)
    neg = negotiate_message()
    ack = client.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, anonymous_authenticate(neg, ack.auth_token))
    assert_refused_logon(lab, client, conn, "anonymous_forbidden")


def test_rpc_bind_guest_forbidden(lab):
    # Windows maps an unknown account to Guest only where the guest account is enabled.
    client, conn = rpc(lab)
    ntlm_bind(client, "Guest", "")
    assert_refused_logon(lab, client, conn, "unknown_user")
    assert not [r for r in lab.records("ntlm.authenticate", conn=conn) if r["ntlm_version"] == "guest"]


def test_rpc_bind_ntlmv1_forbidden(lab):
    # impacket.ntlm's USE_NTLMv2 module flag is read as a default argument at import time, so
    # the v1 response is asked for explicitly.
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), ntlmv2=False, mic=False)
    assert_refused_logon(lab, client, conn, "ntlmv1_forbidden")


def lm_only(auth: Authenticate, challenge: bytes, password: str) -> bytes:
    """The AUTHENTICATE with an LM response alone (MS-NLMP 3.3.1: LMOWFv1 over the server
    challenge) and an empty NT response, without extended session security."""
    raw = bytearray(auth.raw)
    lm_len, _, lm_offset = struct.unpack_from("<HHI", raw, 12)
    assert lm_len == 24
    server_challenge = ntlm.NTLMAuthChallenge(challenge)["challenge"]
    raw[lm_offset:lm_offset + 24] = ntlm.get_ntlmv1_response(ntlm.compute_lmhash(password), server_challenge)
    struct.pack_into("<HH", raw, 20, 0, 0)                      # NtChallengeResponse: empty
    flags = struct.unpack_from("<I", raw, 60)[0] & ~ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY
    struct.pack_into("<I", raw, 60, flags & 0xFFFFFFFF)
    return bytes(raw)


def test_rpc_bind_lm_response_forbidden(lab):
    client, conn = rpc(lab)
    neg = negotiate_message(ntlmv2=False)
    ack = client.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))
    auth = authenticate_message(neg, ack.auth_token, "bob", lab.password("bob"), ntlmv2=False, mic=False)
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, lm_only(auth, ack.auth_token, lab.password("bob")))
    assert_refused_logon(lab, client, conn, "lm_forbidden")


# ---------------------------------------------------------------------- replay

def test_authenticate_replayed_on_a_later_connection(lab):
    first, first_conn = rpc(lab)
    _, token = ntlm_bind(first, "bob", lab.password("bob"))
    answer = try_connect(first)
    assert answer is not None and answer.ptype != FAULT   # the original exchange was good
    assert granted_connects(lab, first_conn)
    first.close()

    second, conn = rpc(lab)
    neg = negotiate_message()
    second.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))   # a fresh challenge
    second.auth3(AUTHN_WINNT, LEVEL_CONNECT, token)
    # The NTProofStr was computed over the first connection's challenge.
    assert_refused_logon(lab, second, conn, "wrong_password")


def test_authenticate_replayed_within_the_connection(lab):
    client, conn = rpc(lab)
    _, token = ntlm_bind(client, "alice", lab.password("alice"))
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, token)            # the same AUTHENTICATE again
    assert try_connect(client, "alice") is None                 # the server hung up
    assert not lab.records("emsmdb.connect", conn=conn)
    assert any(m["reason"] == "unexpected auth3" for m in wait_records(lab, "malformed", conn=conn))
    wait_closed(lab, conn)


def test_handshake_finished_on_another_connection(lab):
    """NEGOTIATE/CHALLENGE on one connection, AUTHENTICATE on a second that never bound."""
    started = RawRpc(lab.ports["emsmdb"])
    neg = negotiate_message()
    ack = started.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))
    auth = authenticate_message(neg, ack.auth_token, "bob", lab.password("bob"))
    other, conn = rpc(lab)
    other.auth3(AUTHN_WINNT, LEVEL_CONNECT, auth.raw)
    assert try_connect(other) is None
    assert not lab.records("emsmdb.connect", conn=conn)
    assert not lab.records("ntlm.authenticate", conn=conn)
    assert any(m["reason"] == "unexpected auth3" for m in wait_records(lab, "malformed", conn=conn))
    started_conn = conn_of(lab, started.sock)
    assert not lab.records("ntlm.authenticate", conn=started_conn)   # the first never completed
    started.close()


# ---------------------------------------------------------------------- tampering

def test_tampered_mic(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), tamper=lambda a: a.flipped(72 + 5))
    assert_refused_logon(lab, client, conn, "bad_mic")


def test_tampered_nt_proof_str(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), tamper=lambda a: a.flipped(a.nt_response_offset + 3))
    assert_refused_logon(lab, client, conn, "wrong_password")


def test_tampered_session_key(lab):
    # A flipped EncryptedRandomSessionKey yields another ExportedSessionKey: the MIC no longer
    # verifies (MS-NLMP 3.2.5.1.2).
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), tamper=lambda a: a.flipped(a.session_key_offset + 1))
    assert_refused_logon(lab, client, conn, "bad_mic")


def test_tampered_target_info(lab):
    """A correct NTLMv2 response, but computed over target info this server never sent."""
    client, conn = rpc(lab)
    neg = negotiate_message()
    ack = client.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))

    def rename(pairs: ntlm.AV_PAIRS) -> None:
        pairs[ntlm.NTLMSSP_AV_HOSTNAME] = "EVIL01".encode("utf-16-le")

    auth = authenticate_message(neg, ack.auth_token, "bob", lab.password("bob"), edit_pairs=rename)
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, auth.raw)
    assert_refused_logon(lab, client, conn, "bad_target_info")


def test_tampered_target_info_inside_the_blob(lab):
    """Flipping a byte of the echoed AV pairs after the response was computed breaks NTProofStr."""
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"),
              tamper=lambda a: a.flipped(a.nt_response_offset + 16 + 28 + 6))
    assert_refused_logon(lab, client, conn, "wrong_password")


def test_second_negotiate_after_challenge(lab):
    client, conn = rpc(lab)
    neg = negotiate_message()
    client.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, negotiate_message().getData())
    assert_refused_logon(lab, client, conn, "bad_state")


def test_oversized_authenticate(lab):
    client, conn = rpc(lab)
    neg = negotiate_message()
    ack = client.bind((AUTHN_WINNT, LEVEL_CONNECT, neg.getData()))
    auth = authenticate_message(neg, ack.auth_token, "bob", lab.password("bob"))
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, auth.raw + b"\x00" * 8000)
    assert try_connect(client) is None
    assert not lab.records("emsmdb.connect", conn=conn)
    assert not lab.records("ntlm.authenticate", conn=conn)
    assert wait_records(lab, "malformed", conn=conn)
    wait_closed(lab, conn)


# ---------------------------------------------------------------------- mechanisms

def test_kerberos_auth_type_is_refused(lab):
    client, conn = rpc(lab)
    answer = client.bind((AUTHN_KERBEROS, LEVEL_CONNECT, b"\x60\x00"))
    assert answer is not None and answer.ptype == BIND_NAK
    assert try_connect(client) is None or not granted_connects(lab, conn)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert lab.records("rpc.bind", conn=conn)[-1]["result"] == "unsupported_auth"


def test_spnego_offering_kerberos_only(lab):
    client, conn = rpc(lab)
    init = SPNEGO_NegTokenInit()
    init["MechTypes"] = [TypesMech["MS KRB5 - Microsoft Kerberos 5"], TypesMech["KRB5 - Kerberos 5"]]
    answer = client.bind((AUTHN_SPNEGO, LEVEL_CONNECT, init.getData()))
    assert answer is not None and answer.ptype == BIND_NAK
    assert not lab.records("emsmdb.connect", conn=conn)
    assert wait_records(lab, "spnego.accept", conn=conn)[-1]["result"] == "unsupported_mech"
    assert lab.records("rpc.bind", conn=conn)[-1]["result"] == "unsupported_mech"


# ---------------------------------------------------------------------- PDU order

def test_call_before_bind(lab):
    client, conn = rpc(lab)
    answer = try_connect(client)
    assert answer is not None and answer.fault_status == NCA_S_PROTO_ERROR
    assert not lab.records("emsmdb.connect", conn=conn)
    assert wait_records(lab, "rpc.fault", conn=conn)[-1]["reason"] == "no_bind"
    wait_closed(lab, conn)


def test_call_on_an_unbound_context_id(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"))
    answer = client.call(OP_EC_DO_CONNECT, ec_do_connect_stub(dn("bob")), ctx_id=7)
    assert answer is not None and answer.fault_status == NCA_S_UNK_IF
    assert not lab.records("emsmdb.connect", conn=conn)
    assert wait_records(lab, "rpc.fault", conn=conn)[-1]["reason"] == "unknown_context"


def test_call_on_a_context_whose_auth_failed(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "alice", "not-alices")
    answer = try_connect(client, "alice")
    assert answer is not None and answer.ptype == FAULT
    assert not lab.records("emsmdb.connect", conn=conn)
    fault = wait_records(lab, "rpc.fault", conn=conn)[-1]
    assert fault["reason"] == "auth_failed"
    wait_closed(lab, conn)


def test_auth3_without_a_bind(lab):
    client, conn = rpc(lab)
    client.auth3(AUTHN_WINNT, LEVEL_CONNECT, negotiate_message().getData())
    assert try_connect(client) is None
    assert not lab.records("emsmdb.connect", conn=conn)
    assert any(m["reason"] == "unexpected auth3" for m in wait_records(lab, "malformed", conn=conn))
    wait_closed(lab, conn)


def test_unauthenticated_bind_on_tcp_is_below_policy(lab):
    # The default policy wants at least connect on ncacn_ip_tcp: a bare bind gets a bind_nak.
    client, conn = rpc(lab)
    answer = client.bind()
    assert answer is not None and answer.ptype == BIND_NAK
    assert try_connect(client) is None or not granted_connects(lab, conn)
    assert not lab.records("emsmdb.connect", conn=conn)
    assert lab.records("rpc.bind", conn=conn)[-1]["result"] == "below_policy"


# ---------------------------------------------------------------------- level policy

@pytest.fixture(scope="module")
def privacy_lab():
    with Lab(lab_config(min_auth_level={"ncacn_ip_tcp": "privacy", "ncacn_np": "none"})) as running:
        yield running


@pytest.mark.parametrize("level", [LEVEL_CONNECT, LEVEL_INTEGRITY], ids=["connect", "integrity"])
def test_bind_below_the_policy_level(privacy_lab, level):
    client, conn = rpc(privacy_lab)
    answer = client.bind((AUTHN_WINNT, level, negotiate_message().getData()))
    assert answer is not None and answer.ptype == BIND_NAK
    assert try_connect(client) is None or not granted_connects(privacy_lab, conn)
    assert not privacy_lab.records("emsmdb.connect", conn=conn)
    assert not privacy_lab.records("ntlm.challenge", conn=conn)     # no challenge was even issued
    assert privacy_lab.records("rpc.bind", conn=conn)[-1]["result"] == "below_policy"


def test_alter_context_cannot_downgrade_the_auth_level(lab):
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), LEVEL_PRIVACY)
    wait_records(lab, "rpc.identity", conn=conn)
    alter = pdu(ALTER_CONTEXT, client.next_call(), bind_body([(1, EMSMDB_SYNTAX)]),
                (AUTHN_WINNT, LEVEL_CONNECT, negotiate_message().getData()))
    answer = client.exchange(alter)
    assert answer is not None and answer.ptype == FAULT
    # The downgraded context was not added: a connect-level call on it is refused.
    call = client.call(OP_EC_DO_CONNECT, ec_do_connect_stub(dn("bob")), ctx_id=1)
    assert call is None or call.ptype == FAULT
    assert not lab.records("emsmdb.connect", conn=conn)
    downgrades = [r for r in lab.records("rpc.bind", conn=conn) if r.get("alter")]
    assert downgrades and downgrades[-1]["result"] == "downgrade"
    assert lab.records("rpc.fault", conn=conn)[0]["reason"] == "downgrade"


def test_alter_context_without_auth_does_not_strip_protection(lab):
    """An alter_context with no verifier on a privacy connection adds a context, but calls on it
    still need the privacy verifier: a bare request is faulted."""
    client, conn = rpc(lab)
    ntlm_bind(client, "bob", lab.password("bob"), LEVEL_PRIVACY)
    wait_records(lab, "rpc.identity", conn=conn)
    client.exchange(pdu(ALTER_CONTEXT, client.next_call(), bind_body([(1, EMSMDB_SYNTAX)])))
    call = client.call(OP_EC_DO_CONNECT, ec_do_connect_stub(dn("bob")), ctx_id=1)
    assert call is None or call.ptype == FAULT
    assert not lab.records("emsmdb.connect", conn=conn)
    verify = wait_records(lab, "rpc.verify", conn=conn)
    assert verify and verify[-1]["result"] == "missing_verifier"
