"""`rpcauth serve` as a process, and `rpcauth client` pointed at it with binding strings only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

RPCAUTH = [sys.executable, "-m", "emulator.cli"]


@pytest.fixture
def served(tmp_path):
    ready = tmp_path / "ready.json"
    events = tmp_path / "events.jsonl"
    captures = tmp_path / "captures"
    proc = subprocess.Popen(RPCAUTH + ["serve", "--smb-port", "0", "--epm-port", "0", "--emsmdb-port", "0",
                                       "--ready-file", str(ready), "--events", str(events),
                                       "--captures", str(captures)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not become ready: {proc.stderr.read()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    yield proc, info, events, captures
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ready_file_and_clean_sigterm(served):
    proc, info, events, captures = served
    assert info["host"] == "127.0.0.1" and info["pid"] == proc.pid
    assert all(isinstance(info[k], int) and info[k] > 0 for k in ("smb", "epm", "emsmdb"))
    r = subprocess.run(RPCAUTH + ["client", "--binding", f"ncacn_ip_tcp:127.0.0.1[{info['emsmdb']}]",
                                  "--prompt-answer", "bob", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    assert "emsmdb.connect" in kinds and kinds[-1] == "lab.stopped"
    opened = {x["conn"] for x in lines if x["kind"] == "conn.open"}
    closed = {x["conn"] for x in lines if x["kind"] == "conn.close"}
    assert opened == closed
    pcaps = sorted(os.listdir(captures))
    assert pcaps and all(p.endswith(".pcap") for p in pcaps)


def test_client_with_binding_strings_only(served):
    proc, info, events, _ = served
    # As if the server were remote: nothing but binding strings and the SMB port.
    r = subprocess.run(RPCAUTH + ["client", "--binding", r"ncacn_np:127.0.0.1[\pipe\emsmdb]",
                                  "--smb-port", str(info["smb"]), "--prompt-answer", "bob", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["transport_used"] == "ncacn_np" and report["status_name"] == "ecLoginPerm"
    assert report["prompt_shown"] and not report["prompt_answer_used"]
    assert report["identity_from"] == "inferred" and report["acting_user"] == "CORP\\alice"
    time.sleep(0.2)
    server_view = [json.loads(x) for x in events.read_text().splitlines()]
    assert any(x["kind"] == "emsmdb.connect" and x["acting_user"] == "CORP\\alice" for x in server_view)


def test_text_output_shows_the_dialog(served):
    proc, info, _, _ = served
    r = subprocess.run(RPCAUTH + ["client", "--server", "127.0.0.1", "--smb-port", str(info["smb"]),
                                  "--epm-port", str(info["epm"]), "--binding-order", "ncacn_np,ncacn_ip_tcp",
                                  "--network-security", "off", "--prompt-answer", "bob"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "You do not have permission to log on." in r.stdout
    assert "answer NOT used" in r.stdout


def test_privileged_port_needs_root_or_says_how():
    if os.geteuid() == 0:
        pytest.skip("running as root: port 135 is allowed")
    r = subprocess.run(RPCAUTH + ["serve", "--epm-port", "135", "--smb-port", "0", "--emsmdb-port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--epm-port" in r.stderr


def test_bad_config_is_reported_with_line(tmp_path):
    cfg = tmp_path / "lab.yaml"
    cfg.write_text("users:\n  - {name: a, password: p, colour: blue}\n")
    r = subprocess.run(RPCAUTH + ["serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"{cfg}:2: users[0].colour: unknown key" in r.stderr
