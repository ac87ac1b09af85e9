"""explain (text, JSON, Mermaid, HTML), compare and the matrix report, on the real reference
captures and on captures of real exchanges with the lab's engines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from emulator.capture import compare, explain, write_report

from harness.cast import CORPUS, REFERENCE
from harness.recording import CONFIG, record_pipe_path, record_tcp_path

REF = os.path.normpath(REFERENCE)
needs_ref = pytest.mark.skipif(not os.path.isdir(REF),
                               reason=f"reference captures not found at {REF} (../shared is absent)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DESIGN_KEYS = {"stream", "transport", "identity_source", "user", "domain", "auth_level", "pipes",
               "binds", "emsmdb", "events"}


def ref(name: str) -> str:
    return os.path.join(REF, name)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("ours")
    tcp, np = str(d / "tcp.pcap"), str(d / "np.pcap")
    assert record_tcp_path(tcp) == 0
    assert record_pipe_path(np) == 0x3F2
    return {"tcp": tcp, "np": np}


class _Tree(HTMLParser):
    """Checks that every element closes in order (void elements aside) and collects tags."""
    VOID = {"meta", "br", "link", "img", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_html(page: str) -> _Tree:
    t = _Tree()
    t.feed(page)
    t.close()
    assert not t.errors and not t.stack, (t.errors, t.stack)
    return t


# ------------------------------------------------------------------------- explain


@needs_ref
def test_text_verdict_for_mapi_pcap():
    text = explain(ref("mapi.pcap"), progress=False)
    assert ("EcDoConnect for /o=SolutionsIQ/ou=CNAMIS/cn=Recipients/cn=ALEONARD ran as CNAMIS\\ALeonard, "
            "authenticated in the RPC bind with NTLMv1 at level connect in frame 714 -> ecSuccess (0x00000000)") in text
    assert "bind emsmdb v0.81 (ntlm, connect)" in text


@needs_ref
def test_json_contract_on_the_reference_captures():
    for name, source, level, user in [("mapi.pcap", "rpc_auth", "connect", "ALeonard"),
                                      ("raw_ntlm_in_smb.pcap", "smb_session", "none", "test"),
                                      ("dce_rpc_ntlm.pcapng", "rpc_auth", "integrity", "Administrator")]:
        doc = json.loads(explain(ref(name), "json", progress=False))
        assert doc["capture"] == ref(name)
        assert all(DESIGN_KEYS <= set(c) for c in doc["connections"])
        matches = [c for c in doc["connections"] if c["identity_source"] == source and c["user"] == user]
        assert matches and all(c["auth_level"] == level for c in matches), name
        for c in matches:
            frames = [e["frame"] for e in c["events"]]
            assert frames == sorted(frames)
            if c["transport"] == "ncacn_np":
                assert c["smb_user"] == user
            else:
                assert "smb_user" not in c


@needs_ref
def test_mermaid_is_a_sequence_diagram():
    text = explain(ref("raw_ntlm_in_smb.pcap"), "mermaid", progress=False)
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    for line in lines[1:]:
        assert line.startswith("  ")
        body = line.strip()
        assert body.startswith(("participant ", "Note over ")) or "->>" in body or "-->>" in body, line
        assert ";" not in body and "#" not in body
    assert any("[31] bind srvsvc" in line for line in lines)


@needs_ref
def test_html_is_self_contained_and_has_an_svg_ladder():
    page = explain(ref("mapi.pcap"), "html", progress=False)
    tree = parse_html(page)
    assert "svg" in tree.tags and "style" in tree.tags
    assert "script" not in tree.tags and "link" not in tree.tags
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "714" in "".join(tree.text)  # the frame of ALeonard's AUTHENTICATE, as in Wireshark


def test_explain_our_pipe_capture_names_the_inherited_identity(ours):
    text = explain(ours["np"], progress=False)
    assert ("EcDoConnect for /o=Corp/ou=Site/cn=Recipients/cn=bob ran as CORP\\alice, inherited from "
            "the SMB session set up in frame") in text
    assert text.rstrip().endswith("-> ecLoginPerm (0x000003f2)")


def test_unknown_format_is_refused(ours):
    with pytest.raises(ValueError):
        explain(ours["tcp"], "xml", progress=False)


# ------------------------------------------------------------------------- compare


@needs_ref
def test_compare_same_capture_is_same():
    assert compare(ref("mapi.pcap"), ref("mapi.pcap")).same


@needs_ref
def test_our_tcp_path_matches_mapi_pcap(ours):
    r = compare(ours["tcp"], ref("mapi.pcap"))
    assert r.same, r.lines
    assert any("rpc_bind" in line and "ntlm" in line for line in r.lines)


@needs_ref
def test_our_pipe_path_matches_raw_ntlm_in_smb(ours):
    r = compare(ours["np"], ref("raw_ntlm_in_smb.pcap"))
    assert r.same, r.lines
    assert any("smb_session_setup" in line for line in r.lines)


@needs_ref
def test_different_paths_are_reported_field_by_field(ours):
    r = compare(ours["np"], ours["tcp"])
    assert not r.same
    text = "\n".join(r.lines)
    for word in ("transport differs", "auth layer differs", "identity kind differs", "emsmdb status differs"):
        assert word in text
    r2 = compare(ref("raw_ntlm_in_smb.pcap"), ref("dce_rpc_ntlm.pcapng"))
    assert not r2.same and any("auth level differs" in line for line in r2.lines)


def test_compare_cli_exit_status(ours):
    same = subprocess.run([sys.executable, "-m", "emulator.cli", "compare", ours["tcp"], ours["tcp"]],
                          capture_output=True, text=True, timeout=60)
    differ = subprocess.run([sys.executable, "-m", "emulator.cli", "compare", ours["tcp"], ours["np"]],
                            capture_output=True, text=True, timeout=60)
    assert same.returncode == 0 and "same path" in same.stdout
    assert differ.returncode != 0 and "differs" in differ.stdout


# ------------------------------------------------------------------------- report


def _rows(ours):
    return [
        {"row": "ncacn_np, Use Network Security off, bob's password typed",
         "expected": {"identity": "alice", "auth layer": "SMB session setup", "result": "ecLoginPerm"},
         "observed": {"identity": "alice", "auth layer": "SMB session setup", "result": "ecLoginPerm"},
         "capture": ours["np"]},
        {"row": "ncacn_ip_tcp, bob's password typed",
         "expected": {"identity": "bob", "auth layer": "RPC bind (NTLM)", "result": "opened"},
         "observed": {"identity": "bob", "auth layer": "RPC bind (NTLM)", "result": "opened"},
         "capture": ours["tcp"]},
        {"row": "a row without capture", "expected": {"identity": "bob"}, "observed": {"identity": "none"}},
    ]


def test_report_has_the_kb_table_ladders_and_links(ours, tmp_path):
    path = write_report(str(tmp_path / "rep"), _rows(ours))
    page = open(path, encoding="utf-8").read()
    tree = parse_html(page)
    assert tree.tags.count("svg") == 2 and "table" in tree.tags
    text = "".join(tree.text)
    assert "2 of 3 rows behaved as expected" in text
    assert "ran as CORP\\alice, inherited from the SMB session" in text
    assert "ran as CORP\\bob, authenticated in the RPC bind with NTLMv2" in text
    assert os.path.relpath(ours["np"], str(tmp_path / "rep")) in page
    assert "expected bob" in text and "observed none" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(ours, tmp_path):
    path = write_report(str(tmp_path / "rep"), _rows(ours))
    shot = str(tmp_path / "shot.png")
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    f"--screenshot={shot}", "--window-size=1000,1400", "file://" + path],
                   capture_output=True, timeout=120)
    assert os.path.exists(shot)
    assert len(set(_png_pixels(shot))) > 2  # not blank: text and ladder lines drawn on white


def _png_pixels(path: str) -> bytes:
    """The raw (filtered) scanline bytes of a PNG: enough to tell a blank page from a drawn one."""
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


# ------------------------------------------------------------------------- sealed stubs


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    from impacket.dcerpc.v5 import rpcrt
    path = str(tmp_path_factory.mktemp("sealed") / "privacy.pcap")
    assert record_tcp_path(path, level=rpcrt.RPC_C_AUTHN_LEVEL_PKT_PRIVACY) == 0
    return path


def _conn(doc):
    [c] = json.loads(doc)["connections"]
    return c


def test_privacy_stubs_stay_sealed_without_a_key(sealed):
    c = _conn(explain(sealed, "json", progress=False))
    assert c["auth_level"] == "privacy"
    [call] = c["emsmdb"]
    assert call["sealed"] and call["user_dn"] is None and call["status"] is None


def test_password_unseals_and_verifies(sealed):
    bob_pw = CONFIG.user("bob").password
    doc = explain(sealed, "json", passwords={"bob": bob_pw}, progress=False)
    c = _conn(doc)
    [call] = c["emsmdb"]
    assert (call["user_dn"], call["status_name"], call["unsealed"]) == (
        "/o=Corp/ou=Site/cn=Recipients/cn=bob", "ecSuccess", True)
    assert c["verified_pdus"] >= 2 and c["bad_signatures"] == 0
    # The password and the NT hash never reach the output.
    assert bob_pw not in doc and CONFIG.user("bob").nt_hash.hex() not in doc.lower()
    by_lab = _conn(explain(sealed, "json", lab=CONFIG, progress=False))
    assert by_lab["emsmdb"] == c["emsmdb"]


def test_wrong_password_reads_nothing(sealed):
    c = _conn(explain(sealed, "json", passwords=["bob:not-his-password"], progress=False))
    assert [e["result"] for e in c["events"] if e["kind"] == "ntlm.session_keys"] == ["wrong_password"]
    assert c["emsmdb"][0]["sealed"] and c["emsmdb"][0]["user_dn"] is None


def test_tampered_sealed_stub_fails_verification(sealed, tmp_path):
    from emulator.capture.pcapread import parse_tcp, read_packets
    data = bytearray(open(sealed, "rb").read())
    # Find the EcDoConnect request (the first request PDU) and flip one sealed stub byte.
    offset = 24
    for pkt in read_packets(sealed):
        seg = parse_tcp(pkt)
        rec_len = 16 + len(pkt.data)
        if seg and seg.payload[:3] == b"\x05\x00\x00":
            payload_at = offset + 16 + len(pkt.data) - len(seg.payload)
            data[payload_at + 40] ^= 0x01
            break
        offset += rec_len
    bad = str(tmp_path / "tampered.pcap")
    open(bad, "wb").write(bytes(data))
    c = _conn(explain(bad, "json", passwords={"bob": CONFIG.user("bob").password}, progress=False))
    assert c["bad_signatures"] >= 1
    assert any(e["kind"] == "rpc.verify" and e["result"] == "bad_seal" for e in c["events"])


SMB3 = os.path.join(os.path.normpath(CORPUS), "smb3.pcap")


@pytest.mark.skipif(not os.path.isfile(SMB3), reason=f"the capture corpus is not at {os.path.dirname(SMB3)}")
def test_a_session_without_pipes_shows_in_every_format():
    """smb3.pcap: an SMB 3.0 session set up in the clear, then only encrypted messages. No RPC
    connection, yet the user, the mechanism and the encrypted count show in each format."""
    text = explain(SMB3, progress=False)
    assert "session setup (ntlm) as SUSE\\administrator: established" in text
    assert "then 44 encrypted message(s), not readable" in text
    doc = json.loads(explain(SMB3, "json", progress=False))
    assert doc["connections"] == []
    [session] = [s for n in doc["streams"] for s in n["smb_sessions"]]
    assert (session["user"], session["domain"], session["established"], session["encrypted_messages"]) == \
        ("administrator", "SUSE", True, 44)
    tree = parse_html(explain(SMB3, "html", progress=False))
    assert "SUSE\\administrator" in "".join(tree.text)
