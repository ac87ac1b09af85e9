"""The lab's private MIT realm, with MIT's own client tools: kinit, klist, kvno."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from impacket.ntlm import compute_nthash

from emulator.config import ConfigError, parse_config
from emulator.kerberos.realm import find_tool
from emulator.lab import Lab

from harness.kerberos import (HOSTNAME, REALM, client_env, kadmin, kinit, kvno, need_kerberos,
                              start_kerberos_lab)


def klist(env: dict, *args: str) -> str:
    return subprocess.run([find_tool("klist") or "klist", *args], capture_output=True, text=True,
                          env=env, timeout=30).stdout


def test_ready_info_names_the_realm_and_its_files(krb_lab):
    info = krb_lab.ready_info()
    assert info["realm"] == REALM and isinstance(info["kdc"], int) and info["kdc"] > 0
    assert os.path.isfile(info["krb5_conf"]) and os.path.isfile(info["keytab"])
    assert os.stat(info["keytab"]).st_mode & 0o077 == 0           # a lab secret: owner only
    listed = klist(client_env(krb_lab), "-k", info["keytab"])
    for svc in ("cifs", "host", "exchangeMDB"):
        assert f"{svc}/{HOSTNAME}@{REALM}" in listed
    with socket.create_connection(("127.0.0.1", info["kdc"]), timeout=5):
        pass
    ready = krb_lab.records("kerberos.kdc_ready")
    assert ready and ready[-1]["realm"] == REALM and ready[-1]["host"] == "127.0.0.1"


def test_kinit_gets_a_tgt_and_a_service_ticket(krb_lab):
    proc, ticket = kinit(krb_lab, "alice")
    assert proc.returncode == 0, proc.stderr
    assert f"alice@{REALM}" in klist(ticket.env)
    got = kvno(ticket, f"cifs/{HOSTNAME}@{REALM}")
    assert got.returncode == 0, got.stderr
    assert f"cifs/{HOSTNAME}@{REALM}" in klist(ticket.env)


def test_wrong_password_gets_no_ticket(krb_lab):
    proc, _ = kinit(krb_lab, "bob", password="not-bobs-password", name="bob-wrong")
    assert proc.returncode != 0 and "incorrect" in proc.stderr.lower()


def test_every_lab_user_requires_preauthentication(krb_lab):
    """No AS-REP in a user's key for whoever asks (offline guessing): as in Active Directory."""
    for user in ("alice", "bob", "mallory"):
        got = kadmin(krb_lab, f"getprinc {user}")
        assert got.returncode == 0 and "REQUIRES_PRE_AUTH" in got.stdout, got.stdout


def test_disabled_user_gets_no_ticket(krb_lab):
    proc, _ = kinit(krb_lab, "mallory")
    assert proc.returncode != 0
    assert "revoked" in proc.stderr.lower()        # KDC_ERR_CLIENT_REVOKED: -allow_tix


def test_nt_hash_user_gets_the_rc4_key_equal_to_its_hash():
    need_kerberos()
    dave_hash = compute_nthash("Dave-Pw-5").hex()
    from emulator.config import default_config_with

    cfg = default_config_with({"users": [{"name": "alice", "password": "Alice-Pw-1"},
                                         {"name": "dave", "nt_hash": dave_hash}],
                               "mailboxes": [],
                               "kerberos": {"enabled": True, "hostname": HOSTNAME, "kdc_port": 0}})
    with Lab(cfg) as lab:
        assert lab.realm is not None and lab.realm.ntlm_only == ()
        assert not lab.records("kerberos.ntlm_only")
        # RFC 4757: the RC4-HMAC key of a password is its NT hash, so the password works.
        proc, ticket = kinit(lab, "dave", password="Dave-Pw-5")
        assert proc.returncode == 0, proc.stderr
        # ... and it is the only key dave has: the password can have worked through no other.
        keys = [line for line in kadmin(lab, "getprinc dave").stdout.splitlines()
                if line.startswith("Key: ")]
        assert len(keys) == 1 and "arcfour" in keys[0]
        wrong, _ = kinit(lab, "dave", password="Dave-Pw-6", name="dave-wrong")
        assert wrong.returncode != 0


def test_the_kdc_stops_with_the_lab():
    need_kerberos()
    lab = start_kerberos_lab()
    port, directory = lab.realm.port, lab.realm.directory
    lab.stop()
    assert lab.realm is None and not os.path.exists(directory)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_without_the_section_there_is_no_realm(lab):
    assert lab.realm is None
    assert "kdc" not in lab.ready_info() and not lab.records("kerberos.kdc_ready")


@pytest.mark.parametrize("text, key", [
    ("kerberos: {enabled: yes please}", "kerberos.enabled"),
    ("kerberos: {kdc_port: 70000}", "kerberos.kdc_port"),
    ("kerberos: {hostname: 'a b'}", "kerberos.hostname"),
    ("kerberos: {realm: 'CORP TEST'}", "kerberos.realm"),
    ("kerberos: {kdc: 88}", "kerberos.kdc"),
    ("policy: {require_kerberos: true}", "policy.require_kerberos"),
])
def test_bad_kerberos_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "lab.yaml")
    assert err.value.key == key


def test_kerberos_config_defaults():
    cfg = parse_config("server: {domain: ACME}\nkerberos: {enabled: true}\n")
    assert cfg.kerberos.enabled and cfg.kerberos.kdc_port == 88 and cfg.kerberos.hostname == "localhost"
    assert cfg.kerberos.realm_for(cfg.server) == "ACME.TEST"


def test_serve_writes_the_kerberos_fields_into_the_ready_file(tmp_path):
    need_kerberos()
    cfg = tmp_path / "lab.yaml"
    cfg.write_text("users: [{name: alice, password: Alice-Pw-1}]\n"
                   "kerberos: {enabled: true, realm: LAB.TEST, hostname: exch01.corp.test}\n")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "serve", "--config", str(cfg), "--smb-port", "0",
         "--epm-port", "0", "--emsmdb-port", "0", "--kdc-port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no ready file"
        info = json.loads(ready.read_text())
        assert info["realm"] == "LAB.TEST" and info["kdc"] > 0
        assert os.path.isfile(info["krb5_conf"]) and os.path.isfile(info["keytab"])
        directory = os.path.dirname(info["keytab"])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Kerberos realm LAB.TEST" in err
    assert not os.path.exists(directory)       # the realm went with the lab
