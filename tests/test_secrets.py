"""Exposure and secrets: listening beyond loopback is explicit and warned about, and no password,
NT hash, NTLMv2 key, session key or NTLMv2 response of the lab's users reaches an event, a log
line, a report, a repr or the terminal, in plain, hex or base64 form. Captures carry NTLM
exchanges by nature, but never a password or an NT hash."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from impacket import ntlm
from impacket.dcerpc.v5 import rpcrt
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_WINNT
from impacket.smb3structs import SMB2_DIALECT_311
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.config import default_config
from emulator.interfaces.emsmdb import EMSMDB_UUID
from emulator.lab import Lab

from harness.cast import dn

CONFIG = default_config()
DOMAIN = CONFIG.server.domain
EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
NDR = uuidtup_to_bin(("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0"))
WRONG_PASSWORD = "Not-Bobs-Typed-Pw-9"


# ------------------------------------------------------------------------------ secrets

def user_secrets() -> dict[str, bytes]:
    """Per user: password (UTF-8 and UTF-16LE, MS-NLMP 3.3.1), NT hash and NTOWFv2 (3.3.2)."""
    out: dict[str, bytes] = {}
    for u in CONFIG.users:
        if u.password:
            out[f"{u.name} password"] = u.password.encode()
            out[f"{u.name} password utf-16"] = u.password.encode("utf-16-le")
        out[f"{u.name} nt hash"] = u.nt_hash
        out[f"{u.name} NTOWFv2"] = hmac.new(u.nt_hash, (u.name.upper() + DOMAIN).encode("utf-16-le"),
                                            hashlib.md5).digest()
    out["typed wrong password"] = WRONG_PASSWORD.encode()
    return out


def smb_keys(smb, user: str) -> dict[str, bytes]:
    """The SMB2 session key and signing key impacket's side derived (MS-SMB2 3.2.5.3.1)."""
    session = smb.getSMBServer()._Session
    return {f"{user} SMB session key": session["SessionKey"], f"{user} SMB signing key": session["SigningKey"]}


def forms(value: bytes) -> list[bytes]:
    """The spellings a leak could take: as is, hex in either case, base64."""
    return [value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value)]


def leaks(blob: bytes, secrets: dict[str, bytes]) -> list[str]:
    assert all(len(v) >= 8 for v in secrets.values()), "a secret too short to search for"
    return [name for name, value in secrets.items() if any(f in blob for f in forms(value))]


def artefacts(root) -> dict[str, bytes]:
    """Every file under root, pcaps aside (they are checked separately)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


# ------------------------------------------------------------------------------ a logon whose keys we know

def _read_pdu(sock) -> bytes:
    data = b""
    while len(data) < 10 or len(data) < struct.unpack_from("<H", data, 8)[0]:
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        data += chunk
    return data


def known_key_logon(port: int, user: str, password: str) -> dict[str, bytes]:
    """An NTLM bind and AUTH3 done by hand with impacket's NTLM functions, so the test holds
    every value the server derives: the NTLMv2 response, NTProofStr, the session base key
    (MS-NLMP 3.3.2) and the exported session key (3.1.5.1.2 with key exchange)."""
    type1 = ntlm.getNTLMSSPType1("", "", signingRequired=True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_bind(type1.getData()))
        ack = _read_pdu(sock)
        assert ack[2] == rpcrt.MSRPC_BINDACK
        auth_length = struct.unpack_from("<H", ack, 10)[0]
        type2 = ack[len(ack) - auth_length:]
        type3, exported = ntlm.getNTLMSSPType3(type1, type2, user, password, DOMAIN)
        sock.sendall(_auth3(type3.getData()))
        time.sleep(0.2)      # AUTH3 has no answer; give the server the time to take it in
    nt_response = type3["ntlm"]
    response_key = ntlm.NTOWFv2(user, password, DOMAIN)
    nt_proof = nt_response[:16]
    return {
        f"{user} NTLMv2 response": bytes(nt_response),
        f"{user} NTProofStr": bytes(nt_proof),
        f"{user} session base key": hmac.new(response_key, nt_proof, hashlib.md5).digest(),
        f"{user} exported session key": bytes(exported),
    }


def _bind(token: bytes) -> bytes:
    item = rpcrt.CtxItem()
    item["ContextID"], item["TransItems"] = 0, 1
    item["AbstractSyntax"], item["TransferSyntax"] = EMSMDB, NDR
    return _pdu(rpcrt.MSRPC_BIND, struct.pack("<HHIB3x", 5840, 5840, 0, 1) + item.getData(), token)


def _auth3(token: bytes) -> bytes:
    return _pdu(rpcrt.MSRPC_AUTH3, b"\x00" * 4, token)


def _pdu(ptype: int, body: bytes, token: bytes) -> bytes:
    h = rpcrt.MSRPCHeader()
    h["type"], h["flags"], h["call_id"] = ptype, rpcrt.PFC_FIRST_FRAG | rpcrt.PFC_LAST_FRAG, 1
    h["pduData"] = body
    tr = rpcrt.SEC_TRAILER()
    tr["auth_type"], tr["auth_level"], tr["auth_ctx_id"] = RPC_C_AUTHN_WINNT, RPC_C_AUTHN_LEVEL_CONNECT, 1
    h["sec_trailer"], h["auth_data"] = tr, token
    return h.get_packet()


# ------------------------------------------------------------------------------ processes

def rpcauth(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "emulator.cli", *args], capture_output=True, cwd=cwd,
                          timeout=timeout)


def start_serve(tmp, *extra):
    ready = tmp / "ready.json"
    err = open(tmp / "serve.stderr", "wb")
    out = open(tmp / "serve.stdout", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "serve", "--smb-port", "0", "--epm-port", "0",
                             "--emsmdb-port", "0", "--ready-file", str(ready), *extra],
                            stdout=out, stderr=err, cwd=str(tmp))
    err.close()
    out.close()
    end = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail("serve did not start: " + (tmp / "serve.stderr").read_text())
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == 0


# ------------------------------------------------------------------------------ exposure

def test_serve_on_all_interfaces_needs_host_and_warns(tmp_path):
    proc, ready = start_serve(tmp_path, "--host", "0.0.0.0")
    stop(proc)
    err = (tmp_path / "serve.stderr").read_text()
    assert ready["host"] == "0.0.0.0"
    assert "WARNING" in err and "0.0.0.0" in err and "not loopback" in err
    assert "NTLM exchanges" in err


def test_serve_defaults_to_loopback_without_a_warning(tmp_path):
    proc, ready = start_serve(tmp_path)
    with socket.create_connection(("127.0.0.1", ready["emsmdb"]), timeout=10):
        pass
    stop(proc)
    assert ready["host"] == "127.0.0.1"
    assert "WARNING" not in (tmp_path / "serve.stderr").read_text()


# ------------------------------------------------------------------------------ secrets

def test_matrix_run_leaks_no_secret(tmp_path):
    captures, report = tmp_path / "captures", tmp_path / "report"
    r = rpcauth("matrix", "--captures", str(captures), "--json", "--report", str(report), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    files = artefacts(tmp_path)
    pcaps = {k: v for k, v in files.items() if k.endswith((".pcap", ".pcapng"))}
    others = {k: v for k, v in files.items() if k not in pcaps}
    assert pcaps and any(k.endswith("matrix.json") for k in others) and any(k.endswith(".html") for k in others)
    others["stdout"], others["stderr"] = r.stdout, r.stderr
    secrets = user_secrets()
    found = {name: leaks(blob, secrets) for name, blob in others.items()}
    assert not {k: v for k, v in found.items() if v}
    # Captures carry NTLM exchanges; still never a password or an NT hash.
    plain = {k: v for k, v in secrets.items() if "password" in k or "nt hash" in k}
    assert b"NTLMSSP\x00" in b"".join(pcaps.values())
    assert not {k: leaks(v, plain) for k, v in pcaps.items() if leaks(v, plain)}


def test_served_logons_leak_no_secret(tmp_path):
    proc, ready = start_serve(tmp_path, "--events", str(tmp_path / "events.jsonl"),
                              "--captures", str(tmp_path / "captures"))
    secrets = user_secrets()
    runs = []
    try:
        ready_file = str(tmp_path / "ready.json")
        for order, answer in [("ncacn_ip_tcp", f"bob:{CONFIG.user('bob').password}"),
                              ("ncacn_np", f"bob:{CONFIG.user('bob').password}"),
                              ("ncacn_ip_tcp", f"bob:{WRONG_PASSWORD}")]:
            runs.append(rpcauth("client", "--ready-file", ready_file, "--binding-order", order,
                                "--logged-on", f"alice:{CONFIG.user('alice').password}",
                                "--prompt-answer", answer, "--mailbox", dn("bob"), "--json", cwd=str(tmp_path)))
        assert [r.returncode == 0 for r in runs] == [True, False, False]
        secrets.update(known_key_logon(ready["emsmdb"], "bob", CONFIG.user("bob").password))
        smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=ready["smb"], preferredDialect=SMB2_DIALECT_311)
        smb.login("carol", CONFIG.user("carol").password, DOMAIN)
        secrets.update(smb_keys(smb, "carol"))
        smb.logoff()
    finally:
        stop(proc)
    events = (tmp_path / "events.jsonl").read_bytes()
    assert b'"ntlm.authenticate"' in events and b'"user": "bob"' in events
    files = artefacts(tmp_path)
    pcaps = {k: v for k, v in files.items() if k.endswith(".pcap")}
    others = {k: v for k, v in files.items() if k not in pcaps}
    for i, r in enumerate(runs):
        others[f"client {i} stdout"], others[f"client {i} stderr"] = r.stdout, r.stderr
    found = {name: leaks(blob, secrets) for name, blob in others.items()}
    assert not {k: v for k, v in found.items() if v}
    plain = {k: v for k, v in secrets.items() if "password" in k and "typed" not in k or "nt hash" in k}
    assert not {k: leaks(v, plain) for k, v in pcaps.items() if leaks(v, plain)}


def test_debug_logs_reprs_and_errors_leak_no_secret(caplog):
    """In process, with every logger at DEBUG: good and failed logons over TCP and SMB, then the
    reprs of everything a traceback would print."""
    caplog.set_level(logging.DEBUG)
    secrets = user_secrets()
    with Lab() as lab:
        secrets.update(known_key_logon(lab.ports["emsmdb"], "alice", lab.password("alice")))
        known_key_logon(lab.ports["emsmdb"], "bob", WRONG_PASSWORD)
        smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"], preferredDialect=SMB2_DIALECT_311)
        smb.login("bob", lab.password("bob"), DOMAIN)
        secrets.update(smb_keys(smb, "bob"))
        smb.logoff()
        with pytest.raises(Exception) as failed:
            SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"]).login("bob", WRONG_PASSWORD, DOMAIN)
        records = json.dumps(lab.records(), default=str)
        texts = [repr(lab.config), str(lab.config), repr(lab.services.directory), repr(lab.services.auth),
                 repr(failed.value), str(failed.value), records]
        texts += [repr(u) for u in lab.config.users]
    # Ours, not the client library's: impacket logs its own side of the exchange.
    ours = [f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
            if not r.name.startswith("impacket")]
    blob = "\n".join(texts + ours).encode()
    assert "ntlm.authenticate" in records and "wrong_password" in records
    assert not leaks(blob, secrets)


def test_the_search_sees_every_spelling():
    """The negative results above mean something only if the search finds each form."""
    secrets = user_secrets()
    nt = secrets["bob nt hash"]
    for spelled in (nt, nt.hex().encode(), nt.hex().upper().encode(), base64.b64encode(nt)):
        assert leaks(b'{"x": "' + spelled + b'"}', secrets) == ["bob nt hash"]
    assert "alice password utf-16" in leaks("Alice-Pw-1".encode("utf-16-le"), secrets)
