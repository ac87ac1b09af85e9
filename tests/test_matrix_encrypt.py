"""`rpcauth matrix --encrypt`: the KB table against a lab that requires SMB3 encryption.

The KB's outcome does not change (the pipe still inherits the SMB session's identity); the named-
pipe rows' SMB sessions are encrypted, their captures unreadable without keys, and the report,
reading them with the lab users' keys, shows the encryption and the EcDoConnect inside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from emulator.matrix import kb_scenarios

PASSWORD = "Alice-Pw-1"


def explain(path, *keys: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "emulator.cli", "explain", str(path), "--format", "json", *keys],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_kb_table_unchanged_when_the_server_requires_encryption(tmp_path):
    r = subprocess.run([sys.executable, "-m", "emulator.cli", "matrix", "--encrypt", "--json",
                        "--captures", str(tmp_path), "--report", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["smb_encryption"] == "required"
    assert [row["id"] for row in doc["rows"]] == [s.id for s in kb_scenarios()]
    rows = {row["id"]: row for row in doc["rows"]}
    inherited = [row for row in doc["rows"] if row["observed"]["auth_layer"] == "smb_session_setup"]
    assert {row["id"] for row in inherited} >= {"np-uns-off", "np-uns-on"}
    for row in inherited:
        assert row["smb_encryption"], row["id"]   # the server encrypted the session the pipe inherits

    # np-uns-off: the typed password is ignored, the server acts as the logged-on alice, under encryption.
    row = rows["np-uns-off"]
    assert (row["observed"]["acting_user"], row["observed"]["status_name"]) == ("CORP\\alice", "ecLoginPerm")
    capture = tmp_path / row["capture"]
    assert explain(capture)["connections"] == []          # without keys the pipe is not seen
    [conn] = [c for c in explain(capture, "--password", f"alice:{PASSWORD}")["connections"] if "emsmdb" in c["pipes"]]
    assert (conn["user"], conn["identity_source"]) == ("alice", "smb_session")
    assert [e["user_dn"] for e in conn["emsmdb"]] == ["/o=Corp/ou=Site/cn=Recipients/cn=bob"]

    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    [cipher] = row["smb_encryption"]
    assert f"SMB3 encrypted ({cipher}), decrypted and verified with the session key" in html
    assert "EcDoConnect(/o=Corp/ou=Site/cn=Recipients/cn=bob)" in html
