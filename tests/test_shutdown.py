"""Lossless shutdown of `rpcauth serve`: a signal while many SMB sessions are open and RPC calls
are in flight ends the process promptly, with every capture complete and every connection's
close written to the events file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from impacket.dcerpc.v5 import transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, RPC_C_AUTHN_WINNT
from impacket.smb3structs import SMB2_DIALECT_311
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.config import default_config
from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect, hEcDoDisconnect

from harness.cast import dn, need_tool

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
PASSWORDS = {u.name: u.password for u in default_config().users if u.password}
SHUTDOWN_BOUND = 5.0     # seconds from the signal to the process's exit
TCP_CALLERS = 4
SMB_CALLERS = 2


def start_server(tmp_path):
    paths = {name: str(tmp_path / name) for name in ("captures", "events.jsonl", "ready.json", "stderr.txt")}
    err = open(paths["stderr.txt"], "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "serve", "--smb-port", "0", "--epm-port", "0", "--emsmdb-port", "0",
         "--captures", paths["captures"], "--events", paths["events.jsonl"], "--ready-file", paths["ready.json"]],
        stdout=subprocess.DEVNULL, stderr=err, cwd=str(tmp_path))
    err.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(paths["ready.json"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("rpcauth serve did not start: " + open(paths["stderr.txt"]).read())
        time.sleep(0.05)
    with open(paths["ready.json"]) as fh:
        return proc, json.load(fh), paths


def smb_session_with_pipe(ready):
    smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=ready["smb"], preferredDialect=SMB2_DIALECT_311,
                        timeout=10)
    smb.login("alice", PASSWORDS["alice"], "CORP")
    t = transport.SMBTransport("127.0.0.1", ready["smb"], r"\emsmdb", smb_connection=smb)
    dce = t.get_dce_rpc()
    dce.connect()
    dce.bind(EMSMDB)
    return smb, dce


def tcp_caller(ready, stop, calls):
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{ready['emsmdb']}]")
    rt.set_credentials("bob", PASSWORDS["bob"], "CORP")
    rt.set_connect_timeout(10)
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)
    dce.connect()
    dce.bind(EMSMDB)
    while not stop.is_set():
        status, handle, _ = hEcDoConnect(dce, dn("bob"))
        assert status == 0
        hEcDoDisconnect(dce, handle)
        calls.append(1)


def pipe_caller(dces, stop, calls):
    while not stop.is_set():
        for dce in dces:
            hEcDoConnect(dce, dn("alice"))       # ecLoginPerm or success: traffic either way
            calls.append(1)


def run_in_thread(target, *args):
    def guarded():
        try:
            target(*args)
        except Exception:
            pass        # the server going away mid-call is the point of this test
    t = threading.Thread(target=guarded, daemon=True)
    t.start()
    return t


def read_errors(tool, path):
    """What a Wireshark tool says about reading a whole capture: None when it read cleanly."""
    args = {"tshark": ["tshark", "-n", "-r", path], "capinfos": ["capinfos", path]}[tool]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or "cut short" in r.stderr or "error" in r.stderr.lower():
        return f"{tool} {os.path.basename(path)}: exit {r.returncode}: {r.stderr.strip()[-300:]}"
    return None


@pytest.mark.parametrize("sig, sessions", [(signal.SIGTERM, 100), (signal.SIGINT, 20)], ids=["SIGTERM", "SIGINT"])
def test_signal_with_sessions_open_and_calls_in_flight_loses_nothing(tmp_path, sig, sessions):
    for tool in ("tshark", "capinfos", "mergecap"):
        need_tool(tool)
    proc, ready, paths = start_server(tmp_path)
    stop = threading.Event()
    calls: list[int] = []
    held = []
    try:
        held = [smb_session_with_pipe(ready) for _ in range(sessions)]
        dces = [dce for _, dce in held]
        threads = [run_in_thread(tcp_caller, ready, stop, calls) for _ in range(TCP_CALLERS)]
        threads += [run_in_thread(pipe_caller, dces[i::SMB_CALLERS], stop, calls) for i in range(SMB_CALLERS)]
        end = time.monotonic() + 30
        while len(calls) < 50 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(calls) >= 50, "traffic never started"

        proc.send_signal(sig)
        try:
            proc.wait(timeout=SHUTDOWN_BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"rpcauth serve still running {SHUTDOWN_BOUND} s after {sig.name}")
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for smb, _ in held:
            try:
                smb.close()
            except Exception:
                pass
    for t in threads:
        t.join(15)
    stderr = open(paths["stderr.txt"]).read()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "captures closed and events flushed" in stderr

    # Every line is whole JSON; every opened connection was closed; the lab's stop is last.
    with open(paths["events.jsonl"]) as fh:
        raw = fh.read()
    assert raw.endswith("\n")
    records = [json.loads(line) for line in raw.splitlines()]
    opened = {r["conn"] for r in records if r["kind"] == "conn.open"}
    closed = [r["conn"] for r in records if r["kind"] == "conn.close"]
    assert len(closed) == len(set(closed))
    assert opened == set(closed)
    smb_conns = {r["conn"] for r in records if r["kind"] == "conn.open" and r["listener"] == "smb"}
    assert len(smb_conns) >= sessions
    reasons = {r["conn"]: r["reason"] for r in records if r["kind"] == "conn.close"}
    assert all(reasons[c] == "shutdown" for c in smb_conns)
    assert records[-1]["kind"] == "lab.stopped"
    assert sum(r["kind"] == "emsmdb.connect" for r in records) >= 50

    # One capture per connection, each complete. capinfos reads every file with Wireshark's own
    # file library; tshark dissects the files of the TCP callers that were mid-call and all
    # files merged into one (mergecap too refuses a file cut short in a record).
    pcaps = sorted(os.path.join(paths["captures"], f) for f in os.listdir(paths["captures"]))
    assert len(pcaps) == len(opened)
    merged = str(tmp_path / "merged.pcap")
    merge = subprocess.run(["mergecap", "-w", merged] + pcaps, capture_output=True, text=True, timeout=60)
    assert merge.returncode == 0 and "cut short" not in merge.stderr, merge.stderr
    checks = [("capinfos", p) for p in pcaps] + [("tshark", merged)]
    checks += [("tshark", p) for p in pcaps if p.endswith("-emsmdb.pcap")]
    with ThreadPoolExecutor(4) as pool:
        errors = [e for e in pool.map(lambda c: read_errors(*c), checks) if e]
    assert not errors, errors[:3]
