"""`rpcauth replay`: a capture's client side sent to the emulator, the answers compared.

Real captures (../shared/captures/reference), the project's own reference captures, and
captures recorded here from impacket's client stack against a lab. The server is always a real
lab on loopback; what it did is read from its own event stream.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import yaml
from harness.cast import REFERENCE, dn, need_tool

from emulator.capture.unseal import Keyring
from emulator.config import default_config, default_config_with
from emulator.lab import Lab
from emulator.replay import EmbeddedTarget, ServedTarget, TargetError, replay
from emulator.replay.framing import RPC, SMB, Cutter
from emulator.replay.report import render, status
from emulator.replay.target import loopback_host

RPCAUTH = [sys.executable, "-m", "emulator.cli"]
HERE = os.path.dirname(os.path.abspath(__file__))
CAPTURES = os.path.join(HERE, "..", "captures")
DEFAULT_LAB = os.path.join(HERE, "..", "emulator", "default_lab.yaml")
REF = os.path.normpath(REFERENCE)
MAPI = os.path.join(REF, "mapi.pcap")
needs_ref = pytest.mark.skipif(not os.path.isfile(MAPI),
                               reason=f"reference captures are not at {REF} (../shared/captures/reference)")
EMSMDB_STREAM = 23       # mapi.pcap: the EMSMDB bind, AUTH3 as CNAMIS\ALeonard, EcDoConnect (tshark)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(RPCAUTH + ["replay", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def conversation(run, stream: int):
    [c] = [c for c in run.conversations if c.stream == stream]
    return c


def row_at(c, frame: int):
    [r] = [r for r in c.replay.rows if r.frame == frame]
    return r


# ---------------------------------------------------------------------- a real network's capture

@needs_ref
def test_mapi_endpoint_mapper_replays_and_the_logon_parts_at_auth3():
    target = EmbeddedTarget()
    try:
        run = replay(MAPI, target)
        lab_events = target.lab.records()
    finally:
        target.close()
    # The endpoint-mapper lookup that found EMSMDB's port replays to the same answer, and the
    # captured port (1032) is mapped to the one our endpoint mapper gave.
    epm = conversation(run, 22)
    assert status(epm) == "identical"
    emsmdb = conversation(run, EMSMDB_STREAM)
    assert emsmdb.server.endswith(":1032") and emsmdb.listener == "emsmdb"
    [mapped] = [r for r in lab_events if r["kind"] == "epm.map" and r.get("interface") == emsmdb_uuid()]
    assert emsmdb.port == int(mapped["result"])

    e = emsmdb.replay
    auth3 = e.rows[e.parted_at]
    assert auth3.sent.startswith("auth3") and "ALeonard" in auth3.sent
    assert not auth3.reauthored
    # Why: the server's own verdict on that AUTHENTICATE, not a guess.
    [refusal] = [ev for ev in auth3.failures if ev["kind"] == "ntlm.authenticate"]
    assert refusal["user"] == "ALeonard" and refusal["result"] != "ok"
    # The first visible difference is the call after it: the original server ran EcDoConnect.
    first = e.rows[e.first_difference]
    assert first.index == auth3.index + 1 and "EcDoConnect" in first.sent
    assert any("ecSuccess" in s.label for s in first.original)
    assert not any("ecSuccess" in s.label for s in first.ours)
    captured, ours = e.challenges()[0]
    assert captured and ours and captured != ours
    # EcDoConnect never ran as ALeonard: the lab's events show no mailbox logon at all on it.
    mine = [r for r in lab_events if r.get("conn") == emsmdb.conn]
    assert mine and not [r for r in mine if r["kind"] == "emsmdb.connect"]
    assert not [r for r in lab_events if "aleonard" in str(r.get("acting_user", "")).lower()]


def emsmdb_uuid() -> str:
    from emulator.capture.model import EMSMDB_UUID
    return EMSMDB_UUID


@needs_ref
def test_mapi_cli_text_names_the_parting_message_and_the_reason():
    r = run_cli(MAPI, "--stream", "22", "--stream", str(EMSMDB_STREAM))
    assert r.returncode == 1, r.stderr      # parted ways
    out = r.stdout
    assert "parted ways at frame 714 (auth3: NTLMv1 AUTHENTICATE as CNAMIS\\ALeonard)" in out
    assert "our server refused the NTLM AUTHENTICATE as CNAMIS\\ALeonard" in out
    assert "First difference on the wire at frame 715" in out
    assert "tcp.stream 22: identical to the end" in out


@needs_ref
def test_unauthenticated_smb_path_of_a_real_capture_replays_until_the_logon(tmp_path):
    # raw_ntlm_in_smb.pcap: an SMB1 client offering SMB2 too. Our server answers SMB2; the
    # capture's server stayed in SMB1, and the report says so at the negotiate.
    r = run_cli(os.path.join(REF, "raw_ntlm_in_smb.pcap"), "--format", "json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    [c] = doc["conversations"]
    first = c["messages"][0]
    assert first["sent"].startswith("SMB1 negotiate") and not first["same"]
    assert "SMB1 negotiate" in first["original"][0] and "SMB2 negotiate" in first["emulator"][0]


# ---------------------------------------------------------------------- our captures

def test_tcp_uns_off_replays_to_ecsuccess_with_the_auth_leg_reauthored():
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--lab", DEFAULT_LAB, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert not doc["deterministic"]
    [emsmdb] = [c for c in doc["conversations"] if c["listener"] == "emsmdb"]
    assert emsmdb["status"] == "identical"
    assert [x["frame"] for x in emsmdb["reauthored"]] == [22]
    [connect] = [m for m in emsmdb["messages"] if "EcDoConnect" in m["sent"]]
    assert connect["emulator"] == connect["original"] and "ecSuccess" in connect["emulator"][0]
    # The server's own events: bob logged on in the bind and EcDoConnect ran as him.
    kinds = {ev["kind"]: ev for ev in emsmdb["server_events"]}
    assert kinds["ntlm.authenticate"]["result"] == "ok" and kinds["ntlm.authenticate"]["user"] == "bob"
    assert kinds["emsmdb.connect"]["acting_user"] == "CORP\\bob"
    assert kinds["emsmdb.connect"]["status_name"] == "ecSuccess"
    challenge = emsmdb["challenges"][0]
    assert challenge["captured"] != challenge["ours"]


def test_tcp_uns_off_without_a_password_is_refused_for_the_challenge():
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--format", "json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    [emsmdb] = [c for c in doc["conversations"] if c["listener"] == "emsmdb"]
    # The frame of the captured AUTH3, as tshark reads it (the client's AUTH3 and first request
    # may share a TCP segment, so one frame can hold two messages).
    auth_frame = int(subprocess.run(
        [need_tool("tshark"), "-r", os.path.join(CAPTURES, "tcp-uns-off.pcap"), "-Y", "ntlmssp.messagetype == 3",
         "-T", "fields", "-e", "frame.number"], capture_output=True, text=True, timeout=60, check=True).stdout.split()[0])
    assert emsmdb["parted_at"]["frame"] == auth_frame and not emsmdb["reauthored"]
    refusals = [ev["result"] for m in emsmdb["messages"] if m["frame"] == auth_frame
                for ev in m["refusals"] if ev["kind"] == "ntlm.authenticate"]
    assert refusals == ["wrong_password"]
    assert any("computed for another challenge" in w for w in emsmdb["why"])
    assert not [ev for ev in emsmdb["server_events"] if ev["kind"] == "emsmdb.connect"]


def test_np_uns_off_replays_to_the_same_ecloginperm():
    path = os.path.join(CAPTURES, "np-uns-off.pcap")
    target = EmbeddedTarget()
    try:
        run = replay(path, target, keyring=Keyring.build(lab=DEFAULT_LAB))
        events = target.lab.records()
    finally:
        target.close()
    [c] = run.conversations
    assert c.listener == "smb" and status(c) == "identical", render(run, "text")
    reauthored = [r for r in c.replay.rows if r.reauthored]
    assert len(reauthored) == 1 and "session_setup" in reauthored[0].sent
    [connect] = [r for r in c.replay.rows if any("EcDoConnect" in s.label for s in r.ours)]
    assert [s.label for s in connect.ours] == [s.label for s in connect.original]
    assert "ecLoginPerm" in connect.ours[0].label
    # The server acted on the SMB session's user (alice), and every signed request verified.
    [logon] = [ev for ev in events if ev["kind"] == "emsmdb.connect"]
    assert (logon["acting_user"], logon["identity_source"], logon["status_name"]) == \
        ("CORP\\alice", "smb_session", "ecLoginPerm")
    assert logon["user_dn"] == dn("bob")
    assert not [ev for ev in events if ev["kind"] == "malformed" or ev["kind"] == "smb.signature"]


def test_np_uns_off_without_a_password_parts_at_the_session_setup():
    target = EmbeddedTarget()
    try:
        run = replay(os.path.join(CAPTURES, "np-uns-off.pcap"), target)
    finally:
        target.close()
    [c] = run.conversations
    parted = c.replay.rows[c.replay.parted_at]
    assert "session_setup" in parted.sent and "AUTHENTICATE" in parted.sent
    assert [s.label for s in parted.ours] == ["SMB2 session_setup: STATUS_LOGON_FAILURE"]
    assert any(ev["kind"] == "smb.session_setup" and ev["result"] == "wrong_password" for ev in parted.failures)
    assert any("signed with the capture's session key" in n for n in c.replay.notes)


# ---------------------------------------------------------------------- captures recorded here

def _record(path, config=None, **kw):
    return Lab(config, capture_file=str(path), **kw)


def test_sealed_rpc_is_unsealed_with_the_captures_keys_and_sealed_again_with_ours(tmp_path):
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import (
        RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
        RPC_C_AUTHN_WINNT,
    )

    from emulator.client.runner import EMSMDB_IF
    from emulator.interfaces.emsmdb import hEcDoConnect, hEcDoDisconnect

    cap = tmp_path / "sealed.pcap"
    with _record(cap) as lab:
        t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
        t.set_credentials("bob", lab.password("bob"), "CORP")
        dce = t.get_dce_rpc()
        dce.set_auth_type(RPC_C_AUTHN_WINNT)
        dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
        dce.connect()
        dce.bind(EMSMDB_IF)
        status_, handle, _ = hEcDoConnect(dce, dn("bob"))
        hEcDoDisconnect(dce, handle)
        dce.disconnect()
    assert status_ == 0
    target = EmbeddedTarget()
    try:
        run = replay(str(cap), target, keyring=Keyring.build({"bob": default_config().user("bob").password}))
        events = target.lab.records()
    finally:
        target.close()
    [c] = run.conversations
    assert status(c) == "identical", render(run, "text")
    what = [r.reauthored for r in c.replay.rows if r.reauthored]
    assert what[0].startswith("NTLMv2 AUTHENTICATE") and what[1:] == ["sealed again with our session's keys"] * 2
    [logon] = [ev for ev in events if ev["kind"] == "emsmdb.connect"]
    assert logon["auth_level"] == "privacy" and logon["status_name"] == "ecSuccess"
    assert not [ev for ev in events if ev["kind"] in ("rpc.verify", "malformed")]


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_smb1_named_pipe_capture_replays_with_ids_and_signatures_of_our_server(tmp_path, signing):
    from impacket import smb
    from impacket.dcerpc.v5 import transport
    from impacket.smbconnection import SMBConnection

    from emulator.client.runner import EMSMDB_IF
    from emulator.interfaces.emsmdb import hEcDoConnect

    overrides = {"policy": {"smb_signing_required": signing}}
    config = default_config_with(overrides)
    cap = tmp_path / "smb1.pcap"
    with _record(cap, config) as lab:
        conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"],
                             preferredDialect=smb.SMB_DIALECT, timeout=10)
        conn.login("alice", lab.password("alice"), "CORP")
        t = transport.SMBTransport("127.0.0.1", lab.ports["smb"], r"\emsmdb", smb_connection=conn)
        dce = t.get_dce_rpc()
        dce.connect()
        dce.bind(EMSMDB_IF)
        assert hEcDoConnect(dce, dn("bob"))[0] == 0x3F2
        dce.disconnect()
        conn.logoff()
    lab_file = tmp_path / "lab.yaml"
    with open(DEFAULT_LAB, encoding="utf-8") as fh:
        merged = yaml.safe_load(fh)
    merged.setdefault("policy", {})["smb_signing_required"] = signing
    lab_file.write_text(yaml.safe_dump(merged))
    r = run_cli(str(cap), "--lab", str(lab_file), "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    [c] = json.loads(r.stdout)["conversations"]
    assert c["status"] == "identical"
    assert [m["sent"].split(":")[0] for m in c["messages"] if m["reauthored"]] == ["SMB1 session_setup_andx"]
    assert any("ecLoginPerm" in x for m in c["messages"] for x in m["emulator"])
    kinds = [ev["kind"] for ev in c["server_events"]]
    assert "smb.signature" not in kinds and "malformed" not in kinds
    [setup] = [ev for ev in c["server_events"] if ev["kind"] == "smb.session_setup"]
    assert setup["signing"] is signing


# ---------------------------------------------------------------------- the seeded case

def _seeded_capture(tmp_path, seed: int):
    cap = tmp_path / "seeded.pcap"
    ready = tmp_path / "ready.json"
    with _record(cap, seed=seed) as lab:
        ready.write_text(json.dumps(lab.ready_info()))
        r = subprocess.run(RPCAUTH + ["client", "--ready-file", str(ready), "--binding-order", "ncacn_ip_tcp",
                                      "--prompt-answer", "bob", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    return cap


def test_seeded_capture_against_a_lab_with_the_same_seed_verifies_and_says_so_loudly(tmp_path):
    cap = _seeded_capture(tmp_path, 11)
    r = run_cli(str(cap), "--seed", "11")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: DETERMINISTIC LAB" in r.stdout and "WARNING" in r.stderr
    r = run_cli(str(cap), "--seed", "11", "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["deterministic"] and doc["warnings"]
    [emsmdb] = [c for c in doc["conversations"] if c["listener"] == "emsmdb"]
    [ch] = emsmdb["challenges"]
    assert ch["captured"] == ch["ours"]
    assert not emsmdb["reauthored"]     # the captured AUTHENTICATE itself went through
    assert any(ev["kind"] == "emsmdb.connect" and ev["status_name"] == "ecSuccess" for ev in emsmdb["server_events"])


def test_seeded_capture_against_a_lab_without_a_seed_is_refused(tmp_path):
    cap = _seeded_capture(tmp_path, 11)
    r = run_cli(str(cap), "--format", "json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert not doc["deterministic"] and not doc["warnings"]
    [emsmdb] = [c for c in doc["conversations"] if c["listener"] == "emsmdb"]
    [ch] = emsmdb["challenges"]
    assert ch["captured"] != ch["ours"]
    assert any(ev["kind"] == "ntlm.authenticate" and ev["result"] == "wrong_password"
               for ev in emsmdb["server_events"])


# ---------------------------------------------------------------------- loopback only

def _public_copy(src: str, dst) -> None:
    """The capture with its addresses moved to public (documentation) ranges."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import rdpcap, wrpcap

    packets = rdpcap(src)
    clients = {p[TCP].sport for p in packets if p[TCP].flags.S and not p[TCP].flags.A}
    for p in packets:
        from_client = p[TCP].sport in clients
        p[IP].src, p[IP].dst = ("198.51.100.7", "203.0.113.9") if from_client else ("203.0.113.9", "198.51.100.7")
        del p[IP].chksum
        del p[TCP].chksum
    wrpcap(str(dst), packets)


def test_replay_connects_to_loopback_only_whatever_the_capture_says(tmp_path, monkeypatch):
    public = tmp_path / "public.pcap"
    _public_copy(os.path.join(CAPTURES, "tcp-uns-off.pcap"), public)
    peers: list[tuple] = []
    real_connect = socket.socket.connect

    def recording_connect(self, address):
        peers.append(address)
        return real_connect(self, address)

    target = EmbeddedTarget()
    try:
        monkeypatch.setattr(socket.socket, "connect", recording_connect)
        run = replay(str(public), target, keyring=Keyring.build(lab=DEFAULT_LAB))
        monkeypatch.undo()
        opens = target.lab.records("conn.open")
    finally:
        target.close()
    assert [c.client.split(":")[0] for c in run.conversations] == ["198.51.100.7", "198.51.100.7"]
    assert len(run.conversations) == 2 and all(status(c) == "identical" for c in run.conversations)
    assert peers and all(host == "127.0.0.1" for host, _port in peers)
    assert len(opens) == len(run.conversations)
    assert all(o["peer"].startswith("127.0.0.1:") for o in opens)


def test_a_ready_file_naming_another_host_is_refused(tmp_path):
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"host": "192.0.2.10", "smb": 445, "epm": 135, "emsmdb": 6001, "pid": 1}))
    with pytest.raises(TargetError, match="not a loopback address"):
        ServedTarget(str(ready))
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--to", str(ready))
    assert r.returncode == 2 and "loopback" in r.stderr and "Traceback" not in r.stderr
    for host in ("127.0.0.1", "::1", "localhost"):
        assert loopback_host(host) in ("127.0.0.1", "::1")
    for host in ("10.0.0.1", "example.org", "0.0.0.0"):
        with pytest.raises(TargetError):
            loopback_host(host)


# ---------------------------------------------------------------------- a served lab, hostile input

@pytest.fixture
def served(tmp_path):
    ready = tmp_path / "ready.json"
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(RPCAUTH + ["serve", "--smb-port", "0", "--epm-port", "0", "--emsmdb-port", "0",
                                       "--ready-file", str(ready), "--events", str(events)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not become ready: {proc.stderr.read()}")
        time.sleep(0.05)
    yield ready, events
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_replay_to_a_served_lab_reads_its_events_file(served):
    ready, events = served
    bob = default_config().user("bob").password
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--to", str(ready), "--events", str(events),
                "--password", f"bob:{bob}", "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    [emsmdb] = [c for c in json.loads(r.stdout)["conversations"] if c["listener"] == "emsmdb"]
    assert emsmdb["server_conn"] and emsmdb["status"] == "identical"
    assert any(ev["kind"] == "emsmdb.connect" and ev["acting_user"] == "CORP\\bob" for ev in emsmdb["server_events"])


def _fresh_client_opens_bobs_mailbox(ready) -> None:
    r = subprocess.run(RPCAUTH + ["client", "--ready-file", str(ready), "--binding-order", "ncacn_ip_tcp",
                                  "--prompt-answer", "bob", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["outcome"] == "opened"


def _hostile_capture(path) -> None:
    """Client bytes that start like SMB or DCE/RPC and then lie: bad lengths, offsets past the
    end, garbage after a valid first message, tokens that are not tokens."""
    from emulator.capture.recorder import CaptureWriter
    from emulator.rpc import pdu as P

    rng = random.Random(146188)
    bind = bytes.fromhex("05000b03100000004800000001000000d016d016000000000100000000000100"
                         "00db f1a4 47ca 6710 b31f 00dd 0106 62da 5100 0000 045d 888a eb1c c911 9fe8 0800 2b10 4860 0200 0000"
                         .replace(" ", ""))
    cases = [
        (135, bind[:8] + b"\xff\xff" + bind[10:]),                               # frag_length too large
        (135, bind[:10] + b"\x40\x00" + bind[12:] + b"\x00" * 8),                # auth_length overruns
        (135, bind + P.assemble(P.REQUEST, 3, 2, b"\x00" * 8 + b"\xff" * 40)),   # call on a bogus context
        (135, bind + bytes(rng.getrandbits(8) for _ in range(300))),             # garbage after a bind
        (445, b"\x00\x00\x00\x50\xfeSMB" + bytes(rng.getrandbits(8) for _ in range(76))),
        (445, b"\x00\x00\x00\x23\xffSMB\x72" + b"\x00" * 26 + b"\x00\x02\x00\x02N"),   # dialect without NUL
        (445, b"\x85\x00\x00\x00" + b"\x00\x00\x00\x44\xfeSMB\x40\x00" + b"\x00" * 60),
    ]
    with CaptureWriter(str(path)) as writer:
        for i, (port, payload) in enumerate(cases):
            rec = writer.stream(("198.51.100.20", 40000 + i), ("203.0.113.30", port))
            rec.client_data(payload)
            rec.close()


def test_hostile_capture_gets_a_report_and_the_served_lab_keeps_serving(served, tmp_path):
    ready, events = served
    hostile = tmp_path / "hostile.pcap"
    _hostile_capture(hostile)
    r = run_cli(str(hostile), "--to", str(ready), "--events", str(events), "--timeout", "1", "--format", "json")
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["conversations"] or doc["skipped"]
    _fresh_client_opens_bobs_mailbox(ready)


def test_mutated_client_bytes_never_break_replay_or_the_lab(served, tmp_path):
    """Bounded: 12 mutations of a real conversation's client side, from a fixed seed."""
    from emulator.capture.recorder import CaptureWriter
    from emulator.replay.framing import conversation as conv_of
    from emulator.replay.framing import kind_of
    from emulator.replay.source import read_streams

    ready, events = served
    [epm, emsmdb] = read_streams(os.path.join(CAPTURES, "tcp-uns-off.pcap"))
    rng = random.Random(14)
    path = tmp_path / "mutated.pcap"
    with CaptureWriter(str(path)) as writer:
        for i in range(12):
            stream = emsmdb if i % 2 else epm
            conv = conv_of(stream, kind_of(stream))
            rec = writer.stream(("127.0.0.1", 41000 + i), ("127.0.0.1", stream.server[1]))
            for ex in conv.exchanges:
                data = bytearray(ex.sent.data)
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                rec.client_data(bytes(data))
                for answer in ex.answers:
                    rec.server_data(answer.data)
            rec.close()
    r = run_cli(str(path), "--to", str(ready), "--events", str(events), "--timeout", "1")
    assert r.returncode in (0, 1, 2), r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    _fresh_client_opens_bobs_mailbox(ready)


@needs_ref
def test_truncated_capture_is_a_clear_error(tmp_path):
    with open(MAPI, "rb") as fh:
        data = fh.read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:len(data) // 2 + 7])
    r = run_cli(str(cut))
    assert r.returncode == 2
    assert "truncated" in r.stderr and "Traceback" not in r.stderr


def test_random_bytes_are_not_a_capture(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(random.Random(3).randbytes(4096))
    r = run_cli(str(junk))
    assert r.returncode == 2
    assert "not a pcap or pcapng file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(str(tmp_path / "missing.pcap"))
    assert r.returncode == 2 and "cannot open capture" in r.stderr


def test_asking_for_a_stream_the_capture_does_not_have(tmp_path):
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--stream", "9")
    assert r.returncode == 2 and "no TCP stream 9" in r.stderr


# ---------------------------------------------------------------------- formats

@needs_ref
def test_html_report_uses_the_capture_ladders(tmp_path):
    r = run_cli(MAPI, "--stream", "22", "--stream", str(EMSMDB_STREAM), "--format", "html")
    assert r.returncode == 1
    html = r.stdout
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("<svg") >= 4              # the capture's ladder and the replay's, per conversation
    assert "parted here" in html and "CNAMIS\\ALeonard" in html
    assert "<script" not in html


def test_replays_own_capture_is_readable_by_tshark(tmp_path):
    import shutil
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (scripts/bootstrap.sh installs it)")
    out = tmp_path / "replayed.pcap"
    r = run_cli(os.path.join(CAPTURES, "tcp-uns-off.pcap"), "--lab", DEFAULT_LAB, "--save-capture", str(out))
    assert r.returncode == 0, r.stderr
    t = subprocess.run(["tshark", "-r", str(out), "-Y", "ntlmssp.messagetype == 3", "-T", "fields",
                        "-e", "ntlmssp.auth.username"], capture_output=True, text=True, timeout=60)
    assert t.stdout.split() == ["bob"]


# ---------------------------------------------------------------------- framing and wire helpers

def test_cutters_find_the_same_messages_whatever_the_tcp_split():
    from emulator.replay.source import read_streams

    rng = random.Random(7)
    for name, kind in (("tcp-uns-off.pcap", RPC), ("np-uns-off.pcap", SMB)):
        for stream in read_streams(os.path.join(CAPTURES, name)):
            whole = b"".join(c.data for c in stream.chunks if c.from_client)
            expected = Cutter(kind).feed(whole)
            for _ in range(20):
                cutter, got, pos = Cutter(kind), [], 0
                while pos < len(whole):
                    step = rng.randint(1, 97)
                    got += cutter.feed(whole[pos:pos + step])
                    pos += step
                assert got == expected and cutter.pending == 0


def test_replace_auth_value_keeps_everything_but_the_token():
    from emulator.rpc import pdu as P

    frag = P.assemble(P.AUTH3, 3, 5, b"\x00" * 4, auth=(10, 2, 0, b"NTLMSSP\x00" + b"x" * 40))
    new = P.replace_auth_value(frag, b"NTLMSSP\x00" + b"y" * 100)
    a, b = P.decode(frag), P.decode(new)
    assert b.auth.token == b"NTLMSSP\x00" + b"y" * 100
    assert (a.call_id, a.auth.auth_type, a.auth.auth_level, a.auth.context_id, a.auth.pad_length) == \
        (b.call_id, b.auth.auth_type, b.auth.auth_level, b.auth.context_id, b.auth.pad_length)
    assert new[:8] == frag[:8] and b.header.frag_length == len(new)


def test_reports_carry_no_password_nor_nt_hash():
    import base64

    config = default_config()
    secrets = []
    for user in config.users:
        if user.password:
            secrets.append(user.password)
        secrets += [bytes(user.nt_hash).hex(), bytes(user.nt_hash).hex().upper(),
                    base64.b64encode(bytes(user.nt_hash)).decode()]
    for path in ("tcp-uns-off.pcap", "np-uns-off.pcap"):
        for fmt in ("text", "json", "html"):
            r = run_cli(os.path.join(CAPTURES, path), "--lab", DEFAULT_LAB, "--format", fmt)
            assert r.returncode == 0, r.stderr
            leaked = [s for s in secrets if s and (s in r.stdout or s in r.stderr)]
            assert not leaked, f"{path} {fmt}"
