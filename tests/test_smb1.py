"""SMB1 (NT LM 0.12, extended security) engine: real peers over loopback, and hostile bytes.

The loopback server (tests/harness: EngineServer feeding SmbConnection) hands each SMB1 client
to the SMB1 engine, so impacket's SMB1 client and Samba's smbclient talk to the engine itself.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from impacket import nt_errors, smb
from impacket.dcerpc.v5 import srvs, transport
from impacket.smbconnection import SessionError, SMBConnection

from emulator.events import Event
from emulator.smb import smb1_wire as w
from emulator.smb.pipe import PipeFactory
from harness.smb_engines import ALICE_PW, CONFIG, EchoRpc, SmbServer, smb1_engine
from emulator.smb.smb1 import Smb1Engine
from harness.smb_raw import (EngineClient, RawClient, exchange, spnego_authenticate,
                             spnego_negotiate, status_of, tree_connect_data, tree_connect_params, uid_of)


@pytest.fixture
def server():
    s = SmbServer(CONFIG)
    yield s
    s.stop()
    assert not s.errors, s.errors


def _login(port: int, user="alice", password=ALICE_PW, domain="CORP") -> SMBConnection:
    conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=port, preferredDialect=smb.SMB_DIALECT, timeout=10)
    conn.login(user, password, domain)
    return conn


# ---------------------------------------------------------------- impacket, the SMB1 client stack

def test_impacket_login_tree_connect_and_pipe_io(server):
    conn = _login(server.port)
    assert conn.getDialect() == smb.SMB_DIALECT
    tid = conn.connectTree("IPC$")
    fid = conn.openFile(tid, "\\echo")
    conn.writeFile(tid, fid, b"hello pipe")
    assert conn.readFile(tid, fid) == EchoRpc.REPLY
    # TransactNmPipe: one write and one read in a single SMB_COM_TRANSACTION.
    assert conn.getSMBServer().TransactNamedPipe(tid, fid, b"transact me") == EchoRpc.REPLY
    conn.closeFile(tid, fid)
    conn.disconnectTree(tid)
    conn.logoff()

    [setup] = server.kinds("smb.session_setup")
    assert (setup.get("user"), setup.get("domain"), setup.get("result"), setup.get("dialect")) == \
        ("alice", "CORP", "ok", "NT LM 0.12")
    assert setup.get("ntlm_version") == "NTLMv2"
    [neg] = server.kinds("smb.negotiate")
    assert neg.get("dialect") == "NT LM 0.12" and neg.get("signing_required") is False
    [tree] = server.kinds("smb.tree_connect")
    assert tree.get("share") == "IPC$" and tree.get("result") == "ok"
    [opened] = server.kinds("smb.pipe_open")
    assert opened.get("pipe") == "echo" and opened.get("user") == "alice"
    assert opened.get("identity_source") == "smb_session"
    # The pipe's RPC engine got exactly the bytes written, with the session identity.
    [engine] = server.echo_engines
    assert engine.writes == [b"hello pipe", b"transact me"]
    assert engine.identity.user == "alice" and engine.identity.domain.upper() == "CORP"
    assert len(server.kinds("rpc.test_write")) == 2
    assert len(server.kinds("smb.logoff")) == 1
    assert [(e.get("pipe"), e.get("reason")) for e in server.kinds("smb.close")] == [("echo", "close")]
    assert opened.get("smb_user").upper() == "CORP\\ALICE"


def test_impacket_srvsvc_over_smb1_named_pipe(server):
    conn = _login(server.port)
    conn.connectTree("IPC$")
    rpc = transport.SMBTransport("127.0.0.1", server.port, r"\srvsvc", smb_connection=conn)
    dce = rpc.get_dce_rpc()
    dce.connect()
    dce.bind(srvs.MSRPC_UUID_SRVS)
    resp = srvs.hNetrServerGetInfo(dce, 101)
    assert resp["InfoStruct"]["ServerInfo101"]["sv101_name"].rstrip("\x00").upper() == CONFIG.server.netbios_name.upper()
    dce.disconnect()
    [opened] = server.kinds("smb.pipe_open")
    assert opened.get("pipe") == "srvsvc" and opened.get("user") == "alice"
    # KB Q146188: an unauthenticated bind on a named pipe keeps the SMB session's identity.
    identities = server.kinds("rpc.identity")
    assert identities and identities[-1].get("source") == "smb_session"
    assert identities[-1].get("user") == "alice"


def test_wrong_password_is_logon_failure_and_grants_nothing(server):
    with pytest.raises(SessionError) as err:
        _login(server.port, password="not-the-password")
    assert err.value.getErrorCode() == nt_errors.STATUS_LOGON_FAILURE
    [setup] = server.kinds("smb.session_setup")
    assert setup.get("result") == "wrong_password" and setup.get("user") == "alice"
    assert not server.kinds("smb.tree_connect")


def test_unknown_share_and_unknown_pipe(server):
    conn = _login(server.port)
    with pytest.raises(SessionError) as err:
        conn.connectTree("C$")
    assert err.value.getErrorCode() == nt_errors.STATUS_BAD_NETWORK_NAME
    tid = conn.connectTree("IPC$")
    with pytest.raises(SessionError) as err:
        conn.openFile(tid, "\\nosuchpipe")
    assert err.value.getErrorCode() == nt_errors.STATUS_OBJECT_NAME_NOT_FOUND
    results = [e.get("result") for e in server.kinds("smb.tree_connect")]
    assert results == ["bad_network_name", "ok"]


def test_ids_from_another_connection_do_not_exist_here(server):
    first = _login(server.port)
    tid = first.connectTree("IPC$")
    first.openFile(tid, "\\echo")
    uid = first.getSMBServer()._uid
    # A second raw connection that negotiates but never logs on replays the first one's ids.
    with RawClient(server.port) as raw:
        raw.negotiate()
        reply = raw.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data(),
                         uid=uid)
        assert status_of(reply) == nt_errors.STATUS_USER_SESSION_DELETED
    assert [e.get("result") for e in server.kinds("smb.tree_connect")] == ["ok"]


def test_signing_required_by_policy_signs_and_verifies():
    config = replace(CONFIG, policy=replace(CONFIG.policy, smb_signing_required=True))
    srv = SmbServer(config)
    try:
        conn = _login(srv.port)
        assert conn.getSMBServer()._SignatureEnabled
        tid = conn.connectTree("IPC$")
        fid = conn.openFile(tid, "\\echo")
        conn.writeFile(tid, fid, b"signed write")
        assert conn.readFile(tid, fid) == EchoRpc.REPLY
        [neg] = srv.kinds("smb.negotiate")
        assert neg.get("signing_required") is True
        assert srv.kinds("smb.session_setup")[0].get("signing") is True
        # A request with a forged signature is refused and leaves no trace of a tree.
        s = conn.getSMBServer()
        s._SigningSessionKey = b"\x11" * 16
        with pytest.raises(smb.SessionError) as err:
            s.tree_connect_andx("\\\\127.0.0.1\\IPC$")
        assert err.value.get_error_code() == nt_errors.STATUS_ACCESS_DENIED
        assert [e.get("result") for e in srv.kinds("smb.signature")] == ["bad_signature"]
    finally:
        srv.stop()
    assert not srv.errors


# ---------------------------------------------------------------- Samba's smbclient

@pytest.mark.skipif(shutil.which("smbclient") is None, reason="smbclient not installed")
@pytest.mark.parametrize("signing", ["off", "required"])
def test_samba_smbclient_nt1_connects_ipc(server, signing):
    cmd = ["smbclient", "-m", "NT1", "--option=client min protocol=NT1", "--option=client max protocol=NT1",
           f"--option=client signing={signing}", "-p", str(server.port), "//127.0.0.1/IPC$",
           "-U", f"CORP/alice%{ALICE_PW}", "-c", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [setup] = server.kinds("smb.session_setup")
    assert setup.get("result") == "ok" and setup.get("user") == "alice"
    assert setup.get("signing") is (signing == "required")
    assert [e.get("result") for e in server.kinds("smb.tree_connect")] == ["ok"]


@pytest.mark.skipif(shutil.which("smbclient") is None, reason="smbclient not installed")
def test_samba_smbclient_wrong_password_fails(server):
    cmd = ["smbclient", "-m", "NT1", "--option=client min protocol=NT1", "-p", str(server.port),
           "//127.0.0.1/IPC$", "-U", "CORP/alice%wrong", "-c", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "NT_STATUS_LOGON_FAILURE" in proc.stdout + proc.stderr
    assert not server.kinds("smb.tree_connect")


# ---------------------------------------------------------------- raw packets over a plain socket

def test_failed_session_setup_uid_is_dead_for_tree_connect(server):
    with RawClient(server.port) as raw:
        raw.negotiate()
        challenge = raw.session_setup(spnego_negotiate())
        assert status_of(challenge) == nt_errors.STATUS_MORE_PROCESSING_REQUIRED
        uid = uid_of(challenge)
        assert uid != 0
        failed = raw.session_setup(spnego_authenticate(challenge, "bad password"), uid=uid)
        assert status_of(failed) == nt_errors.STATUS_LOGON_FAILURE
        # The Uid of the failed logon is gone: a tree connect on it is refused ...
        reply = raw.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data(), uid=uid)
        assert status_of(reply) == nt_errors.STATUS_USER_SESSION_DELETED
        # ... and so is continuing its session setup.
        again = raw.session_setup(spnego_authenticate(challenge, ALICE_PW), uid=uid)
        assert status_of(again) == nt_errors.STATUS_USER_SESSION_DELETED
        # A fresh logon on the same connection still works.
        challenge = raw.session_setup(spnego_negotiate())
        ok = raw.session_setup(spnego_authenticate(challenge, ALICE_PW), uid=uid_of(challenge))
        assert status_of(ok) == 0
        reply = raw.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data(),
                         uid=uid_of(ok))
        assert status_of(reply) == 0
    assert [e.get("result") for e in server.kinds("smb.tree_connect")] == ["ok"]


def test_tree_connect_before_session_and_unknown_command(server):
    with RawClient(server.port) as raw:
        raw.negotiate()
        reply = raw.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data())
        assert status_of(reply) == nt_errors.STATUS_USER_SESSION_DELETED
        reply = raw.send(0x32, b"\x00" * 30, b"")   # TRANSACTION2: not served
        assert status_of(reply) == nt_errors.STATUS_NOT_SUPPORTED
        reply = raw.send(smb.SMB.SMB_COM_ECHO, struct.pack("<H", 2), b"ping")
        assert status_of(reply) == 0 and reply.endswith(b"ping")
        # the second echo reply (SequenceNumber 2) is queued on the socket
        head = raw.recv_exact(4)
        second = raw.recv_exact(int.from_bytes(head[1:], "big"))
        assert struct.unpack_from("<BH", second, 32) == (1, 2) and second.endswith(b"ping")


def test_non_extended_security_session_setup_is_refused(server):
    with RawClient(server.port) as raw:
        neg = raw.send(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00",
                       flags2=smb.SMB.FLAGS2_NT_STATUS)
        assert status_of(neg) == 0
        words = struct.unpack_from("<HBHHIIIIQhB", neg, 33)
        assert words[0] == 0 and words[-1] == 8       # dialect 0, 8-byte challenge
        params = struct.pack("<BBHHHHIHHII", 0xFF, 0, 0, 61440, 2, 1, 0, 24, 24, 0, 0x40)
        reply = raw.send(smb.SMB.SMB_COM_SESSION_SETUP_ANDX, params, b"\x11" * 48 + b"alice\x00CORP\x00",
                         flags2=smb.SMB.FLAGS2_NT_STATUS)
        assert status_of(reply) == nt_errors.STATUS_LOGON_FAILURE
    [setup] = server.kinds("smb.session_setup")
    assert setup.get("result") == "non_extended_security"


def test_negotiate_without_nt_lm_012_gets_ffff(server):
    with RawClient(server.port) as raw:
        reply = raw.send(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02PC NETWORK PROGRAM 1.0\x00")
        assert status_of(reply) == 0
        assert struct.unpack_from("<BH", reply, 32) == (1, 0xFFFF)


def test_session_limit_gives_insufficient_resources():
    policy = replace(CONFIG.policy, limits=replace(CONFIG.policy.limits, max_sessions_per_connection=1))
    engine = smb1_engine(replace(CONFIG, policy=policy), seed=3)
    raw = RawClient.__new__(RawClient)
    raw.mid = 1
    exchange(engine, raw.packet(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00"))
    p = smb.SMBSessionSetupAndX_Extended_Parameters()
    p["MaxBufferSize"], p["MaxMpxCount"], p["VcNumber"], p["SessionKey"], p["Capabilities"] = 61440, 2, 1, 0, 0
    blob = spnego_negotiate()
    p["SecurityBlobLength"] = len(blob)
    d = smb.SMBSessionSetupAndX_Extended_Data()
    d["SecurityBlob"], d["NativeOS"], d["NativeLanMan"] = blob, "", ""
    req = raw.packet(smb.SMB.SMB_COM_SESSION_SETUP_ANDX, p.getData(), d.getData())
    [first], _, _ = exchange(engine, req)
    assert status_of(first) == nt_errors.STATUS_MORE_PROCESSING_REQUIRED
    [second], events, close = exchange(engine, req)
    assert status_of(second) == nt_errors.STATUS_INSUFFICIENT_RESOURCES and not close
    assert [e.get("limit") for e in events if e.kind == "limit"] == ["max_sessions_per_connection"]


# ---------------------------------------------------------------- hostile bytes, no network

def _negotiated_engine(seed=1) -> tuple[Smb1Engine, RawClient]:
    engine = smb1_engine(seed=seed)
    raw = RawClient.__new__(RawClient)
    raw.mid = 1
    [reply], _, _ = exchange(engine, raw.packet(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00"))
    assert status_of(reply) == 0
    return engine, raw


@pytest.mark.parametrize("message", [
    b"", b"\xffSMB", b"\xfeSMB" + b"\x00" * 60, b"\xffSMB" + b"\x00" * 20,
    b"\xffSMB\x72\x00\x00\x00\x00\x80" + b"\x00" * 30,   # reply flag set in a request
])
def test_broken_header_closes_with_malformed_event(message):
    engine = smb1_engine(seed=2)
    responses, events, close = exchange(engine, message)
    assert close and responses == []
    assert [e.kind for e in events] == ["malformed"]


def test_lying_counts_and_offsets_get_invalid_smb_or_parameter():
    engine, raw = _negotiated_engine()
    good = raw.packet(smb.SMB.SMB_COM_ECHO, struct.pack("<H", 1), b"x")
    # WordCount claims more words than the message holds.
    lying_wc = good[:32] + b"\x40" + good[33:]
    [reply], events, close = exchange(engine, lying_wc)
    assert status_of(reply) == w.STATUS_INVALID_SMB and not close
    assert events[0].kind == "malformed"
    # ByteCount claims more bytes than the message holds.
    lying_bc = good[:35] + struct.pack("<H", 5000) + good[37:]
    [reply], events, _ = exchange(engine, lying_bc)
    assert status_of(reply) == w.STATUS_INVALID_SMB and events[0].get("reason") == "byte_count_exceeds_message"
    # An AndX offset that points backwards (a loop) or past the end.
    params = smb.SMBTreeConnectAndX_Parameters()
    params["PasswordLength"] = 1
    tc = bytearray(raw.packet(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, params.getData(), tree_connect_data()))
    for cmd, off in ((0x75, 10), (0x75, 32), (0xA2, 60000)):
        struct.pack_into("<BBH", tc, 33, cmd, 0, off)
        [reply], events, close = exchange(engine, bytes(tc))
        assert status_of(reply) == w.STATUS_INVALID_SMB and not close
        assert events[0].kind == "malformed"


def test_transaction_offsets_out_of_range_are_invalid_parameter():
    engine, raw = _negotiated_engine(seed=4)
    words = struct.pack("<HHHHBBHIHHHHHBB2H", 0, 4, 0, 1024, 0, 0, 0, 0, 0, 0, 0, 4, 0xFFF0, 2, 0, 0x26, 1)
    # Session checks come after the offset check, so no logon is needed to reach it.
    [reply], events, close = exchange(engine, raw.packet(smb.SMB.SMB_COM_TRANSACTION, words, b"\\PIPE\\\x00abcd"))
    assert status_of(reply) == w.STATUS_INVALID_PARAMETER and not close
    assert events[0].get("reason") == "transaction_offset_out_of_range"


def test_command_before_negotiate_and_second_negotiate_are_errors():
    engine = smb1_engine(seed=5)
    raw = RawClient.__new__(RawClient)
    raw.mid = 1
    [reply], events, close = exchange(engine, raw.packet(smb.SMB.SMB_COM_TREE_DISCONNECT, b"", b""))
    assert status_of(reply) == w.STATUS_INVALID_SMB and events[0].get("reason") == "command_before_negotiate"
    exchange(engine, raw.packet(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00"))
    [reply], events, close = exchange(engine, raw.packet(smb.SMB.SMB_COM_NEGOTIATE, b"", b"\x02NT LM 0.12\x00"))
    assert status_of(reply) == w.STATUS_INVALID_SMB and events[0].get("reason") == "second_negotiate"


def test_seeded_engine_is_deterministic():
    def run():
        engine = smb1_engine(seed=9, now=lambda: 1_800_000_000.0)
        raw = EngineClient(engine)
        return raw.negotiate(), raw.session_setup(spnego_negotiate())
    first, second = run(), run()
    assert first == second
    # The negotiate response carries the clock as a FILETIME (MS-CIFS 2.2.4.52.2 SystemTime).
    words = struct.unpack_from("<HBHHIIIIQhB", first[0], 33)
    assert words[8] == (1_800_000_000 + 11644473600) * 10_000_000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=200), st.integers(min_value=0, max_value=0xFF))
def test_fuzzed_messages_never_raise(tail, command):
    engine, raw = _negotiated_engine(seed=6)
    message = b"\xffSMB" + bytes([command]) + tail
    responses, events, close = exchange(engine, message)
    assert close or responses or command == w.COM_NT_CANCEL
    if close:
        assert any(e.kind == "malformed" for e in events)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0x73, 0x75, 0xA2, 0x2F, 0x2E, 0x25, 0x04, 0x71, 0x74, 0x2B]),
       st.integers(min_value=0, max_value=40), st.binary(max_size=120), st.binary(max_size=160))
def test_fuzzed_command_blocks_never_raise(command, wc, words, data):
    engine, raw = _negotiated_engine(seed=7)
    words = (words + b"\x00" * 80)[:2 * wc]
    message = raw.packet(command, b"", b"")[:32] + bytes([wc]) + words + struct.pack("<H", len(data)) + data
    responses, events, close = exchange(engine, message)
    assert not close
    assert responses or (command == w.COM_ECHO and words[:2] == b"\x00\x00")   # ECHO with EchoCount 0
    assert all(r.startswith(b"\xffSMB") for r in responses)


def test_server_still_serves_a_new_connection_after_garbage(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"\x00\x00\x00\x10" + b"\xffSMB" + b"\x00" * 12)
    assert s.recv(10) == b""     # closed after a broken header
    s.close()
    assert any(e.kind == "malformed" for e in server.events)
    conn = _login(server.port)
    assert conn.connectTree("IPC$")


def _chain(raw: RawClient, first: tuple[int, bytes, bytes], second: tuple[int, bytes, bytes], uid: int) -> bytes:
    """Two commands in one message, linked with impacket's AndX chaining."""
    pkt = smb.NewSMBPacket()
    pkt["Flags2"] = smb.SMB.FLAGS2_EXTENDED_SECURITY | smb.SMB.FLAGS2_NT_STATUS | smb.SMB.FLAGS2_LONG_NAMES
    pkt["Uid"], pkt["Mid"] = uid, 7
    for command, params, data in (first, second):
        cmd = smb.SMBCommand(command)
        cmd["Parameters"] = smb.SMBAndXCommand_Parameters(params)
        cmd["Parameters"]["AndXCommand"] = 0xFF
        cmd["Data"] = data
        pkt.addCommand(cmd)
    return raw.send_raw(pkt.getData())


def _setup_parts(blob: bytes) -> tuple[int, bytes, bytes]:
    p = smb.SMBSessionSetupAndX_Extended_Parameters()
    p["MaxBufferSize"], p["MaxMpxCount"], p["VcNumber"], p["SessionKey"] = 61440, 2, 1, 0
    p["Capabilities"], p["SecurityBlobLength"] = smb.SMB.CAP_EXTENDED_SECURITY, len(blob)
    d = smb.SMBSessionSetupAndX_Extended_Data()
    d["SecurityBlob"], d["NativeOS"], d["NativeLanMan"] = blob, "", ""
    return smb.SMB.SMB_COM_SESSION_SETUP_ANDX, p.getData(), d.getData()


@pytest.mark.parametrize("password", [ALICE_PW, "wrong"])
def test_session_setup_chained_with_tree_connect(password):
    raw = EngineClient(smb1_engine(seed=11))
    raw.negotiate()
    challenge = raw.session_setup(spnego_negotiate())
    uid = uid_of(challenge)
    reply = _chain(raw, _setup_parts(spnego_authenticate(challenge, password)),
                   (smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data()), uid)
    parsed = smb.NewSMBPacket(data=reply)
    trees = [e for e in raw.events if e.kind == "smb.tree_connect"]
    if password == ALICE_PW:
        assert status_of(reply) == 0
        blocks = w.parse_chain(reply, w.COM_SESSION_SETUP_ANDX)
        assert [b.command for b in blocks] == [w.COM_SESSION_SETUP_ANDX, w.COM_TREE_CONNECT_ANDX]
        assert blocks[1].data.startswith(b"IPC\x00")
        assert parsed["Tid"] not in (0, 0xFFFF) and [t.get("result") for t in trees] == ["ok"]
    else:
        # The chained tree connect never runs on a failed logon.
        assert status_of(reply) == nt_errors.STATUS_LOGON_FAILURE
        assert trees == [] and parsed["Tid"] == 0xFFFF     # the request's Tid, echoed: no tree


def test_anonymous_needs_policy():
    from impacket import ntlm
    from impacket.spnego import SPNEGO_NegTokenResp
    for allowed in (False, True):
        config = replace(CONFIG, policy=replace(CONFIG.policy, anonymous_allowed=allowed))
        engines: list = []
        raw = EngineClient(smb1_engine(config, seed=12, echo_engines=engines))
        raw.negotiate()
        challenge = raw.session_setup(spnego_negotiate())
        type1 = ntlm.getNTLMSSPType1("WS", "")
        body = w.parse_block(challenge, w.HEADER_SIZE, w.COM_SESSION_SETUP_ANDX)
        blob = SPNEGO_NegTokenResp(body.data[:struct.unpack_from("<H", body.words, 6)[0]])
        type3, _ = ntlm.getNTLMSSPType3(type1, blob["ResponseToken"], "", "", "")
        token = SPNEGO_NegTokenResp()
        token["ResponseToken"] = type3.getData()
        reply = raw.session_setup(token.getData(), uid=uid_of(challenge))
        if not allowed:
            assert status_of(reply) == nt_errors.STATUS_LOGON_FAILURE
            continue
        assert status_of(reply) == 0
        [setup] = [e for e in raw.events if e.kind == "smb.session_setup"]
        assert setup.get("session_flags") == "anonymous" and setup.get("signing") is False
        uid = uid_of(reply)
        tid = raw.tree_connect(uid)
        raw.open_pipe(uid, tid)
        assert engines[0].identity.user is None     # the pipe runs as nobody


def test_read_andx_overflow_and_logoff_closes_pipes():
    closed: list = []

    class Closing(EchoRpc):
        def close(self):
            closed.append(self)
            return [Event("rpc", "rpc.test_closed", {})]

    engine = smb1_engine(seed=13, pipes=PipeFactory({"echo": Closing}))
    raw = EngineClient(engine)
    uid = raw.login()
    tid = raw.tree_connect(uid)
    fid = raw.open_pipe(uid, tid)
    wp = smb.SMBWriteAndX_Parameters()
    wp["Fid"], wp["Offset"], wp["WriteMode"], wp["Remaining"], wp["DataLength"] = fid, 0, 8, 3, 3
    wp["DataOffset"] = 32 + 1 + 28 + 2 + 1
    reply = raw.send(smb.SMB.SMB_COM_WRITE_ANDX, wp.getData(), b"\x00abc", uid=uid, tid=tid)
    assert status_of(reply) == 0

    def read(max_count: int) -> tuple[int, bytes]:
        rp = smb.SMBReadAndX_Parameters()
        rp["Fid"], rp["Offset"], rp["MaxCount"], rp["MinCount"] = fid, 0, max_count, max_count
        r = raw.send(smb.SMB.SMB_COM_READ_ANDX, rp.getData(), b"", uid=uid, tid=tid)
        cmd = smb.SMBCommand(smb.NewSMBPacket(data=r)["Data"][0])
        params = smb.SMBReadAndXResponse_Parameters(cmd["Parameters"])
        return status_of(r), r[params["DataOffset"]:params["DataOffset"] + params["DataCount"]]

    status, part = read(50)
    assert status == nt_errors.STATUS_BUFFER_OVERFLOW and part == EchoRpc.REPLY[:50]
    status, rest = read(4096)
    assert status == 0 and part + rest == EchoRpc.REPLY
    reply = raw.send(smb.SMB.SMB_COM_LOGOFF_ANDX, smb.SMBLogOffAndX().getData(), b"", uid=uid)
    assert status_of(reply) == 0
    assert len(closed) == 1 and any(e.kind == "rpc.test_closed" for e in raw.events)
    # After logoff, the Uid, its tree and its Fid are gone.
    status, _ = (status_of(raw.send(smb.SMB.SMB_COM_CLOSE, struct.pack("<HI", fid, 0), b"", uid=uid, tid=tid)), None)
    assert status == nt_errors.STATUS_USER_SESSION_DELETED


def test_client_without_nt_status_gets_dos_errors():
    raw = EngineClient(smb1_engine(seed=14))
    raw.negotiate()
    reply = raw.send(smb.SMB.SMB_COM_TREE_CONNECT_ANDX, tree_connect_params(), tree_connect_data(),
                     flags2=smb.SMB.FLAGS2_EXTENDED_SECURITY)
    # ERRSRV (2) / ERRbaduid (91): class in the first byte, code in the last two (MS-CIFS 2.2.3.1).
    assert reply[5] == 0x02 and struct.unpack_from("<H", reply, 7)[0] == 91


def test_pipe_limit_gives_insufficient_resources():
    policy = replace(CONFIG.policy, limits=replace(CONFIG.policy.limits, max_pipes_per_connection=1))
    raw = EngineClient(smb1_engine(replace(CONFIG, policy=policy), seed=15))
    uid = raw.login()
    tid = raw.tree_connect(uid)
    raw.open_pipe(uid, tid)
    name = "\\echo"
    p = smb.SMBNtCreateAndX_Parameters()
    p["FileNameLength"], p["AccessMask"], p["CreateFlags"], p["CreateOptions"] = len(name), 0x2019F, 0, 0
    d = smb.SMBNtCreateAndX_Data(flags=0)
    d["FileName"] = name
    reply = raw.send(smb.SMB.SMB_COM_NT_CREATE_ANDX, p.getData(), d.getData(), uid=uid, tid=tid)
    assert status_of(reply) == nt_errors.STATUS_INSUFFICIENT_RESOURCES
    assert [e.get("limit") for e in raw.events if e.kind == "limit"] == ["max_pipes_per_connection"]


def test_failed_reauthentication_destroys_the_session_and_its_pipes():
    engines: list = []
    raw = EngineClient(smb1_engine(seed=16, echo_engines=engines))
    uid = raw.login()
    tid = raw.tree_connect(uid)
    fid = raw.open_pipe(uid, tid)
    challenge = raw.session_setup(spnego_negotiate(), uid=uid)
    assert status_of(challenge) == nt_errors.STATUS_MORE_PROCESSING_REQUIRED and uid_of(challenge) == uid
    failed = raw.session_setup(spnego_authenticate(challenge, "wrong"), uid=uid)
    assert status_of(failed) == nt_errors.STATUS_LOGON_FAILURE
    wp = smb.SMBWriteAndX_Parameters()
    wp["Fid"], wp["DataLength"], wp["DataOffset"] = fid, 1, 64
    reply = raw.send(smb.SMB.SMB_COM_WRITE_ANDX, wp.getData(), b"\x00x", uid=uid, tid=tid)
    assert status_of(reply) == nt_errors.STATUS_USER_SESSION_DELETED
    assert engines[0].writes == []


# ---------------------------------------------------------------- re-authentication (MS-SMB 3.3.5.3)

def test_reauthentication_keeps_the_session_and_its_pipes(lab):
    """The same policy as SMB2 (session_core.py): the session and the pipes opened on it stay;
    a pipe keeps the identity it was opened with, a pipe opened afterwards gets the new one."""
    from harness.smb_peers import EC_LOGIN_PERM, EC_SUCCESS, conn_of, emsmdb_pipe, impacket_login, mailbox_answers
    conn = impacket_login(lab, "alice", "SMB1")
    cid = conn_of(lab, conn)
    before = emsmdb_pipe(lab, conn)
    conn.login("bob", lab.password("bob"), "CORP")          # SESSION_SETUP_ANDX on the same Uid
    assert mailbox_answers(before, "alice", "bob") == [EC_SUCCESS, EC_LOGIN_PERM]
    after = emsmdb_pipe(lab, conn)
    assert mailbox_answers(after, "alice", "bob") == [EC_LOGIN_PERM, EC_SUCCESS]
    setups = lab.records("smb.session_setup", conn=cid)
    assert [(s["user"], s.get("reauth", False), s["uid"]) for s in setups] == [
        ("alice", False, setups[0]["uid"]), ("bob", True, setups[0]["uid"])]
    assert not lab.records("smb.close", conn=cid)
    conn.close()
