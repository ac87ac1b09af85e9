"""captures/ holds one seeded capture per KB matrix row. They must still describe the KB, be
regenerated identically, and decode cleanly in Wireshark."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from scapy.utils import RawPcapReader

from emulator.capture import analyse
from emulator.matrix import kb_scenarios, run_matrix

from harness.cast import need_tool

CAPTURES = os.path.join(os.path.dirname(__file__), "..", "captures")
ROWS = kb_scenarios()


def skeleton(path: str) -> list[tuple]:
    """The auth path of a capture: what compare and explain are about, without bytes."""
    out = []
    for c in analyse(path, progress=None).connections:
        out.append((c.transport, c.identity_source, c.user, c.domain, c.auth_level, tuple(c.pipes),
                    tuple((b.interface_name, b.auth_type, b.auth_level, b.result) for b in c.binds),
                    tuple((e.call, e.user_dn, e.status) for e in c.emsmdb)))
    return out


def payload_streams(path: str) -> dict[tuple[int, int], bytes]:
    """Each direction's TCP payload, concatenated: independent of how recv() chunked it."""
    import struct

    streams: dict[tuple[int, int], bytearray] = {}
    for data, _meta in RawPcapReader(path):
        ihl = (data[14] & 0x0F) * 4
        tcp = data[14 + ihl:]
        sport, dport = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            streams.setdefault((sport, dport), bytearray()).extend(payload)
    return {k: bytes(v) for k, v in streams.items()}


def test_every_row_has_a_capture_that_tells_the_kb_story():
    matrix = json.load(open(os.path.join(CAPTURES, "matrix.json")))
    assert matrix["ok"] and {r["id"] for r in matrix["rows"]} == {s.id for s in ROWS}
    for s in ROWS:
        conns = [c for c in analyse(os.path.join(CAPTURES, f"{s.id}.pcap"), progress=None).connections if c.emsmdb]
        connect = conns[-1].emsmdb[0]
        assert connect.user_dn == s.mailbox
        want = s.expect["acting_user"]
        if want is None:        # the bind's NTLM failed: the call never ran
            assert connect.fault and connect.status == "0x00000005"
        else:
            assert f"{conns[-1].domain}\\{conns[-1].user}" == want
            assert connect.status_name == s.expect["status_name"]
            expected_source = "smb_session" if s.expect["auth_layer"] == "smb_session_setup" else "rpc_auth"
            assert conns[-1].identity_source == expected_source


def test_regenerated_captures_keep_skeleton_and_are_byte_identical_with_seed(tmp_path):
    rows = [s for s in ROWS if s.id in ("np-uns-off", "tcp-uns-on", "tcp-wrong-password-uns-off")]
    first, second = tmp_path / "a", tmp_path / "b"
    run_matrix(rows, capture_dir=str(first), seed=1)
    run_matrix(rows, capture_dir=str(second), seed=1)
    for s in rows:
        committed = os.path.join(CAPTURES, f"{s.id}.pcap")
        a, b = str(first / f"{s.id}.pcap"), str(second / f"{s.id}.pcap")
        assert skeleton(a) == skeleton(committed)
        # Same seed, same bytes in both directions of every connection.
        assert payload_streams(a) == payload_streams(b)


@pytest.mark.parametrize("row", [s.id for s in ROWS])
def test_tshark_decodes_reference_capture(row):
    tshark = need_tool("tshark")
    path = os.path.join(CAPTURES, f"{row}.pcap")
    bad = subprocess.run([tshark, "-r", path, "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0 and bad.stdout.strip() == "", bad.stdout
    fields = subprocess.run([tshark, "-r", path, "-Y", "mapi.EcDoConnect.name || ntlmssp.auth.username",
                             "-T", "fields", "-e", "mapi.EcDoConnect.name", "-e", "ntlmssp.auth.username"],
                            capture_output=True, text=True, timeout=60).stdout.split()
    c = [c for c in analyse(path, progress=None).connections if c.emsmdb][-1]
    assert c.emsmdb[0].user_dn in fields
    if c.identity_source == "rpc_auth":
        assert c.user in fields
    elif c.identity_source == "none":   # the bind's logon was refused: the user it offered
        assert c.offered_user in fields and c.emsmdb[0].fault
        # ... in the frame where tshark reads that user's NTLM AUTHENTICATE, not the fault's.
        frames = subprocess.run([tshark, "-r", path, "-Y", "ntlmssp.messagetype == 3", "-T", "fields",
                                 "-e", "frame.number"], capture_output=True, text=True, timeout=60).stdout.split()
        assert str(c.offered_frame) in frames
    else:
        assert c.smb_user in fields
