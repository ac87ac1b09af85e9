"""Kerberos at the RPC layer and on impacket's SMB sessions, with real clients.

impacket takes its tickets from a ccache that MIT kinit and kvno filled (KRB5CCNAME), so these
tests need no privileged port. impacket's own KDC client cannot be used against an MIT KDC:
its AS exchange rejects MIT's AS-REP (MIT tags the encrypted part EncTGSRepPart, which RFC 4120
5.4.2 lets clients accept) and MIT refuses its TGS-REQ authenticator's unkeyed checksum
(KRB_AP_ERR_INAPP_CKSUM), so the tickets come from MIT's client and the AP exchange, the part
the lab's servers see, from impacket. impacket 0.13 binds with Kerberos only through SPNEGO
(auth_type 9, its final AP-REP in alter_context); auth_type 16 over TCP, with the final AP-REP
in AUTH3 as Samba sends it or in alter_context, comes from MIT's own GSS-API initiator.
"""

from __future__ import annotations

import datetime

import pytest
from impacket.dcerpc.v5 import transport
from impacket.dcerpc.v5.rpcrt import (MSRPC_BINDACK, MSRPC_BINDNAK, MSRPC_FAULT, MSRPC_RESPONSE,
                                      RPC_C_AUTHN_GSS_KERBEROS, RPC_C_AUTHN_GSS_NEGOTIATE,
                                      RPC_C_AUTHN_LEVEL_PKT_INTEGRITY,
                                      RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
from impacket.smb3structs import SMB2_DIALECT_21, SMB2_DIALECT_30, SMB2_DIALECT_311
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect

from harness.cast import dn
from harness.kerberos import (HOSTNAME, MGMT, REALM, RawRpc, auth3_pdu, bind_pdu, gss_initiator,
                              kinit, kvno, sealed_request, unseal_response)

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
LEVELS = {"integrity": RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, "privacy": RPC_C_AUTHN_LEVEL_PKT_PRIVACY}
CASES = [("alice", 0), ("bob", 0x3F2), ("carol", 0)]   # alice may open carol's: a grant


@pytest.fixture(scope="module")
def alice(krb_lab):
    proc, ticket = kinit(krb_lab, "alice")
    assert proc.returncode == 0, proc.stderr
    for svc in ("host", "cifs"):
        got = kvno(ticket, f"{svc}/{HOSTNAME}@{REALM}")
        assert got.returncode == 0, got.stderr
    return ticket


@pytest.fixture
def alice_ccache(alice, monkeypatch):
    """impacket reads tickets from KRB5CCNAME, in this process."""
    monkeypatch.setenv("KRB5CCNAME", alice.path)
    monkeypatch.setenv("KRB5_CONFIG", alice.env["KRB5_CONFIG"])
    return alice


def conn_for(lab, sock) -> str:
    port = sock.getsockname()[1]
    return next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")


def impacket_tcp(lab, level, *, kdc="127.0.0.1"):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{HOSTNAME}[{lab.ports['emsmdb']}]")
    rt.setRemoteHost("127.0.0.1")
    rt.set_credentials("alice", "", REALM)
    rt.set_kerberos(True, kdc)
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_GSS_NEGOTIATE)
    dce.set_auth_level(level)
    dce.connect()
    dce.bind(EMSMDB)
    return dce, rt


def check_mailboxes(lab, dce, rt):
    conn = conn_for(lab, rt.get_socket())
    try:
        for mailbox, want in CASES:
            assert hEcDoConnect(dce, dn(mailbox))[0] == want, mailbox
    finally:
        dce.disconnect()
    connects = lab.records("emsmdb.connect", conn=conn)
    assert [c["status_name"] for c in connects] == ["ecSuccess", "ecLoginPerm", "ecSuccess"]
    assert {(c["acting_user"], c["identity_source"]) for c in connects} == {("CORP\\alice", "rpc_auth")}
    return conn


@pytest.mark.parametrize("level", list(LEVELS))
def test_impacket_spnego_kerberos_bind_over_tcp(krb_lab, alice_ccache, level):
    dce, rt = impacket_tcp(krb_lab, LEVELS[level])
    conn = check_mailboxes(krb_lab, dce, rt)
    binds = krb_lab.records("rpc.bind", conn=conn)
    assert [(b["auth_type"], b["auth_level"], b["result"]) for b in binds] == [("spnego", level, "ok")]
    ident = krb_lab.records("rpc.identity", conn=conn)[-1]
    assert (ident["user"], ident["auth_layer"], ident["mechanism"]) == (
        "alice", "rpc_bind/spnego-kerberos", "spnego-kerberos")
    accepted = krb_lab.records("kerberos.accept", conn=conn)
    assert [(a["result"], a["dce_style"], a["legs"]) for a in accepted] == [("ok", True, 2)]
    assert not [v for v in krb_lab.records("rpc.verify", conn=conn) if v["result"] != "ok"]


@pytest.mark.parametrize("dialect", [SMB2_DIALECT_21, SMB2_DIALECT_30, SMB2_DIALECT_311],
                         ids=["2.1", "3.0", "3.1.1"])
def test_impacket_kerberos_smb_session_and_a_pipe_inherit_it(krb_lab, alice_ccache, dialect):
    """The KB's named-pipe half with a Kerberos SMB session: a bind without auth acts as the
    session's user."""
    smb = SMBConnection(HOSTNAME, "127.0.0.1", sess_port=krb_lab.ports["smb"],
                        preferredDialect=dialect, timeout=10)
    smb.kerberosLogin("alice", "", REALM, kdcHost="127.0.0.1", useCache=True)
    conn = conn_for(krb_lab, smb.getSMBServer().get_socket())
    rt = transport.SMBTransport("127.0.0.1", krb_lab.ports["smb"], r"\emsmdb", smb_connection=smb)
    dce = rt.get_dce_rpc()
    dce.connect()
    dce.bind(EMSMDB)
    try:
        for mailbox, want in CASES:
            assert hEcDoConnect(dce, dn(mailbox))[0] == want, mailbox
    finally:
        dce.disconnect()
        smb.logoff()
    setup = krb_lab.records("smb.session_setup", conn=conn)[-1]
    assert (setup["result"], setup["user"]) == ("ok", "alice")
    assert krb_lab.records("kerberos.accept", conn=conn)[-1]["service"] == f"cifs/{HOSTNAME}@{REALM}"
    connects = krb_lab.records("emsmdb.connect", conn=conn)
    assert {(c["acting_user"], c["identity_source"]) for c in connects} == {("CORP\\alice", "smb_session")}
    ident = krb_lab.records("rpc.identity", conn=conn)[-1]
    assert ident["source"] == "smb_session"


# ---------------------------------------------------------------- auth_type 16 with MIT's GSS-API

def krb5_bind(lab, ticket, *, level=6, token=None):
    """Bind to the management interface on the EMSMDB port with auth_type 16; returns the
    connection, the initiator, the first answer and the lab's connection id."""
    ctx = gss_initiator(ticket, f"host@{HOSTNAME}")
    ap_req = ctx.step() if token is None else token
    rpc = RawRpc(lab.ports["emsmdb"])
    rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_KERBEROS, level, ap_req))
    answer = rpc.recv()
    return rpc, ctx, ap_req, answer, conn_for(lab, rpc.sock)


@pytest.mark.parametrize("final_leg", ["auth3", "alter_context"])
def test_auth_type_16_three_legs_then_sealed_calls(krb_lab, alice, final_leg):
    rpc, ctx, _, ack, conn = krb5_bind(krb_lab, alice)
    try:
        assert ack["type"] == MSRPC_BINDACK
        client_ap_rep = ctx.step(ack["auth_data"])        # MIT checks the server's AP-REP
        assert ctx.complete
        if final_leg == "auth3":
            rpc.send(auth3_pdu(RPC_C_AUTHN_GSS_KERBEROS, 6, client_ap_rep))
        else:
            rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_KERBEROS, 6, client_ap_rep, call_id=2, alter=True))
            assert rpc.recv()["type"] == 15               # alter_context_resp
        rpc.send(sealed_request(ctx, RPC_C_AUTHN_GSS_KERBEROS, 0, b"", call_id=3))
        resp = rpc.recv()
        assert resp["type"] == MSRPC_RESPONSE
        stub = unseal_response(ctx, resp)                 # MIT verifies the server's wrap token
        assert stub[-4:] == b"\x00\x00\x00\x00"           # inq_if_ids: error_status_t 0
    finally:
        rpc.close()
    ident = krb_lab.records("rpc.identity", conn=conn)[-1]
    assert (ident["user"], ident["auth_layer"]) == ("alice", "rpc_bind/kerberos")


def test_replayed_ap_req_is_refused(krb_lab, alice):
    rpc, _, ap_req, ack, _ = krb5_bind(krb_lab, alice)
    rpc.close()
    assert ack["type"] == MSRPC_BINDACK
    again, _, _, nak, conn = krb5_bind(krb_lab, alice, token=ap_req)
    again.close()
    assert nak["type"] == MSRPC_BINDNAK
    refused = krb_lab.records("kerberos.accept", conn=conn)
    assert [r["result"] for r in refused] == ["replay"]
    assert krb_lab.records("rpc.bind", conn=conn)[-1]["result"] == "replay"


def test_tampered_authenticator_is_refused(krb_lab, alice):
    ctx = gss_initiator(alice, f"host@{HOSTNAME}")
    ap_req = bytearray(ctx.step())
    ap_req[-20] ^= 0x40                    # inside the authenticator's ciphertext (and its HMAC)
    rpc, _, _, nak, conn = krb5_bind(krb_lab, alice, token=bytes(ap_req))
    rpc.close()
    assert nak["type"] == MSRPC_BINDNAK
    assert [r["result"] for r in krb_lab.records("kerberos.accept", conn=conn)] == ["bad_integrity"]


def test_missing_final_ap_rep_is_refused(krb_lab, alice):
    """The client skips its AP-REP (no AUTH3, no alter_context) and calls at once."""
    rpc, ctx, _, ack, conn = krb5_bind(krb_lab, alice)
    try:
        assert ack["type"] == MSRPC_BINDACK
        ctx.step(ack["auth_data"])
        rpc.send(sealed_request(ctx, RPC_C_AUTHN_GSS_KERBEROS, 0, b"", call_id=2))
        fault = rpc.recv()
        assert fault is not None and fault["type"] == MSRPC_FAULT
    finally:
        rpc.close()
    faults = krb_lab.records("rpc.fault", conn=conn)
    assert faults and faults[-1]["reason"] == "auth_incomplete"
    assert not krb_lab.records("rpc.identity", conn=conn)
    assert not krb_lab.records("emsmdb.connect", conn=conn)


def test_a_bogus_final_ap_rep_is_refused(krb_lab, alice):
    rpc, _, _, ack, conn = krb5_bind(krb_lab, alice)
    try:
        assert ack["type"] == MSRPC_BINDACK
        # An AP-REP's outer tag with nothing MIT can decrypt inside.
        rpc.send(auth3_pdu(RPC_C_AUTHN_GSS_KERBEROS, 6, bytes.fromhex("6f0a3008a003020105a103020100")))
        rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_KERBEROS, 6, b"\x00" * 8, call_id=2, alter=True))
        answer = rpc.recv()
        assert answer is None or answer["type"] == MSRPC_FAULT
    finally:
        rpc.close()
    refused = krb_lab.records("kerberos.accept", conn=conn)
    assert refused and refused[-1]["result"] not in ("ok", "continue")
    assert krb_lab.records("rpc.bind", conn=conn)[-1]["result"] != "ok"
    assert not krb_lab.records("rpc.identity", conn=conn)


def test_tampered_wrap_token_is_refused(krb_lab, alice):
    rpc, ctx, _, ack, conn = krb5_bind(krb_lab, alice)
    try:
        rpc.send(auth3_pdu(RPC_C_AUTHN_GSS_KERBEROS, 6, ctx.step(ack["auth_data"])))
        rpc.send(sealed_request(ctx, RPC_C_AUTHN_GSS_KERBEROS, 0, b"\x00" * 16, call_id=3, tamper=True))
        fault = rpc.recv()
        assert fault is not None and fault["type"] == MSRPC_FAULT
    finally:
        rpc.close()
    verify = krb_lab.records("rpc.verify", conn=conn)
    assert verify and verify[-1]["result"] == "bad_seal"
    assert not krb_lab.records("rpc.request", conn=conn)


def test_clock_skew_beyond_policy_is_refused(krb_lab, alice_ccache, monkeypatch):
    """impacket's authenticator, written by a client whose clock is an hour behind (MIT's
    default allowed skew is five minutes)."""
    from impacket.krb5 import kerberosv5

    class SlowClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) - datetime.timedelta(hours=1)

    real = datetime

    class ClockModule:
        datetime = SlowClock
        timezone = real.timezone
        timedelta = real.timedelta

    monkeypatch.setattr(kerberosv5, "datetime", ClockModule)
    _, _, blob = kerberosv5.getKerberosType1("alice", "", REALM, "", "", "", None, None, HOSTNAME,
                                             "127.0.0.1")
    rpc = RawRpc(krb_lab.ports["emsmdb"])
    try:
        rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_NEGOTIATE, 6, blob))
        nak = rpc.recv()
        conn = conn_for(krb_lab, rpc.sock)
    finally:
        rpc.close()
    assert nak["type"] == MSRPC_BINDNAK
    assert [r["result"] for r in krb_lab.records("kerberos.accept", conn=conn)] == ["clock_skew"]


# ---------------------------------------------------------------- SPNEGO around Kerberos

def spnego_init(mechs, token: bytes) -> bytes:
    from impacket.spnego import SPNEGO_NegTokenInit

    init = SPNEGO_NegTokenInit()
    init["MechTypes"] = list(mechs)
    init["MechToken"] = token
    return init.getData()


def spnego_resp(token: bytes, mic: bytes | None) -> bytes:
    from impacket.spnego import SPNEGO_NegTokenResp

    resp = SPNEGO_NegTokenResp()
    resp["ResponseToken"] = token
    if mic is not None:
        resp["mechListMIC"] = mic
    return resp.getData()


def mech_list_der(mechs) -> bytes:
    body = b"".join(b"\x06" + bytes([len(m)]) + m for m in mechs)
    return b"\x30" + bytes([len(body)]) + body


@pytest.mark.parametrize("tamper", [False, True], ids=["valid", "tampered"])
def test_spnego_mech_list_mic_is_checked_and_answered(krb_lab, alice, tamper):
    """MIT's initiator under SPNEGO (auth_type 9), DCE style, with a mechListMIC in its final
    negTokenResp: a valid one is verified and answered with the server's own, which MIT then
    verifies; a tampered one ends the context."""
    from impacket.spnego import SPNEGO_NegTokenResp, TypesMech

    mechs = [TypesMech["MS KRB5 - Microsoft Kerberos 5"], TypesMech["KRB5 - Kerberos 5"]]
    ctx = gss_initiator(alice, f"host@{HOSTNAME}")
    rpc = RawRpc(krb_lab.ports["emsmdb"])
    try:
        rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_NEGOTIATE, 6, spnego_init(mechs, ctx.step())))
        ack = rpc.recv()
        conn = conn_for(krb_lab, rpc.sock)
        assert ack["type"] == MSRPC_BINDACK
        final = ctx.step(SPNEGO_NegTokenResp(ack["auth_data"])["ResponseToken"])
        mic = ctx.get_signature(mech_list_der(mechs))
        if tamper:
            mic = mic[:-1] + bytes([mic[-1] ^ 1])
        rpc.send(bind_pdu(MGMT, RPC_C_AUTHN_GSS_NEGOTIATE, 6, spnego_resp(final, mic), call_id=2,
                          alter=True))
        answer = rpc.recv()
    finally:
        rpc.close()
    accepts = krb_lab.records("spnego.accept", conn=conn)
    if tamper:
        assert answer is None or answer["type"] == MSRPC_FAULT
        assert accepts[-1]["result"] == "bad_mic"
        assert not krb_lab.records("rpc.identity", conn=conn)
        return
    assert answer["type"] == 15
    # impacket's parser wants a responseToken; this answer has only negState and the MIC.
    from emulator.ntlm import der

    fields = der.fields(der.read_exact(der.read_exact(answer["auth_data"], 0xA1).value, 0x30).value)
    server_mic = der.read_exact(fields[3].value, der.OCTET_STRING).value
    ctx.verify_signature(mech_list_der(mechs), server_mic)     # raises unless it verifies
    assert (accepts[-1]["result"], accepts[-1]["mech_list_mic"]) == ("ok", True)


def test_no_key_or_ticket_reaches_the_events(krb_lab, alice):
    import gssapi.raw as graw
    import json

    rpc, ctx, ap_req, ack, conn = krb5_bind(krb_lab, alice)
    try:
        rpc.send(auth3_pdu(RPC_C_AUTHN_GSS_KERBEROS, 6, ctx.step(ack["auth_data"])))
        rpc.send(sealed_request(ctx, RPC_C_AUTHN_GSS_KERBEROS, 0, b"", call_id=3))
        assert rpc.recv()["type"] == MSRPC_RESPONSE
    finally:
        rpc.close()
    key = graw.inquire_sec_context_by_oid(
        ctx, __import__("gssapi").OID.from_int_seq("1.2.840.113554.1.2.2.5.5"))[0]
    text = json.dumps(krb_lab.records(), default=str)
    for secret in (key, ap_req[-64:], ack["auth_data"][-32:]):
        assert secret.hex() not in text and secret.hex().upper() not in text
    assert conn in text
