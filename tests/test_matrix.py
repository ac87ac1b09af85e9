"""Every KB matrix row end to end: the synthetic client (impacket) against a real Lab, with the
verdict read from the server's own events."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emulator.matrix import kb_scenarios, load_scenarios, run_row
from emulator.config import default_config

SCENARIOS = kb_scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_kb_row(scenario):
    result = run_row(scenario, default_config())
    assert result.ok, (result.expected, result.observed)
    events = result.events
    connects = [e for e in events if e["kind"] == "emsmdb.connect"]
    if scenario.expect["outcome"] == "logon_failure":
        assert not connects, "a failed logon must reach no mailbox"
        auths = [e for e in events if e["kind"] == "ntlm.authenticate"]
        assert auths and auths[-1]["result"] == "wrong_password"
        return
    last = connects[-1]
    assert last["acting_user"] == scenario.expect["acting_user"]
    assert last["user_dn"] == scenario.mailbox
    if scenario.expect["auth_layer"] == "smb_session_setup":
        assert last["identity_source"] == "smb_session"
        # The layer that authenticated is the SMB session setup; the binds carry no auth.
        assert all(e.get("auth_type") in (None, "none") for e in events if e["kind"] == "rpc.bind")
        setup = [e for e in events if e["kind"] == "smb.session_setup" and e.get("result") == "ok"]
        assert setup and setup[-1]["user"] == scenario.expect["acting_user"].split("\\")[1]
    else:
        assert last["identity_source"] == "rpc_auth"
        assert any(e["kind"] == "rpc.bind" and e.get("auth_type") == "ntlm" for e in events)


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.binding_order[0] == "ncacn_np"
                                      and "smb" not in s.disable and s.typed],
                         ids=lambda s: s.id)
def test_typed_credentials_never_reach_the_wire_over_named_pipes(scenario):
    result = run_row(scenario, default_config())
    typed = scenario.typed.partition(":")[0]
    if scenario.ipc_session is None:
        # bob was only typed at the prompt: no AUTHENTICATE for bob may appear anywhere.
        sent = [e for e in result.events if e["kind"] == "ntlm.authenticate" and e.get("user", "").lower() == typed]
        assert sent == [], "the prompt's answer must not be sent in any NTLM AUTHENTICATE"
    assert not any(e["kind"] == "rpc.bind" and e.get("auth_type") not in (None, "none") for e in result.events)
    assert result.report.prompt_shown == (not scenario.use_network_security)
    assert result.report.prompt_answer_used is False


def test_scenarios_file(tmp_path):
    f = tmp_path / "rows.yaml"
    f.write_text("""rows:
  - id: alice-own-over-pipe
    binding_order: [ncacn_np]
    use_network_security: true
    mailbox: /o=Corp/ou=Site/cn=Recipients/cn=alice
    expect: {acting_user: "CORP\\\\alice", outcome: opened, status_name: ecSuccess}
""")
    rows = load_scenarios(f.read_text(), str(f))
    assert run_row(rows[0], default_config()).ok
    r = subprocess.run([sys.executable, "-m", "emulator.cli", "matrix", "--scenarios", str(f), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["rows"][0]["observed"]["acting_user"] == "CORP\\alice"


def test_mismatch_exits_non_zero(tmp_path):
    f = tmp_path / "wrong.yaml"
    f.write_text("""rows:
  - id: claims-pipe-opens-bob
    binding_order: [ncacn_np]
    use_network_security: false
    typed: bob
    expect: {outcome: opened}
""")
    r = subprocess.run([sys.executable, "-m", "emulator.cli", "matrix", "--scenarios", str(f)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "✗" in r.stdout and "MISMATCH" in r.stdout


def test_matrix_command_prints_the_kb_table():
    r = subprocess.run([sys.executable, "-m", "emulator.cli", "matrix"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(SCENARIOS)}/{len(SCENARIOS)} rows as the KB says" in r.stdout
    assert "✗" not in r.stdout
