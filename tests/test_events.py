"""The event envelope of DESIGN.md section 5, and the guard against secrets in events."""

import json

import pytest

from emulator.events import Event, EventLog, event, malformed


def test_fields_sit_at_top_level(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), clock=lambda: 1795597200.123456)
    log.emit("c7", event("rpc", "rpc.bind", transport="ncacn_np", result="ok"))
    log.close()
    rec = json.loads(path.read_text().splitlines()[0])
    assert rec == {"time": "2026-11-25T09:00:00.123456Z", "conn": "c7", "layer": "rpc", "kind": "rpc.bind",
                   "transport": "ncacn_np", "result": "ok"}


@pytest.mark.parametrize("name", ["password", "nt_hash", "session_key"])
def test_secret_field_names_are_refused(name):
    with pytest.raises(ValueError):
        Event("ntlm", "ntlm.authenticate", {name: "x"})


def test_filtering_by_kind_prefix_and_field():
    log = EventLog()
    log.emit("c1", event("smb", "smb.negotiate", dialect="3.1.1"))
    log.emit("c1", event("smb", "smb.session_setup", user="alice", result="ok"))
    log.emit("c2", malformed("rpc", "frag_length_too_small"))
    assert [r["kind"] for r in log.records("smb.")] == ["smb.negotiate", "smb.session_setup"]
    assert log.records("smb.session_setup", user="alice")[0]["result"] == "ok"
    assert log.records("malformed", conn="c2")[0]["reason"] == "frag_length_too_small"
    assert len(list(log)) == 3
