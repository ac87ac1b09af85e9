"""The matrix rows beyond the KB: the synthetic client with Kerberos at either layer, against a
lab that runs its own MIT realm (the client's tickets come from MIT kinit and kvno)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emulator.matrix import kerberos_scenarios, run_row
from emulator.config import default_config

from harness.kerberos import need_kerberos

ROWS = kerberos_scenarios()


@pytest.mark.parametrize("scenario", ROWS, ids=[s.id for s in ROWS])
def test_kerberos_row(scenario):
    need_kerberos()
    result = run_row(scenario, default_config())
    assert result.ok, (result.expected, result.observed)
    assert scenario.beyond_kb
    accepted = [e for e in result.events if e["kind"] == "kerberos.accept"]
    identities = [e for e in result.events if e["kind"] == "rpc.identity"]
    if scenario.ticket:
        # Kerberos proved the user at the layer the row is about, and nothing typed was sent.
        assert accepted and all(a["result"] == "ok" and a["principal"].startswith("alice@")
                                for a in accepted)
        assert not [e for e in result.events if e["kind"] == "ntlm.authenticate"]
        if scenario.expect["auth_layer"] == "rpc_bind":
            assert identities[-1]["auth_layer"] == "rpc_bind/spnego-kerberos"
        else:
            assert [a["service"].split("/")[0] for a in accepted] == ["cifs"]
            assert identities[-1]["source"] == "smb_session"
    else:
        # Negotiate without a ticket: NTLM carried the typed user.
        assert not accepted
        ntlm = [e for e in result.events if e["kind"] == "ntlm.authenticate"]
        assert ntlm and ntlm[-1]["user"] == "bob"


def test_matrix_command_adds_the_kerberos_rows():
    need_kerberos()
    r = subprocess.run([sys.executable, "-m", "emulator.cli", "matrix", "--kerberos"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in ROWS:
        assert f"{s.id} (beyond the KB)" in r.stdout


def test_client_command_with_kerberos_logon_security(tmp_path):
    """`rpcauth client --logon-security kerberos` against a served lab's ready file: alice's own
    ticket opens her mailbox over TCP, and the report says Kerberos carried her."""
    import json

    from harness.kerberos import start_kerberos_lab

    lab = start_kerberos_lab()
    try:
        ready = tmp_path / "ready.json"
        ready.write_text(json.dumps(lab.ready_info()))
        r = subprocess.run(
            [sys.executable, "-m", "emulator.cli", "client", "--ready-file", str(ready),
             "--binding-order", "ncacn_ip_tcp", "--logon-security", "kerberos", "--json",
             "--mailbox", "/o=Corp/ou=Site/cn=Recipients/cn=alice"],
            capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert (report["outcome"], report["auth_mech"], report["prompt_shown"]) == ("opened", "kerberos", False)
        accepted = lab.records("kerberos.accept")
        assert accepted and accepted[-1]["service"].startswith("host/")
        assert lab.records("rpc.identity")[-1]["auth_layer"] == "rpc_bind/spnego-kerberos"
    finally:
        lab.stop()
