"""explain reads SMB3-encrypted captures given a password (or the lab config), checked against
tshark.

The captures are recorded by a lab whose policy requires encryption, with Samba's rpcclient and
smbclient (`--client-protection=encrypt`, on 3.0, 3.0.2 and 3.1.1, each 3.1.1 cipher) and
impacket's SMB3 client (AES-128-CCM, the one cipher it implements) calling EcDoConnect over
\\emsmdb. The truth is Wireshark's: tshark, given the user's password, names the NTLMSSP session
key; a second run given only that key (`uat:smb2_seskey_list`) decrypts the transforms. The pipes,
RPC binds, EcDoConnect names and users it then sees must be explain's, and so must the number of
messages decrypted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from emulator.config import load_config
from emulator.lab import Lab
from harness.cast import need_tool
from harness.smb_peers import EC_LOGIN_PERM, emsmdb_pipe, impacket_login, mailbox_answers

PASSWORD = "Alice-Pw-1"
SESSION_KEY = re.compile(r"NTLMSSP SessionKey \(([0-9a-f]{32})\)")


@pytest.fixture(scope="module")
def lab_file(tmp_path_factory) -> Path:
    """The embedded lab with `policy.smb_encryption: required`, as a file `--lab` can read."""
    config = yaml.safe_load(resources.files("emulator").joinpath("default_lab.yaml").read_text("utf-8"))
    config.setdefault("policy", {})["smb_encryption"] = "required"
    path = tmp_path_factory.mktemp("lab") / "lab.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def record(lab_file: Path, out: Path, play) -> tuple[Path, object]:
    """Run `play(lab)` against a fresh encrypting lab: the one SMB capture it leaves, and what
    `play` returned."""
    with Lab(load_config(str(lab_file)), captures=str(out)) as lab:
        played = play(lab)
        paths = list(lab.capture_paths)
    smb = [p for p in paths if p.endswith("-smb.pcap")]
    assert len(smb) == 1, paths
    return Path(smb[0]), played


def samba(tool: str, proto: str, algorithm: str | None, command: list[str]):
    need_tool(tool)
    extra = [f"--option=client smb3 encryption algorithms={algorithm}"] if algorithm else []

    def play(lab) -> None:
        argv = [tool, "-U", f"CORP/alice%{PASSWORD}", "-p", str(lab.ports["smb"]), "-m", proto,
                f"--option=clientipcmaxprotocol={proto}", f"--option=clientipcminprotocol={proto}",
                "--client-protection=encrypt", *extra, *command]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    return play


def impacket_emsmdb(lab) -> tuple[int, str]:
    """EcDoConnect for bob's mailbox over an encrypted 3.0 session; impacket's own (SessionId,
    session key), for tshark: its NTLM exchange negotiates neither signing nor key exchange,
    and Wireshark then names no NTLMSSP session key from the password."""
    smb = impacket_login(lab, "alice", "3.0")
    assert mailbox_answers(emsmdb_pipe(lab, smb), "bob") == [EC_LOGIN_PERM]
    session = smb._SMBConnection._Session
    keys = session["SessionID"], session["SessionKey"].hex()   # read before close() clears them
    smb.close()
    return keys


def explain(path: Path, *keys: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "emulator.cli", "explain", str(path), "--format", "json", *keys],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sessions(doc: dict) -> list[dict]:
    return [s for st in doc["streams"] for s in st.get("smb_sessions", [])]


def tshark(path: Path, *args: str) -> list[str]:
    out = subprocess.run([need_tool("tshark"), "-r", str(path), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def wireshark_session_key(path: Path) -> tuple[int, str]:
    """(SessionId, session key) as Wireshark's NTLMSSP dissector derives them from the password."""
    [(sid, key)] = {(int(s, 16), m.group(1))
                    for line in tshark(path, "-o", f"ntlmssp.nt_password:{PASSWORD}", "-Y", "ntlmssp.messagetype == 3",
                                       "-T", "fields", "-E", "separator=|", "-e", "smb2.sesid", "-e", "_ws.expert.message")
                    for s, m in [(line.split("|")[0].split(",")[0], SESSION_KEY.search(line))] if m}
    return sid, key


def tshark_truth(path: Path, session: tuple[int, str] | None = None) -> dict:
    """What Wireshark reads in the capture given only (SessionId, session key): the decrypted
    messages. The key is Wireshark's own (from the password) unless the client's is given."""
    sid, key = session or wireshark_session_key(path)
    # Wireshark's SMB2 key table: SessionId as on the wire, session key, and no S2C/C2S keys
    # (it derives them itself, 3.1.1 preauth hash included).
    keyed = ["-o", f'uat:smb2_seskey_list:{sid.to_bytes(8, "little").hex()},{key},"",""']

    def fields(flt: str, *names: str) -> list[str]:
        args = ["-Y", flt, "-T", "fields"] + [a for n in names for a in ("-e", n)]
        return tshark(path, *keyed, *args)
    # A transform tshark opened shows the SMB2 header inside it.
    nonces = fields("smb2.header.transform.nonce && smb2.cmd", "smb2.header.transform.nonce")
    return {
        "decrypted": sum(len(line.split(",")) for line in nonces),
        "pipes": sorted(set(fields("smb2.cmd == 5 && smb2.flags.response == 0", "smb2.filename"))),
        "binds": sorted(set(u for line in fields("dcerpc.pkt_type == 11", "dcerpc.cn_bind_to_uuid")
                            for u in line.split(","))),
        "users": sorted(set(fields("ntlmssp.messagetype == 3", "ntlmssp.auth.username"))),
        "ecdoconnect": sorted(set(fields("mapi.EcDoConnect.name", "mapi.EcDoConnect.name"))),
        "malformed": fields("_ws.malformed || _ws.expert.severity >= error", "frame.number"),
    }


def explain_view(doc: dict) -> dict:
    conns = doc["connections"]
    return {
        "decrypted": sum(s["decrypted_messages"] for s in sessions(doc)),
        "pipes": sorted({p for c in conns for p in c["pipes"]}),
        "binds": sorted({b["interface"] for c in conns for b in c["binds"] if b["kind"] == "bind"}),
        "users": sorted({s["user"] for s in sessions(doc)} | {c["smb_user"] for c in conns}),
        "ecdoconnect": sorted({e["user_dn"] for c in conns for e in c["emsmdb"] if e["user_dn"]}),
    }


CASES = [
    ("rpcclient", "SMB3_00", None, ["127.0.0.1", "-c", "srvinfo"], "AES-128-CCM"),
    ("rpcclient", "SMB3_02", None, ["127.0.0.1", "-c", "epmlookup"], "AES-128-CCM"),
    ("rpcclient", "SMB3_11", "AES-128-CCM", ["127.0.0.1", "-c", "srvinfo"], "AES-128-CCM"),
    ("rpcclient", "SMB3_11", "AES-128-GCM", ["127.0.0.1", "-c", "srvinfo"], "AES-128-GCM"),
    ("rpcclient", "SMB3_11", "AES-256-CCM", ["127.0.0.1", "-c", "srvinfo"], "AES-256-CCM"),
    ("smbclient", "SMB3_11", "AES-256-GCM", ["-L", "127.0.0.1"], "AES-256-GCM"),
    ("smbclient", "SMB3_02", None, ["-L", "127.0.0.1"], "AES-128-CCM"),
]


@pytest.mark.parametrize("tool, proto, algorithm, command, cipher", CASES,
                         ids=[f"{t}-{p}-{a or 'default'}" for t, p, a, _, _ in CASES])
def test_samba_encrypted_capture_reads_as_tshark_reads_it(tmp_path, lab_file, tool, proto, algorithm, command, cipher):
    path, _ = record(lab_file, tmp_path, samba(tool, proto, algorithm, command))
    doc = explain(path, "--password", f"alice:{PASSWORD}")
    [session] = sessions(doc)
    assert (session["cipher"], session["decryption"], session["failed_messages"]) == (cipher, "ok", 0)
    assert session["encrypted_messages"] == 0 and session["decrypted_messages"] > 0
    truth = tshark_truth(path)
    assert truth["malformed"] == []
    view = explain_view(doc)
    assert truth["decrypted"] == view["decrypted"]
    assert truth["users"] == view["users"] == ["alice"]
    assert truth["pipes"] and truth["pipes"] == view["pipes"]
    assert truth["binds"] and truth["binds"] == view["binds"]
    assert {c["user"] for c in doc["connections"]} == {"alice"}  # the pipe inherits the session


def test_impacket_ecdoconnect_inside_encryption_with_the_lab_config(tmp_path, lab_file):
    """impacket on 3.0 (AES-128-CCM): the EMSMDB pipe, its bind and the EcDoConnect inside the
    transforms, read with the lab's NT hashes (`--lab`) as tshark reads them with the key."""
    path, session = record(lab_file, tmp_path, impacket_emsmdb)
    doc = explain(path, "--lab", str(lab_file))
    truth, view = tshark_truth(path, session), explain_view(doc)
    assert truth["malformed"] == []
    assert view == {k: truth[k] for k in view}
    assert truth["pipes"] == ["emsmdb"] and any("cn=bob" in n for n in truth["ecdoconnect"])
    [conn] = doc["connections"]
    assert (conn["user"], conn["identity_source"]) == ("alice", "smb_session")


def test_without_keys_or_with_a_wrong_password_nothing_is_decrypted(tmp_path, lab_file):
    path, _ = record(lab_file, tmp_path, samba("rpcclient", "SMB3_11", None, ["127.0.0.1", "-c", "srvinfo"]))
    for keys, reason in (((), "no_keys"), (("--password", "alice:not-her-password"), "wrong_password")):
        doc = explain(path, *keys)
        [session] = sessions(doc)
        # The session's user and dialect still show; the rest is marked encrypted, and why.
        assert (session["user"], session["dialect"], session["established"]) == ("alice", "3.1.1", True)
        assert (session["decryption"], session["decrypted_messages"]) == (reason, 0)
        assert session["encrypted_messages"] > 0 and doc["connections"] == []
    text = subprocess.run([sys.executable, "-m", "emulator.cli", "explain", str(path), "--password",
                           "alice:not-her-password"], capture_output=True, text=True, timeout=120).stdout
    assert "not readable (wrong_password)" in text


def _tamper(path: Path, nth: int) -> Path:
    """A copy of the capture with one ciphertext byte of the nth TRANSFORM message flipped
    (the header, and so the session and nonce, left as they were)."""
    data = bytearray(path.read_bytes())
    starts = [m.start() for m in re.finditer(rb"\xfdSMB", bytes(data))]
    data[starts[nth] + 52 + 4] ^= 0x01   # after the 52-byte transform header
    out = path.with_name("tampered.pcap")
    out.write_bytes(bytes(data))
    return out


def test_tampered_ciphertext_fails_verification_and_is_not_read(tmp_path, lab_file):
    path, _ = record(lab_file, tmp_path, samba("rpcclient", "SMB3_11", "AES-128-GCM", ["127.0.0.1", "-c", "srvinfo"]))
    clear = sessions(explain(path, "--password", f"alice:{PASSWORD}"))[0]
    doc = explain(_tamper(path, 0), "--password", f"alice:{PASSWORD}")   # the tree connect request
    [session] = sessions(doc)
    assert session["failed_messages"] == 1 and session["decryption"] == "ok"
    assert session["decrypted_messages"] == clear["decrypted_messages"] - 1
    # The forged tree connect is not read; the authentic messages after it still are.
    [conn] = doc["connections"]
    kinds = [e["kind"] for e in conn["events"]]
    assert "smb.tree_connect" not in kinds and conn["pipes"] == ["srvsvc"]
    [failed] = [e for e in conn["events"] if e["kind"] == "smb.decrypt_failed"]
    assert (failed["reason"], failed["cipher"], failed["dir"]) == ("transform_bad_signature", "AES-128-GCM", "c2s")
    text = subprocess.run([sys.executable, "-m", "emulator.cli", "explain", str(_tamper(path, 0)), "--password",
                           f"alice:{PASSWORD}"], capture_output=True, text=True, timeout=120).stdout
    assert "SMB3 encrypted (AES-128-GCM): verification failed (transform_bad_signature)" in text


# ---------------------------------------------------------------- Kerberos sessions, with the keytab

KERBEROS_CASES = [("SMB3_00", None, "AES-128-CCM"), ("SMB3_11", "AES-128-GCM", "AES-128-GCM")]


@pytest.fixture(scope="module")
def kerberos_captures(tmp_path_factory):
    """rpcclient with an MIT ticket, encrypting, against a Kerberos lab that requires it: one
    capture per case, and the realm's keytab."""
    from harness.kerberos import HOSTNAME, kerberos_config, kinit, need_kerberos, run_samba

    need_kerberos()
    need_tool("rpcclient")
    tmp = tmp_path_factory.mktemp("krbsmb3")
    keytab = tmp / "lab.keytab"
    lab = Lab(kerberos_config(policy={"smb_encryption": "required"}), captures=str(tmp / "captures")).start()
    try:
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        paths = {}
        for proto, algorithm, cipher in KERBEROS_CASES:
            before = set(lab.capture_paths)
            extra = [f"--option=client smb3 encryption algorithms={algorithm}"] if algorithm else []
            out = run_samba("rpcclient", lab, ticket, [f"ncacn_np:{HOSTNAME}", "-m", proto,
                                                       f"--option=clientipcmaxprotocol={proto}",
                                                       "--client-protection=encrypt", *extra, "-c", "srvinfo"])
            assert out.returncode == 0, out.stdout + out.stderr
            paths[cipher] = [p for p in lab.capture_paths if p not in before]
        keytab.write_bytes(Path(lab.realm.keytab).read_bytes())
    finally:
        lab.stop()
    return {cipher: Path(new[0]) for cipher, new in paths.items() if len(new) == 1}, keytab


def wireshark_kerberos_key(path: Path, keytab: Path) -> tuple[int, str]:
    """(SessionId, session key) as Wireshark reads them with the keytab: the acceptor subkey of
    the session setup's AP-REP (its first 16 bytes: what this tshark's key table takes, and all
    a 128-bit cipher's KDF uses)."""
    [line] = tshark(path, "-o", "kerberos.decrypt:TRUE", "-o", f"kerberos.file:{keytab}", "-Y", "kerberos.msg_type == 15",
                    "-T", "fields", "-E", "separator=|", "-e", "smb2.sesid", "-e", "kerberos.keyvalue")
    sid, key = line.split("|")
    return int(sid, 16), key.split(",")[-1][:32]


@pytest.mark.parametrize("cipher", [c for _, _, c in KERBEROS_CASES])
def test_kerberos_encrypted_capture_reads_with_the_keytab_as_tshark_reads_it(kerberos_captures, cipher):
    paths, keytab = kerberos_captures
    path = paths[cipher]
    assert sessions(explain(path))[0]["decryption"] == "no_keys"
    doc = explain(path, "--keytab", str(keytab))
    [session] = sessions(doc)
    assert (session["cipher"], session["decryption"], session["failed_messages"]) == (cipher, "ok", 0)
    truth, view = tshark_truth(path, wireshark_kerberos_key(path, keytab)), explain_view(doc)
    assert truth["malformed"] == []
    assert truth["decrypted"] == view["decrypted"] > 0
    assert truth["pipes"] == view["pipes"] == ["srvsvc"] and truth["binds"] == view["binds"]
    [conn] = doc["connections"]
    assert (conn["user"], conn["identity_source"]) == ("alice", "smb_session")
