"""The SMB2 engine and the SMB connection dispatcher, against real peers and crafted bytes.

Real peers: impacket's SMBConnection (every dialect), Samba's smbclient, over loopback sockets
served by tests/harness' EngineServer feeding `SmbConnection`. Crafted bytes (built with
impacket's smb3structs) drive the dispatcher, compound handling and the malformed paths with no
network at all.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import socket
import struct
import subprocess

import pytest
from impacket import smb3structs as s3
from impacket.smbconnection import SMBConnection, SessionError

from emulator.events import Event
from emulator.smb import ntstatus as st
from emulator.smb import smb2_wire as w
from emulator.smb.pipe import PipeFactory
from emulator.smb.smb2_signing import Signer, kdf_counter_mode
from harness.smb_engines import ALICE_PW, CONFIG, FixedReplyEngine, SmbServer, fixed_reply_pipes, smb_connection
from harness.smb_raw import (nb, negotiate_body, negotiated, ntlm_login, packet, responses, tree_connect_body,
                             unframe)

REPLY = FixedReplyEngine.REPLY          # what the test pipe engine answers to each write


@pytest.fixture(scope="module")
def server():
    srv = SmbServer(CONFIG, fixed_reply_pipes)
    yield srv
    srv.stop()


# ================================================================ real peers: impacket

DIALECTS = [s3.SMB2_DIALECT_002, s3.SMB2_DIALECT_21, s3.SMB2_DIALECT_30,
            s3.SMB2_DIALECT_311]          # impacket cannot ask for 3.0.2 alone


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: hex(d))
def test_impacket_login_tree_pipe_roundtrip(server, dialect):
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=dialect)
    assert c.getDialect() == dialect
    c.login("alice", ALICE_PW, "CORP")
    tid = c.connectTree("IPC$")
    fid = c.openFile(tid, "\\srvsvc", desiredAccess=0x12019F, creationOption=0x40,
                     fileAttributes=0x80)
    c.writeFile(tid, fid, b"\x05\x00\x0b\x03" + b"x" * 68)
    assert c.readFile(tid, fid, 0, 4280) == REPLY
    # TransactNamedPipe goes through IOCTL FSCTL_PIPE_TRANSCEIVE.
    assert c._SMBConnection.TransactNamedPipe(tid, fid, b"ping") == REPLY
    c.closeFile(tid, fid)
    c.disconnectTree(tid)
    c.logoff()
    setups = [e for e in server.kinds("smb.session_setup") if e.get("result") == "ok"
              and e.get("dialect") == {0x202: "2.0.2", 0x210: "2.1", 0x300: "3.0",
                                        0x302: "3.0.2", 0x311: "3.1.1"}[dialect]]
    assert setups and setups[-1].get("user") == "alice"
    opened = [e for e in server.kinds("smb.pipe_open") if e.get("pipe") == "srvsvc"]
    assert opened[-1].get("smb_user") == "CORP\\alice"


def test_impacket_multi_protocol_negotiate(server):
    # No preferred dialect: impacket starts with an SMB1 NEGOTIATE offering SMB 2.002 and 2.???.
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port)
    assert c.getDialect() in (s3.SMB2_DIALECT_21, s3.SMB2_DIALECT_30, s3.SMB2_DIALECT_311,
                              s3.SMB2_DIALECT_302)
    c.login("alice", ALICE_PW, "CORP")
    tid = c.connectTree("IPC$")
    assert tid
    c.close()
    assert any(e.get("via") == "smb1" and e.get("dialect") == "2.???"
               for e in server.kinds("smb.negotiate"))


@pytest.fixture(scope="module")
def signing_server():
    from dataclasses import replace
    srv = SmbServer(replace(CONFIG, policy=replace(CONFIG.policy, smb_signing_required=True)), fixed_reply_pipes)
    yield srv
    srv.stop()


@pytest.mark.parametrize("dialect", [s3.SMB2_DIALECT_002, s3.SMB2_DIALECT_21, s3.SMB2_DIALECT_30],
                         ids=hex)
def test_impacket_with_signing_required_by_policy(signing_server, dialect):
    # The server's SIGNING_REQUIRED makes impacket sign every request; we verify each one and
    # sign every response, which impacket checks in turn.
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=signing_server.port, preferredDialect=dialect)
    c.login("alice", ALICE_PW, "CORP")
    tid = c.connectTree("IPC$")
    fid = c.openFile(tid, "\\srvsvc", desiredAccess=0x12019F, creationOption=0x40, fileAttributes=0x80)
    assert c._SMBConnection.TransactNamedPipe(tid, fid, b"ping") == REPLY
    c.close()
    ok = [e for e in signing_server.kinds("smb.session_setup") if e.get("result") == "ok"]
    assert ok[-1].get("signing") is True
    assert not signing_server.kinds("malformed")


@pytest.mark.parametrize("dialect", [s3.SMB2_DIALECT_21, s3.SMB2_DIALECT_311], ids=hex)
def test_impacket_wrong_password_is_logon_failure(server, dialect):
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=dialect)
    with pytest.raises(SessionError) as info:
        c.login("alice", "not-the-password", "CORP")
    assert info.value.getErrorCode() == st.STATUS_LOGON_FAILURE
    assert any(e.get("result") == "wrong_password" for e in server.kinds("smb.session_setup"))
    c.close()


def test_impacket_unknown_pipe_and_share(server):
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=s3.SMB2_DIALECT_30)
    c.login("alice", ALICE_PW, "CORP")
    with pytest.raises(SessionError) as info:
        c.connectTree("C$")
    assert info.value.getErrorCode() == st.STATUS_BAD_NETWORK_NAME
    tid = c.connectTree("ipc$")
    with pytest.raises(SessionError) as info:
        c.openFile(tid, "\\lsarpc", desiredAccess=0x12019F, creationOption=0x40, fileAttributes=0x80)
    assert info.value.getErrorCode() == st.STATUS_OBJECT_NAME_NOT_FOUND
    c.close()


def test_impacket_disabled_user_is_refused(server):
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=s3.SMB2_DIALECT_30)
    with pytest.raises(SessionError) as info:
        c.login("mallory", CONFIG.user("mallory").password, "CORP")
    assert info.value.getErrorCode() in (st.STATUS_LOGON_FAILURE, st.STATUS_ACCOUNT_DISABLED)
    c.close()


# ================================================================ real peers: Samba smbclient

smbclient = shutil.which("smbclient")


@pytest.mark.skipif(smbclient is None, reason="smbclient not installed")
@pytest.mark.parametrize("proto", ["SMB2_02", "SMB2_10", "SMB3_00", "SMB3_02", "SMB3_11"])
def test_smbclient_signed_session_and_wrong_password(server, proto):
    # --client-protection=sign makes Samba require signing: it signs every request and rejects
    # any response whose signature does not verify, so a working tree connect and a status for
    # 'ls' (IPC$ has no directory to list) prove our keys and signatures for this dialect.
    def run(password: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [smbclient, "//127.0.0.1/IPC$", "-p", str(server.port), "-U", f"CORP/alice%{password}",
             "-m", proto, "--client-protection=sign", "-c", "ls"],
            capture_output=True, text=True, timeout=30)

    before_tc = len(server.kinds("smb.tree_connect"))
    before_bad = len(server.kinds("malformed"))
    good = run(ALICE_PW)
    text = good.stdout + good.stderr
    assert "NT_STATUS_LOGON_FAILURE" not in text and "NT_STATUS_ACCESS_DENIED" not in text
    assert "NT_STATUS_OBJECT_NAME_NOT_FOUND" in text          # the listing, after a signed connect
    assert [e.get("result") for e in server.kinds("smb.tree_connect")[before_tc:]] == ["ok"]
    assert len(server.kinds("malformed")) == before_bad
    setup = [e for e in server.kinds("smb.session_setup") if e.get("result") == "ok"][-1]
    assert setup.get("signing") is True
    bad = run("wrong-password")
    assert "NT_STATUS_LOGON_FAILURE" in bad.stdout + bad.stderr
    assert bad.returncode != 0


# ================================================================ session security, raw bytes

def test_failed_session_grants_nothing():
    conn = negotiated()
    status, sid, events = ntlm_login(conn, "alice", "wrong")
    assert status == st.STATUS_LOGON_FAILURE
    assert any(e.kind == "smb.session_setup" and e.get("result") == "wrong_password" for e in events)
    # Replay a TREE_CONNECT with the failed SessionId: the half-made session is gone.
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)))
    assert responses(out)[0]["Status"] == st.STATUS_USER_SESSION_DELETED
    assert not out.close


def test_requests_without_session_and_foreign_ids():
    conn = negotiated()
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=1, sid=0)))
    assert responses(out)[0]["Status"] == st.STATUS_USER_SESSION_DELETED
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW, first_mid=2)
    assert status == st.STATUS_SUCCESS
    # A tree id this session never got, and a file id this connection never handed out.
    cr = s3.SMB2Create()
    cr["Buffer"] = "srvsvc".encode("utf-16-le")
    cr["NameLength"] = len(cr["Buffer"])
    out = conn.receive(nb(packet(s3.SMB2_CREATE, cr, mid=4, sid=sid, tid=77)))
    assert responses(out)[0]["Status"] == st.STATUS_NETWORK_NAME_DELETED
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=5, sid=sid)))
    r = responses(out)[0]
    assert r["Status"] == st.STATUS_SUCCESS
    tid = r["TreeID"]
    rd = s3.SMB2Read()
    rd["FileID"] = b"\x42" * 16
    rd["Length"] = 100
    out = conn.receive(nb(packet(s3.SMB2_READ, rd, mid=6, sid=sid, tid=tid)))
    assert responses(out)[0]["Status"] == st.STATUS_FILE_CLOSED
    # Another session id that does not exist on this connection.
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=7, sid=sid ^ 1)))
    assert responses(out)[0]["Status"] == st.STATUS_USER_SESSION_DELETED


def test_logoff_ends_the_session():
    conn = negotiated()
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    assert status == st.STATUS_SUCCESS
    lo = s3.SMB2Logoff()
    out = conn.receive(nb(packet(s3.SMB2_LOGOFF, lo, mid=3, sid=sid)))
    assert responses(out)[0]["Status"] == st.STATUS_SUCCESS
    assert any(e.kind == "smb.logoff" and e.get("user") == "alice" for e in out.events)
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=4, sid=sid)))
    assert responses(out)[0]["Status"] == st.STATUS_USER_SESSION_DELETED


def test_signing_required_by_policy_rejects_unsigned_and_forged():
    from dataclasses import replace
    cfg = replace(CONFIG, policy=replace(CONFIG.policy, smb_signing_required=True))
    conn = smb_connection(cfg)
    out = conn.receive(nb(packet(s3.SMB2_NEGOTIATE, negotiate_body((0x0210,)), mid=0)))
    neg = s3.SMB2Negotiate_Response(responses(out)[0]["Data"])
    assert neg["SecurityMode"] & s3.SMB2_NEGOTIATE_SIGNING_REQUIRED
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    assert status == st.STATUS_SUCCESS
    unsigned = packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)
    out = conn.receive(nb(unsigned))
    assert responses(out)[0]["Status"] == st.STATUS_ACCESS_DENIED
    assert any(e.kind == "malformed" and e.get("reason") == "unsigned_request" for e in out.events)
    forged = packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=4, sid=sid,
                    flags=s3.SMB2_FLAGS_SIGNED)
    forged = forged[:48] + b"\x13" * 16 + forged[64:]
    out = conn.receive(nb(forged))
    assert responses(out)[0]["Status"] == st.STATUS_ACCESS_DENIED
    assert any(e.get("reason") == "bad_signature" for e in out.events)


# ================================================================ dispatcher and framing

def test_multi_protocol_negotiate_wildcard_then_smb2():
    from impacket import smb as s1
    conn = smb_connection()
    pkt = s1.NewSMBPacket()
    neg = s1.SMBCommand(s1.SMB.SMB_COM_NEGOTIATE)
    neg["Data"] = b"\x02NT LM 0.12\x00\x02SMB 2.002\x00\x02SMB 2.???\x00"
    pkt.addCommand(neg)
    out = conn.receive(nb(pkt.getData()))
    r = responses(out)[0]
    assert r["Command"] == s3.SMB2_NEGOTIATE and r["MessageID"] == 0
    assert s3.SMB2Negotiate_Response(r["Data"])["DialectRevision"] == 0x02FF
    assert conn.protocol == "smb2"
    out = conn.receive(nb(packet(s3.SMB2_NEGOTIATE, negotiate_body(), mid=1)))
    r = responses(out)[0]
    assert s3.SMB2Negotiate_Response(r["Data"])["DialectRevision"] == 0x0302


def test_multi_protocol_negotiate_2002_only_settles_the_dialect():
    from impacket import smb as s1
    conn = smb_connection()
    pkt = s1.NewSMBPacket()
    neg = s1.SMBCommand(s1.SMB.SMB_COM_NEGOTIATE)
    neg["Data"] = b"\x02NT LM 0.12\x00\x02SMB 2.002\x00"
    pkt.addCommand(neg)
    out = conn.receive(nb(pkt.getData()))
    assert s3.SMB2Negotiate_Response(responses(out)[0]["Data"])["DialectRevision"] == 0x0202
    status, _, _ = ntlm_login(conn, "alice", ALICE_PW)
    assert status == st.STATUS_SUCCESS


def test_smb1_only_negotiate_goes_to_smb1_or_closes():
    from impacket import smb as s1
    conn = smb_connection()
    pkt = s1.NewSMBPacket()
    neg = s1.SMBCommand(s1.SMB.SMB_COM_NEGOTIATE)
    neg["Data"] = b"\x02NT LM 0.12\x00"
    pkt.addCommand(neg)
    out = conn.receive(nb(pkt.getData()))
    try:
        import emulator.smb.smb1  # noqa: F401
    except ImportError:
        assert out.close and any(e.get("reason") == "smb1_not_available" for e in out.events)
    else:
        assert conn.protocol == "smb1" and out.data[4:8] == b"\xffSMB"


def test_framing_any_split_keepalive_and_session_request():
    whole = b"\x85\x00\x00\x00" + nb(packet(s3.SMB2_NEGOTIATE, negotiate_body(), mid=0))
    conn = smb_connection()
    outs = [conn.receive(whole[i:i + 1]) for i in range(len(whole))]
    data = b"".join(o.data for o in outs)
    assert s3.SMB2Packet(unframe(data)[0])["Status"] == st.STATUS_SUCCESS
    # Port 139 style: a NetBIOS session request gets a positive response.
    conn = smb_connection()
    out = conn.receive(b"\x81\x00\x00\x44" + b"\x20" + b"A" * 32 + b"\x00" + b"\x20" + b"B" * 32 + b"\x00")
    assert out.data == b"\x82\x00\x00\x00" and not out.close


def test_huge_netbios_claim_closes_without_buffering():
    conn = smb_connection()
    out = conn.receive(b"\x00\xff\xff\xff" + b"A" * 100)
    assert out.close
    assert any(e.kind == "limit" for e in out.events)
    assert any(e.kind == "malformed" for e in out.events)
    assert conn.receive(b"more").close


@pytest.mark.parametrize("message, reason", [
    (b"\xfeSMX" + b"\x00" * 60, "bad_protocol_id"),
    (b"\xfeSMB" + b"\x10\x00" + b"\x00" * 58, "bad smb2 header StructureSize"),
    (b"\xfeSMB", "smb2 message shorter than its header"),
    (b"\xfdSMB" + b"\x00" * 60, "bad_protocol_id"),
])
def test_broken_headers_close_with_malformed(message, reason):
    conn = smb_connection()
    out = conn.receive(nb(message))
    assert out.close
    assert any(e.kind == "malformed" and e.get("reason") == reason for e in out.events)


def test_bad_structure_size_and_offsets_give_invalid_parameter():
    conn = negotiated()
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    good = packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)
    bad_size = good[:64] + b"\x07\x00" + good[66:]
    out = conn.receive(nb(bad_size))
    assert responses(out)[0]["Status"] == st.STATUS_INVALID_PARAMETER
    assert any(e.kind == "malformed" for e in out.events)
    # PathOffset/PathLength beyond the message.
    good = packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=4, sid=sid)
    bad_off = good[:68] + struct.pack("<HH", 0x2000, 40) + good[72:]
    out = conn.receive(nb(bad_off))
    assert responses(out)[0]["Status"] == st.STATUS_INVALID_PARAMETER
    assert not out.close


def test_credit_abuse_closes():
    conn = negotiated()
    # Reusing MessageId 0 (already spent on NEGOTIATE).
    out = conn.receive(nb(packet(s3.SMB2_ECHO, s3.SMB2Echo(), mid=0)))
    assert out.close and any(e.get("reason") == "credit_abuse" for e in out.events)
    # A MessageId far beyond what was granted.
    conn = negotiated()
    out = conn.receive(nb(packet(s3.SMB2_ECHO, s3.SMB2Echo(), mid=10_000)))
    assert out.close and any(e.get("reason") == "credit_abuse" for e in out.events)


def test_credits_granted_up_to_the_window():
    conn = smb_connection()
    out = conn.receive(nb(packet(s3.SMB2_NEGOTIATE, negotiate_body(), mid=0, credits=10_000)))
    granted = responses(out)[0]["CreditRequestResponse"]
    assert 1 <= granted <= 512
    # Every granted id is usable exactly once.
    out = conn.receive(nb(packet(s3.SMB2_ECHO, s3.SMB2Echo(), mid=granted, credits=0)))
    assert responses(out)[0]["Status"] == st.STATUS_SUCCESS


def _compound(parts: list[bytes]) -> bytes:
    out = b""
    for i, p in enumerate(parts):
        if i + 1 < len(parts):
            p += b"\x00" * (-len(p) % 8)
            p = p[:20] + struct.pack("<I", len(p)) + p[24:]
        out += p
    return out


def test_compound_related_create_write_read_close():
    conn = negotiated()
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)))
    tid = responses(out)[0]["TreeID"]
    cr = s3.SMB2Create()
    cr["Buffer"] = "srvsvc".encode("utf-16-le")
    cr["NameLength"] = len(cr["Buffer"])
    wr = s3.SMB2Write()
    wr["FileID"] = b"\xff" * 16
    wr["Buffer"] = b"hello"
    wr["Length"] = 5
    rd = s3.SMB2Read()
    rd["FileID"] = b"\xff" * 16
    rd["Length"] = 4096
    cl = s3.SMB2Close()
    cl["FileID"] = b"\xff" * 16
    rel = s3.SMB2_FLAGS_RELATED_OPERATIONS
    chain = _compound([
        packet(s3.SMB2_CREATE, cr, mid=4, sid=sid, tid=tid),
        packet(s3.SMB2_WRITE, wr, mid=5, sid=sid, tid=tid, flags=rel),
        packet(s3.SMB2_READ, rd, mid=6, sid=sid, tid=tid, flags=rel),
        packet(s3.SMB2_CLOSE, cl, mid=7, sid=sid, tid=tid, flags=rel),
    ])
    out = conn.receive(nb(chain))
    msgs = unframe(out.data)
    assert len(msgs) == 1                      # one compounded response
    data, statuses, commands = msgs[0], [], []
    pos = 0
    while True:
        h = w.parse_header(data[pos:])
        statuses.append(h.status)
        commands.append(h.command)
        if h.command == s3.SMB2_READ:
            rr = s3.SMB2Read_Response(data[pos + 64:])
            assert data[pos + rr["DataOffset"]: pos + rr["DataOffset"] + rr["DataLength"]] == REPLY
        if not h.next_command:
            break
        assert h.next_command % 8 == 0
        pos += h.next_command
    assert commands == [s3.SMB2_CREATE, s3.SMB2_WRITE, s3.SMB2_READ, s3.SMB2_CLOSE]
    assert statuses == [0, 0, 0, 0]
    assert any(e.kind == "smb.close" for e in out.events)


def test_connection_close_closes_pipes():
    conn = negotiated()
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)))
    tid = responses(out)[0]["TreeID"]
    cr = s3.SMB2Create()
    cr["Buffer"] = "emsmdb".encode("utf-16-le")
    cr["NameLength"] = len(cr["Buffer"])
    out = conn.receive(nb(packet(s3.SMB2_CREATE, cr, mid=4, sid=sid, tid=tid)))
    assert responses(out)[0]["Status"] == st.STATUS_SUCCESS
    ident, _info = FixedReplyEngine.built[-1]
    assert (ident.user, ident.source) == ("alice", "smb_session")
    events = conn.close()
    assert any(e.kind == "smb.close" and e.get("pipe") == "emsmdb" for e in events)
    assert conn.close() == []


# ================================================================ crypto known answers

def test_kdf_and_signers_match_independent_computation():
    key = bytes(range(16))
    # SP800-108 counter mode, computed independently.
    expect = hmac.new(key, b"\x00\x00\x00\x01" + b"SMB2AESCMAC\x00" + b"\x00" + b"SmbSign\x00"
                      + b"\x00\x00\x00\x80", hashlib.sha256).digest()[:16]
    assert kdf_counter_mode(key, b"SMB2AESCMAC\x00", b"SmbSign\x00") == expect
    from impacket import crypto
    assert crypto.KDF_CounterMode(key, b"SMB2AESCMAC\x00", b"SmbSign\x00", 128) == expect
    msg = packet(s3.SMB2_ECHO, s3.SMB2Echo(), mid=5)
    signed = Signer(0x0300, expect).sign(msg)
    assert Signer(0x0300, expect).verify(signed)
    zeroed = signed[:48] + b"\x00" * 16 + signed[64:]
    assert signed[48:64] == crypto.AES_CMAC(expect, zeroed, len(zeroed))
    assert not Signer(0x0300, expect).verify(signed[:-1] + b"\x01")


# ================================================================ server survives hostile input

def test_server_survives_hostile_connections(server):
    for payload in (b"\x00\xff\xff\xff", nb(b"\xfeSMB" + b"\x00" * 10), b"\x42" * 8,
                    nb(packet(s3.SMB2_ECHO, s3.SMB2Echo(), mid=0))):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(payload)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        s.close()
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=s3.SMB2_DIALECT_30)
    c.login("alice", ALICE_PW, "CORP")
    assert c.connectTree("IPC$")
    c.close()


# ================================================================ the real RPC core behind the pipe

class WhoAmI:
    """A one-call interface: answers with the qualified name of whoever the RPC core says is
    calling, padded to a multiple of 4 bytes."""

    uuid = "6b5d4d31-93a5-4c7e-9f7a-2f0d1c9a7e11"
    version = (1, 0)
    name = "whoami"
    policy_exempt = False

    def call(self, opnum: int, stub: bytes, ctx) -> bytes:
        who = ctx.identity.qualified.encode()
        return who + b"\x00" * (-len(who) % 4)

    def connection_closed(self, state) -> list[Event]:
        return []


def test_rpc_over_the_pipe_acts_as_the_smb_session_user():
    rpc_connection = pytest.importorskip("emulator.rpc.connection")
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import DCERPCException
    from impacket.uuid import uuidtup_to_bin

    def pipes(auth):
        def build(identity, info):
            return rpc_connection.RpcConnection(transport="ncacn_np", transport_identity=identity,
                                                interfaces=[WhoAmI()], auth=auth, policy=CONFIG.policy,
                                                info=info)
        return PipeFactory({"whoami": build})

    srv = SmbServer(pipes=pipes)
    try:
        smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=srv.port,
                            preferredDialect=s3.SMB2_DIALECT_311)
        smb.login("alice", ALICE_PW, "CORP")
        t = transport.SMBTransport("127.0.0.1", srv.port, r"\whoami", smb_connection=smb)
        dce = t.get_dce_rpc()
        dce.connect()
        dce.bind(uuidtup_to_bin((WhoAmI.uuid, "1.0")))
        dce.call(0, b"")
        answer = dce.recv()
        assert answer.rstrip(b"\x00") == b"CORP\\alice"
        dce.disconnect()
    except DCERPCException as exc:  # pragma: no cover - shows the RPC side's complaint
        pytest.fail(f"rpc over smb failed: {exc}")
    finally:
        srv.stop()
    assert any(e.kind == "smb.pipe_open" and e.get("smb_user") == "CORP\\alice" for e in srv.events)


# ================================================================ limits, anonymous, fuzz

def _open_pipe(conn, sid, tid, mid, name="srvsvc"):
    cr = s3.SMB2Create()
    cr["Buffer"] = name.encode("utf-16-le")
    cr["NameLength"] = len(cr["Buffer"])
    return conn.receive(nb(packet(s3.SMB2_CREATE, cr, mid=mid, sid=sid, tid=tid)))


def test_pipe_and_session_limits():
    from dataclasses import replace
    limits = replace(CONFIG.policy.limits, max_pipes_per_connection=2, max_sessions_per_connection=1)
    cfg = replace(CONFIG, policy=replace(CONFIG.policy, limits=limits))
    conn = smb_connection(cfg)
    conn.receive(nb(packet(s3.SMB2_NEGOTIATE, negotiate_body(), mid=0)))
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    assert status == st.STATUS_SUCCESS
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)))
    tid = responses(out)[0]["TreeID"]
    assert responses(_open_pipe(conn, sid, tid, 4))[0]["Status"] == st.STATUS_SUCCESS
    assert responses(_open_pipe(conn, sid, tid, 5))[0]["Status"] == st.STATUS_SUCCESS
    out = _open_pipe(conn, sid, tid, 6)
    assert responses(out)[0]["Status"] == st.STATUS_INSUFFICIENT_RESOURCES
    assert any(e.kind == "limit" and e.get("limit") == "max_pipes_per_connection" for e in out.events)
    ss = s3.SMB2SessionSetup()
    ss["Buffer"] = b"\x60\x00"
    ss["SecurityBufferLength"] = 2
    out = conn.receive(nb(packet(s3.SMB2_SESSION_SETUP, ss, mid=7)))
    assert responses(out)[0]["Status"] == st.STATUS_REQUEST_NOT_ACCEPTED
    assert any(e.kind == "limit" and e.get("limit") == "max_sessions_per_connection" for e in out.events)


def test_anonymous_session_only_when_policy_allows():
    from dataclasses import replace
    open_cfg = replace(CONFIG, policy=replace(CONFIG.policy, anonymous_allowed=True))
    for cfg, allowed in ((CONFIG, False), (open_cfg, True)):
        srv = SmbServer(cfg)
        try:
            c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=srv.port,
                              preferredDialect=s3.SMB2_DIALECT_30)
            if allowed:
                c.login("", "")
                tid = c.connectTree("IPC$")
                c.openFile(tid, "\\srvsvc", desiredAccess=0x12019F, creationOption=0x40,
                           fileAttributes=0x80)
                opened = [e for e in srv.events if e.kind == "smb.pipe_open"]
                assert opened and opened[-1].get("user") is None
                assert opened[-1].get("identity_source") == "anonymous"
            else:
                with pytest.raises(SessionError) as info:
                    c.login("", "")
                assert info.value.getErrorCode() in (st.STATUS_LOGON_FAILURE, st.STATUS_ACCESS_DENIED)
            c.close()
        finally:
            srv.stop()


def test_fuzzed_requests_never_escape():
    from hypothesis import HealthCheck, given, settings, strategies as hs

    base = [
        packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3),
        packet(s3.SMB2_READ, s3.SMB2Read(), mid=3),
        packet(s3.SMB2_IOCTL, s3.SMB2Ioctl(), mid=3),
        packet(s3.SMB2_SESSION_SETUP, s3.SMB2SessionSetup(), mid=3),
    ]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hs.sampled_from(base), hs.lists(hs.tuples(hs.integers(0, 200), hs.integers(0, 255)),
                                            max_size=8), hs.binary(max_size=32))
    def check(msg, flips, tail):
        conn = negotiated()
        b = bytearray(msg)
        for pos, val in flips:
            if pos < len(b):
                b[pos] = val
        out = conn.receive(nb(bytes(b) + tail))
        assert not any(e.get("reason") == "internal_error" for e in out.events), out.events
        # Every request is answered or the connection closes; only CANCEL goes unanswered.
        assert out.close or out.data or b[12] == s3.SMB2_CANCEL

    check()


def test_validate_negotiate_info():
    dialects = (0x0202, 0x0210, 0x0300, 0x0302)

    def ioctl(conn, sid, tid, mid, security_mode):
        io = s3.SMB2Ioctl()
        io["CtlCode"] = w.FSCTL_VALIDATE_NEGOTIATE_INFO
        io["FileID"] = b"\xff" * 16
        io["Flags"] = s3.SMB2_0_IOCTL_IS_FSCTL
        io["MaxOutputResponse"] = 1024
        io["Buffer"] = struct.pack("<I16sHH", 0, b"G" * 16, security_mode, len(dialects)) + \
            struct.pack(f"<{len(dialects)}H", *dialects)
        io["InputCount"] = len(io["Buffer"])
        return conn.receive(nb(packet(s3.SMB2_IOCTL, io, mid=mid, sid=sid, tid=tid)))

    conn = negotiated(dialects)
    status, sid, _ = ntlm_login(conn, "alice", ALICE_PW)
    out = conn.receive(nb(packet(s3.SMB2_TREE_CONNECT, tree_connect_body("\\\\x\\IPC$"), mid=3, sid=sid)))
    tid = responses(out)[0]["TreeID"]
    r = responses(ioctl(conn, sid, tid, 4, s3.SMB2_NEGOTIATE_SIGNING_ENABLED))[0]
    assert r["Status"] == st.STATUS_SUCCESS and r["Flags"] & s3.SMB2_FLAGS_SIGNED
    body = s3.SMB2Ioctl_Response(r["Data"])
    caps, guid, mode, dialect = struct.unpack("<I16sHH", body["Buffer"][:24])
    assert dialect == 0x0302 and mode & s3.SMB2_NEGOTIATE_SIGNING_ENABLED
    # What the client says it sent differs from the NEGOTIATE we received: hang up.
    out = ioctl(conn, sid, tid, 5, 0)
    assert out.close and any(e.get("reason") == "validate_negotiate_mismatch" for e in out.events)


def test_smb1_client_is_dispatched_to_the_smb1_engine(server):
    pytest.importorskip("emulator.smb.smb1")
    from impacket import smb as s1
    c = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=server.port, preferredDialect=s1.SMB_DIALECT)
    c.login("alice", ALICE_PW, "CORP")
    tid = c.connectTree("IPC$")
    fid = c.openFile(tid, "\\srvsvc", desiredAccess=0x12019F, creationOption=0x40, fileAttributes=0x80)
    c.writeFile(tid, fid, b"ping")
    assert c.readFile(tid, fid, 0, 4280) == REPLY
    c.close()
    assert any(e.get("dialect") == "NT LM 0.12" and e.get("result") == "ok"
               for e in server.kinds("smb.session_setup"))


# ---------------------------------------------------------------- re-authentication (MS-SMB2 3.3.5.5.2)
# impacket re-authenticates when `login` is called again on a connection. On 3.x it then signs
# and encrypts with keys derived from the new logon, where Windows and Samba keep the session's
# first keys (MS-SMB2 3.3.5.5.2); 3.x is checked with smbtorture below (3.1.1, signing required).

@pytest.mark.parametrize("dialect", ["2.0.2", "2.1"])
def test_reauthentication_keeps_the_session_and_its_pipes(lab, dialect):
    from harness.smb_peers import EC_LOGIN_PERM, EC_SUCCESS, conn_of, emsmdb_pipe, impacket_login, mailbox_answers
    smb = impacket_login(lab, "alice", dialect)
    conn = conn_of(lab, smb)
    before = emsmdb_pipe(lab, smb)
    assert mailbox_answers(before, "alice", "bob") == [EC_SUCCESS, EC_LOGIN_PERM]
    smb.login("bob", lab.password("bob"), "CORP")          # SESSION_SETUP on the same SessionId
    # The pipe opened before keeps the identity it was opened with (the KB's rule: a bind without
    # auth keeps the transport identity, fixed when the pipe was opened); a new pipe is bob's.
    assert mailbox_answers(before, "alice", "bob") == [EC_SUCCESS, EC_LOGIN_PERM]
    after = emsmdb_pipe(lab, smb)
    assert mailbox_answers(after, "alice", "bob") == [EC_LOGIN_PERM, EC_SUCCESS]
    setups = lab.records("smb.session_setup", conn=conn)
    assert [(s["user"], s["result"], s.get("reauth", False)) for s in setups] == [
        ("alice", "ok", False), ("bob", "ok", True)]
    assert not lab.records("smb.close", conn=conn)          # nothing was closed by it
    smb.close()


@pytest.mark.parametrize("dialect", ["SMB1", "2.1"])
def test_failed_reauthentication_ends_the_session_and_its_pipes(lab, dialect):
    """One policy on both dialects (emulator/smb/session_core.py)."""
    from harness.smb_peers import EC_SUCCESS, conn_of, emsmdb_pipe, impacket_login, mailbox_answers
    smb = impacket_login(lab, "alice", dialect)
    conn = conn_of(lab, smb)
    pipe = emsmdb_pipe(lab, smb)
    assert mailbox_answers(pipe, "alice") == [EC_SUCCESS]
    with pytest.raises(SessionError) as failed:
        smb.login("bob", "not-bobs", "CORP")
    assert failed.value.getErrorCode() == st.STATUS_LOGON_FAILURE
    # MS-SMB2 3.3.5.5.3: the session, its tree and its open are gone.
    with pytest.raises(SessionError) as gone:
        mailbox_answers(pipe, "alice")
    assert gone.value.getErrorCode() == st.STATUS_USER_SESSION_DELETED
    assert [c["reason"] for c in lab.records("smb.close", conn=conn)] == ["logon_failed"]
    assert lab.records("smb.session_setup", conn=conn)[-1]["result"] == "wrong_password"
    smb.close()


@pytest.mark.parametrize("proto", ["NT1", "SMB2_10", "SMB3_11"])
def test_anonymous_is_served_unsigned_when_signing_is_required(proto):
    """One policy on both dialects, as Windows and Samba: anonymous (if allowed) has no key, so it
    is not asked to sign (docs/security.md, "Signing, anonymous and guest")."""
    from emulator.config import default_config_with
    from emulator.lab import Lab
    need = shutil.which("rpcclient")
    if need is None:
        pytest.skip("rpcclient is not installed (scripts/bootstrap.sh installs it)")
    cfg = default_config_with({"policy": {"anonymous_allowed": True, "smb_signing_required": True}})
    with Lab(cfg) as lab:
        out = subprocess.run(
            ["rpcclient", "-U%", "-p", str(lab.ports["smb"]), f"--option=clientipcmaxprotocol={proto}",
             f"--option=clientipcminprotocol={proto}", "127.0.0.1", "-c", "srvinfo"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "platform_id" in out.stdout
        [neg] = lab.records("smb.negotiate")[-1:]
        assert neg["signing_required"] is True
        [setup] = lab.records("smb.session_setup")
        assert (setup["result"], setup["session_flags"], setup["signing"]) == ("ok", "anonymous", False)
        assert lab.records("rpc.identity")[-1]["user"] is None


@pytest.mark.parametrize("test, dialect", [("rpc.samba3.smb2-reauth2", "3.1.1"),
                                           ("rpc.samba3.smb-reauth2", "NT LM 0.12")])
def test_smbtorture_reauthenticates_to_anonymous_and_back(test, dialect):
    """smbtorture's re-authentication tests re-authenticate a signed session to anonymous and back
    to the user. They then need the lsarpc pipe, which the lab does not serve (the subtests stay
    expected failures in tests/test_smbtorture.py); the re-authentications themselves must pass."""
    from emulator.config import default_config_with
    from emulator.lab import Lab
    if shutil.which("smbtorture") is None:
        pytest.skip("smbtorture is not installed (scripts/bootstrap.sh installs it)")
    cfg = default_config_with({"policy": {"anonymous_allowed": True}})
    with Lab(cfg) as lab:
        out = subprocess.run(
            ["smbtorture", "//127.0.0.1/IPC$", "-U", "CORP/alice%" + lab.password("alice"), "-W", "CORP",
             f"--smb-ports={lab.ports['smb']}", "--maximum-runtime=30", "--option=clientsigning=required",
             "--option=clientipcsigning=required", test],
            capture_output=True, text=True, timeout=60)
        setups = [s for s in lab.records("smb.session_setup") if s.get("reauth")]
        assert "reauth to anon failed" not in out.stdout, out.stdout
        assert [(s["result"], s["session_flags"], s["dialect"]) for s in setups][:1] == [
            ("ok", "anonymous", dialect)], out.stdout
        assert "lsarpc" in out.stdout or "pipe_bind_smb" in out.stdout, out.stdout
