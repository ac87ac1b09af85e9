"""Every resource limit of policy.limits, over real loopback sockets: configured small, hit by a
real client, enforced (refused, faulted or closed) and reported by one `limit` event that names
the limit, the listener, the peer and the configured value."""

from __future__ import annotations

import dataclasses
import select
import socket
import struct
import time
from contextlib import contextmanager

import pytest
from impacket import ntlm
from impacket.dcerpc.v5 import epm, rpcrt, transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_WINNT
from impacket import smb3
from impacket.nt_errors import STATUS_INSUFFICIENT_RESOURCES, STATUS_REQUEST_NOT_ACCEPTED
from impacket.smb3structs import SMB2_DIALECT_311
from impacket.smbconnection import SessionError, SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.config import default_config
from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect
from emulator.lab import Lab

from harness.cast import dn

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
EPM = uuidtup_to_bin(("e1af8308-5d1f-11c9-91a4-08002b14a0fa", "3.0"))
NDR = ("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0")


@contextmanager
def limited_lab(**limits):
    base = default_config()
    # Encryption off: the session test reuses impacket's session state, which after an encrypted
    # logon would seal a SessionId-0 SESSION_SETUP (a transform naming no session: disconnect).
    policy = dataclasses.replace(base.policy, smb_encryption="off",
                                 limits=dataclasses.replace(base.policy.limits, **limits))
    with Lab(dataclasses.replace(base, policy=policy)) as lab:
        yield lab


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


def connect(lab, listener):
    s = socket.create_connection(("127.0.0.1", lab.ports[listener]), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def peer_of(sock):
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def conn_of(lab, sock):
    peer = peer_of(sock)
    rec = wait_for(lambda: lab.records("conn.open", peer=peer))
    assert rec, f"no conn.open for {peer}"
    return rec[0]["conn"]


def closed_by_server(sock, timeout=10.0):
    """True once the server closed the connection (EOF or reset), reading away any answer."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return False
    return True


def the_limit(lab, which, **match):
    recs = wait_for(lambda: lab.records("limit", limit=which, **match))
    assert len(recs) == 1, (which, lab.records("limit"))
    rec = recs[0]
    assert {"limit", "listener", "peer", "value"} <= set(rec)
    return rec


def bind_pdu(abstract, auth_token=None, call_id=1):
    """A bind with one presentation context, optionally carrying an NTLM token (C706 12.6.4.3)."""
    item = rpcrt.CtxItem()
    item["ContextID"] = 0
    item["TransItems"] = 1
    item["AbstractSyntax"] = abstract
    item["TransferSyntax"] = uuidtup_to_bin(NDR)
    h = rpcrt.MSRPCHeader()
    h["type"] = rpcrt.MSRPC_BIND
    h["flags"] = rpcrt.PFC_FIRST_FRAG | rpcrt.PFC_LAST_FRAG
    h["call_id"] = call_id
    h["pduData"] = struct.pack("<HHIB3x", 5840, 5840, 0, 1) + item.getData()
    if auth_token is not None:
        tr = rpcrt.SEC_TRAILER()
        tr["auth_type"], tr["auth_level"], tr["auth_ctx_id"] = RPC_C_AUTHN_WINNT, RPC_C_AUTHN_LEVEL_CONNECT, 1
        h["sec_trailer"] = tr
        h["auth_data"] = auth_token
    return h.get_packet()


def bind_answer(sock):
    """The packet type of the server's answer to a bind (12 = bind_ack, 13 = bind_nak)."""
    sock.settimeout(10)
    head = b""
    while len(head) < 10:
        chunk = sock.recv(10 - len(head))
        assert chunk, "connection closed instead of a bind answer"
        head += chunk
    length = struct.unpack_from("<H", head, 8)[0]
    rest = b""
    while len(head) + len(rest) < length:
        rest += sock.recv(length - len(head) - len(rest))
    return head[2]


def epm_dce(lab):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['epm']}]")
    dce = rt.get_dce_rpc()
    dce.connect()
    dce.bind(epm.MSRPC_UUID_PORTMAP)
    return dce, rt


def emsmdb_dce(lab, user="alice"):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
    rt.set_credentials(user, lab.password(user), "CORP")
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_CONNECT)
    dce.connect()
    dce.bind(EMSMDB)
    return dce, rt


def smb_login(lab, user="alice"):
    conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"],
                         preferredDialect=SMB2_DIALECT_311, timeout=10)
    conn.login(user, lab.password(user), "CORP")
    return conn


# ============================================================================ connections

def test_max_connections_per_listener():
    with limited_lab(max_connections=2) as lab:
        held = [connect(lab, "epm"), connect(lab, "epm")]
        for s in held:
            conn_of(lab, s)
        extra = connect(lab, "epm")
        assert closed_by_server(extra)
        rec = the_limit(lab, "max_connections")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("epm", peer_of(extra), 2)
        assert not lab.records("conn.open", peer=peer_of(extra))
        # The held connections still work, and the limit is per listener: EMSMDB still accepts.
        held[0].sendall(bind_pdu(EPM))
        assert bind_answer(held[0]) == rpcrt.MSRPC_BINDACK
        other = connect(lab, "emsmdb")
        other.sendall(bind_pdu(EMSMDB, ntlm.getNTLMSSPType1("", "", True).getData()))
        assert bind_answer(other) == rpcrt.MSRPC_BINDACK
        for s in held + [extra, other]:
            s.close()


def test_max_connections_per_peer_is_released_when_the_connection_ends():
    with limited_lab(max_connections_per_peer=1) as lab:
        first = connect(lab, "epm")
        conn_of(lab, first)
        second = connect(lab, "epm")
        assert closed_by_server(second)
        rec = the_limit(lab, "max_connections_per_peer")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("epm", peer_of(second), 1)
        first_conn = conn_of(lab, first)
        first.close()
        assert wait_for(lambda: lab.records("conn.close", conn=first_conn))
        third = connect(lab, "epm")
        third.sendall(bind_pdu(EPM))
        assert bind_answer(third) == rpcrt.MSRPC_BINDACK
        assert len(lab.records("limit")) == 1
        third.close()
        second.close()


# ============================================================================ sizes

def test_rpc_request_over_max_pdu_size_is_faulted_and_closed():
    with limited_lab(max_pdu_size=4096) as lab:
        dce, rt = emsmdb_dce(lab)
        peer = peer_of(rt.get_socket())
        with pytest.raises(Exception):
            dce.call(0, b"\x00" * 10000)     # cut into fragments; their sum passes the limit
            dce.recv()
        rec = the_limit(lab, "max_pdu_size")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("emsmdb", peer, 4096)
        assert not lab.records("emsmdb.connect")
        conn = conn_of(lab, rt.get_socket())
        assert wait_for(lambda: lab.records("conn.close", conn=conn, reason="server_closed"))
        # A call within the limit on a new connection is served.
        dce2, _ = emsmdb_dce(lab)
        assert hEcDoConnect(dce2, dn("alice"))[0] == 0
        dce2.disconnect()


def test_netbios_message_over_max_pdu_size_is_refused_before_buffering():
    with limited_lab(max_pdu_size=64 * 1024) as lab:
        s = connect(lab, "smb")
        s.sendall(b"\x00" + (0xFFFFFF).to_bytes(3, "big") + b"\xfeSMB")   # claims 16 MiB
        assert closed_by_server(s)
        rec = the_limit(lab, "max_pdu_size")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("smb", peer_of(s), 64 * 1024)
        conn = conn_of(lab, s)
        assert lab.records("malformed", conn=conn)
        smb_login(lab).logoff()   # the listener still serves a good logon


def test_rpc_fragment_over_max_fragment_size_is_closed():
    with limited_lab(max_fragment_size=2048) as lab:
        s = connect(lab, "epm")
        header = bytearray(bind_pdu(EPM))
        struct.pack_into("<H", header, 8, 4000)          # frag_length beyond the limit
        s.sendall(bytes(header))
        assert closed_by_server(s)
        conn = conn_of(lab, s)
        assert lab.records("malformed", conn=conn)
        assert not lab.records("rpc.bind", conn=conn)
        rec = the_limit(lab, "max_fragment_size")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("epm", peer_of(s), 2048)
        ok = connect(lab, "epm")
        ok.sendall(bind_pdu(EPM))
        assert bind_answer(ok) == rpcrt.MSRPC_BINDACK
        ok.close()


# ============================================================================ pipes and sessions

def test_max_pipes_per_connection():
    with limited_lab(max_pipes_per_connection=2) as lab:
        smb = smb_login(lab)
        tid = smb.connectTree("IPC$")
        fids = [smb.openFile(tid, "emsmdb"), smb.openFile(tid, "epmapper")]
        with pytest.raises(SessionError) as err:
            smb.openFile(tid, "srvsvc")
        assert err.value.getErrorCode() == STATUS_INSUFFICIENT_RESOURCES
        port = smb.getSMBServer().get_socket().getsockname()[1]
        rec = the_limit(lab, "max_pipes_per_connection")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("smb", f"127.0.0.1:{port}", 2)
        # Closing a pipe makes room again.
        smb.closeFile(tid, fids[0])
        smb.closeFile(tid, smb.openFile(tid, "srvsvc"))
        smb.logoff()


def test_max_sessions_per_connection():
    with limited_lab(max_sessions_per_connection=1) as lab:
        smb = smb_login(lab)
        port = smb.getSMBServer().get_socket().getsockname()[1]
        # A second SESSION_SETUP with SessionId 0 on the same connection asks for a new session.
        server = smb.getSMBServer()
        server._Session["SessionID"] = 0
        # MS-SMB2 3.3.5.5: a server out of session slots answers STATUS_REQUEST_NOT_ACCEPTED.
        with pytest.raises(smb3.SessionError) as err:
            server.login("bob", lab.password("bob"), "CORP")
        assert err.value.get_error_code() == STATUS_REQUEST_NOT_ACCEPTED
        rec = the_limit(lab, "max_sessions_per_connection")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("smb", f"127.0.0.1:{port}", 1)
        assert not lab.records("smb.session_setup", smb_user="bob", result="ok")


# ============================================================================ timers

def test_idle_timeout_closes_a_silent_connection():
    with limited_lab(idle_timeout=0.2) as lab:
        s = connect(lab, "epm")
        s.sendall(bind_pdu(EPM))
        assert bind_answer(s) == rpcrt.MSRPC_BINDACK
        assert closed_by_server(s)
        conn = conn_of(lab, s)
        rec = the_limit(lab, "idle_timeout")
        assert (rec["listener"], rec["peer"], rec["value"], rec["conn"]) == ("epm", peer_of(s), 0.2, conn)
        assert lab.records("conn.close", conn=conn, reason="idle_timeout")


def _trickle_until_closed(sock, data, pause=0.05):
    """Send one byte at a time; True when the server closed the connection before the end."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return True
        if select.select([sock], [], [], pause)[0]:
            return closed_by_server(sock)
    return False


def test_slow_client_trickling_one_message_is_closed():
    """Each byte comes well inside the idle timeout, so only the slow-client limit can end this."""
    with limited_lab(slow_client_timeout=0.3, idle_timeout=60) as lab:
        s = connect(lab, "epm")
        message = bytearray(bind_pdu(EPM))
        message[8:10] = struct.pack("<H", 4000)           # a message that is still arriving
        message += bytes(4000 - len(message))
        assert _trickle_until_closed(s, bytes(message))
        conn = conn_of(lab, s)
        rec = the_limit(lab, "slow_client_timeout")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("epm", peer_of(s), 0.3)
        assert lab.records("conn.close", conn=conn, reason="slow_client_timeout")
        assert not lab.records("rpc.bind", conn=conn)


def test_slow_client_timeout_spares_a_client_pausing_between_messages():
    with limited_lab(slow_client_timeout=0.2, handshake_timeout=0.2, idle_timeout=60) as lab:
        dce, rt = emsmdb_dce(lab)
        conn = conn_of(lab, rt.get_socket())
        assert hEcDoConnect(dce, dn("alice"))[0] == 0
        time.sleep(0.6)                                     # three times both limits, between calls
        assert hEcDoConnect(dce, dn("alice"))[0] == 0
        dce.disconnect()
        assert wait_for(lambda: lab.records("conn.close", conn=conn))
        assert lab.records("conn.close", conn=conn)[0]["reason"] == "peer_closed"
        assert not lab.records("limit")


def test_handshake_deadline_closes_a_client_that_never_authenticates():
    with limited_lab(handshake_timeout=0.3, idle_timeout=60) as lab:
        s = connect(lab, "emsmdb")
        s.sendall(bind_pdu(EMSMDB, ntlm.getNTLMSSPType1("", "", True).getData()))
        assert bind_answer(s) == rpcrt.MSRPC_BINDACK        # carries the CHALLENGE
        assert closed_by_server(s)                          # no AUTH3 ever follows
        conn = conn_of(lab, s)
        assert lab.records("ntlm.challenge", conn=conn)
        rec = the_limit(lab, "handshake_timeout")
        assert (rec["listener"], rec["peer"], rec["value"]) == ("emsmdb", peer_of(s), 0.3)
        assert lab.records("conn.close", conn=conn, reason="handshake_timeout")
        assert not lab.records("rpc.identity", conn=conn, source="rpc_auth")
        assert not lab.records("ntlm.authenticate", conn=conn)


def test_defaults_fit_a_small_machine():
    """Worst case of the defaults: every connection holding a full reassembly buffer."""
    limits = default_config().policy.limits
    assert limits.max_connections * limits.max_pdu_size <= 1 << 30
    assert limits.max_connections_per_peer <= limits.max_connections
    assert limits.max_fragment_size <= limits.max_pdu_size
    assert limits.handshake_timeout <= limits.slow_client_timeout <= limits.idle_timeout
