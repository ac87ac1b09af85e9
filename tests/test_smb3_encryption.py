"""SMB 3.x encryption (MS-SMB2 3.1.4.3, 3.3.4.1.4, 3.3.5.2.1.1) against real peers: Samba's
rpcclient and smbclient on every dialect and cipher, impacket's SMB3 client (AES-128-CCM, the one
cipher it implements), and impacket's own encrypted messages tampered with on the wire.

The KB's rule holds under encryption: a pipe's RPC connection without authentication acts as the
SMB session's user, whatever protects the SMB messages.
"""

from __future__ import annotations

import subprocess

import pytest
from impacket import smb3structs as s3
from impacket.smbconnection import SessionError

from emulator.config import default_config_with
from emulator.lab import Lab
from emulator.smb import ntstatus as st
from emulator.smb import smb2_wire as w
from emulator.smb.smb2_signing import kdf_counter_mode
from emulator.smb.smb3_encryption import CIPHERS, choose_cipher, encryption_keys
from harness.cast import need_tool
from harness.smb_peers import EC_LOGIN_PERM, EC_SUCCESS, conn_of, emsmdb_pipe, impacket_login, mailbox_answers

PASSWORD = "Alice-Pw-1"


def lab_with(mode: str, **policy) -> Lab:
    return Lab(default_config_with({"policy": {"smb_encryption": mode, **policy}}))


@pytest.fixture(scope="module")
def desired():
    with lab_with("desired") as lab:
        yield lab


@pytest.fixture(scope="module")
def required():
    with lab_with("required") as lab:
        yield lab


def rpcclient(lab, proto: str, *extra: str, command: str = "srvinfo") -> subprocess.CompletedProcess:
    need_tool("rpcclient")
    argv = ["rpcclient", "-U", f"CORP/alice%{PASSWORD}", "-p", str(lab.ports["smb"]),
            f"--option=clientipcmaxprotocol={proto}", f"--option=clientipcminprotocol={proto}", *extra,
            "127.0.0.1", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def new_records(lab, before: int, kind: str) -> list[dict]:
    return [r for r in lab.records()[before:] if r["kind"] == kind]


# ---------------------------------------------------------------- Samba's clients, every cipher

CASES = [("SMB3_00", None, "3.0", "AES-128-CCM"), ("SMB3_02", None, "3.0.2", "AES-128-CCM"),
         ("SMB3_11", None, "3.1.1", "AES-128-GCM")] + [
    ("SMB3_11", name, "3.1.1", name) for name in ("AES-128-CCM", "AES-128-GCM", "AES-256-CCM", "AES-256-GCM")]


@pytest.mark.parametrize("mode", ["desired", "required"])
@pytest.mark.parametrize("proto, algorithm, dialect, cipher", CASES,
                         ids=[f"{p}-{a or 'default'}" for p, a, _, _ in CASES])
def test_rpcclient_encrypted_srvinfo_over_the_pipe(desired, required, mode, proto, algorithm, dialect, cipher):
    """rpcclient --client-protection=encrypt: NEGOTIATE, SESSION_SETUP, then every request and
    answer sealed, with the cipher the client asked for (3.1.1 honours the client's order)."""
    lab = desired if mode == "desired" else required
    extra = ["--client-protection=encrypt"]
    if algorithm:
        extra.append(f"--option=client smb3 encryption algorithms={algorithm}")
    before = len(lab.records())
    out = rpcclient(lab, proto, *extra)
    assert out.returncode == 0 and "platform_id" in out.stdout, out.stdout + out.stderr
    [on] = new_records(lab, before, "smb.encryption")
    assert (on["cipher"], on["dialect"], on["user"]) == (cipher, dialect, "CORP\\alice")
    [setup] = new_records(lab, before, "smb.session_setup")
    assert setup["cipher"] == cipher and setup["encrypt_data"] is (mode == "required")
    if dialect == "3.1.1":
        # Samba offers AES-128-GMAC first in SIGNING_CAPABILITIES; the server takes the client's order.
        [neg] = new_records(lab, before, "smb.negotiate")
        assert neg["signing_algorithm"] == "AES-128-GMAC"
    # The pipe's RPC connection (no RPC authentication) acts as the session's user.
    [identity] = [r for r in new_records(lab, before, "rpc.identity")][-1:]
    assert (identity["source"], identity["user"]) == ("smb_session", "alice")
    assert not new_records(lab, before, "malformed") and not new_records(lab, before, "smb.refused")


@pytest.mark.parametrize("proto", ["SMB3_00", "SMB3_02", "SMB3_11"])
def test_smbclient_lists_shares_encrypted(desired, proto):
    """smbclient -L: IPC$ and \\srvsvc (NetShareEnumAll), sealed end to end."""
    need_tool("smbclient")
    before = len(desired.records())
    out = subprocess.run(["smbclient", "-L", "127.0.0.1", "-p", str(desired.ports["smb"]), "-U",
                          f"CORP/alice%{PASSWORD}", "--client-protection=encrypt", "-m", proto],
                         capture_output=True, text=True, timeout=60)
    assert "IPC$" in out.stdout, out.stdout + out.stderr
    assert new_records(desired, before, "smb.encryption")
    assert [t["share"] for t in new_records(desired, before, "smb.tree_connect")] == ["IPC$"]


def test_client_that_requires_encryption_is_refused_when_it_is_off():
    with lab_with("off") as lab:
        out = rpcclient(lab, "SMB3_11", "--client-protection=encrypt")
        assert out.returncode != 0 and "encryption" in (out.stdout + out.stderr).lower()
        [neg] = lab.records("smb.negotiate")
        assert neg["cipher"] is None                 # 3.1.1 answered "no cipher in common"
        assert not lab.records("smb.encryption")
        # Without encryption asked, the same client works.
        assert rpcclient(lab, "SMB3_11").returncode == 0


# ---------------------------------------------------------------- impacket (AES-128-CCM)

@pytest.mark.parametrize("dialect", ["3.0", "3.1.1"])
def test_impacket_encrypts_and_the_kb_rule_holds(required, dialect):
    """impacket's SMB3 client seals with AES-128-CCM (the only cipher it implements); under
    `required` the session says ENCRYPT_DATA. alice's pipe still cannot open bob's mailbox."""
    smb = impacket_login(required, "alice", dialect)
    conn = conn_of(required, smb)
    assert smb._SMBConnection._Session["SessionFlags"] & s3.SMB2_SESSION_FLAG_ENCRYPT_DATA
    pipe = emsmdb_pipe(required, smb)
    assert mailbox_answers(pipe, "alice", "bob") == [EC_SUCCESS, EC_LOGIN_PERM]
    [on] = required.records("smb.encryption", conn=conn)
    assert on["cipher"] == "AES-128-CCM"
    connects = required.records("emsmdb.connect", conn=conn)
    assert {(c["acting_user"], c["identity_source"]) for c in connects} == {("CORP\\alice", "smb_session")}
    smb.close()


# ---------------------------------------------------------------- refusals under `required`

def test_smb2_dialect_is_refused_at_session_setup(required):
    """MS-SMB2 3.3.5.5 step 1: a 2.x dialect cannot encrypt, so it gets no session."""
    with pytest.raises(SessionError) as refused:
        impacket_login(required, "alice", "2.1")
    assert refused.value.getErrorCode() == st.STATUS_ACCESS_DENIED
    [r] = [r for r in required.records("smb.refused") if r["reason"] == "dialect_without_encryption"][-1:]
    assert r["command"] == "session_setup" and r["dialect"] == "2.1"


def test_unencrypting_client_is_refused_at_session_setup(required):
    """MS-SMB2 3.3.5.5 step 2: a 3.0 client without SMB2_GLOBAL_CAP_ENCRYPTION (the raw client
    announces no capability) gets no session."""
    from harness.ntlm_messages import negotiate_message
    from harness.smb_client import RawSmb2, spnego_init
    raw = RawSmb2(required.ports["smb"])
    neg = s3.SMB2Negotiate()
    neg["SecurityMode"], neg["Capabilities"], neg["ClientGuid"] = s3.SMB2_NEGOTIATE_SIGNING_ENABLED, 0, b"R" * 16
    neg["Dialects"], neg["DialectCount"] = [s3.SMB2_DIALECT_30], 1
    assert raw.request(s3.SMB2_NEGOTIATE, neg, sid=0).status == 0
    reply = raw.session_setup(spnego_init(negotiate_message().getData()))
    assert reply is not None and reply.status == st.STATUS_ACCESS_DENIED
    assert any(r["reason"] == "client_without_encryption" for r in required.records("smb.refused"))
    raw.close()


def test_unencrypted_request_on_an_encrypted_session_is_refused(required):
    smb = impacket_login(required, "alice", "3.1.1")
    conn = conn_of(required, smb)
    session = smb._SMBConnection._Session
    session["SessionFlags"] &= ~s3.SMB2_SESSION_FLAG_ENCRYPT_DATA      # impacket now sends in clear
    with pytest.raises(SessionError) as denied:
        smb.connectTree("IPC$")
    assert denied.value.getErrorCode() == st.STATUS_ACCESS_DENIED
    [r] = required.records("smb.refused", conn=conn)
    assert (r["reason"], r["command"], r["status"]) == ("unencrypted", "tree_connect", "STATUS_ACCESS_DENIED")
    assert not required.records("smb.tree_connect", conn=conn)
    session["SessionFlags"] |= s3.SMB2_SESSION_FLAG_ENCRYPT_DATA         # sealed again: served
    assert smb.connectTree("IPC$")
    smb.close()


def test_anonymous_is_refused_when_encryption_is_required():
    """Anonymous has no key to encrypt with: no session (as Samba's smbd does)."""
    with lab_with("required", anonymous_allowed=True) as lab:
        need_tool("rpcclient")
        out = subprocess.run(["rpcclient", "-U%", "-p", str(lab.ports["smb"]), "127.0.0.1", "-c", "srvinfo"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert any(r["reason"] == "encryption_required" and r["session_flags"] == "anonymous"
                   for r in lab.records("smb.refused"))
        assert not lab.records("rpc.identity")


# ---------------------------------------------------------------- tampered transforms

class Tap:
    """Wraps an impacket connection's NetBIOS send so a test can change its next message."""

    def __init__(self, smb) -> None:
        self.nb = smb._SMBConnection._NetBIOSSession
        self.sent: list[bytes] = []
        self.change = None
        original = self.nb.send_packet

        def send_packet(data: bytes) -> None:
            data = bytes(data)
            if self.change is not None and data[:4] == w.TRANSFORM_PROTOCOL_ID:
                data, self.change = self.change(data), None
            self.sent.append(data)
            original(data)
        self.nb.send_packet = send_packet


def _flip(offset: int):
    def change(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] ^= 0x01
        return bytes(b)
    return change


@pytest.mark.parametrize("what, change, reason", [
    ("ciphertext", _flip(w.TRANSFORM_HEADER_SIZE + 3), "transform_bad_signature"),
    ("tag", _flip(4), "transform_bad_signature"),
    ("nonce", _flip(20), "transform_bad_signature"),
    ("another session", lambda d: d[:44] + (0x1234).to_bytes(8, "little") + d[52:], "transform_unknown_session"),
    ("flags", lambda d: d[:42] + b"\x02\x00" + d[44:], "transform_bad_flags"),
    ("size", lambda d: d[:36] + (int.from_bytes(d[36:40], "little") + 1).to_bytes(4, "little") + d[40:],
     "transform_size_mismatch"),
])
def test_tampered_transform_drops_the_connection(required, what, change, reason):
    smb = impacket_login(required, "alice", "3.1.1")
    conn = conn_of(required, smb)
    tap = Tap(smb)
    tap.change = change
    with pytest.raises(Exception):
        smb.connectTree("IPC$")
    assert reason in [m["reason"] for m in required.records("malformed", conn=conn)]
    assert not required.records("smb.tree_connect", conn=conn)


def test_replayed_nonce_drops_the_connection(required):
    smb = impacket_login(required, "alice", "3.0")
    conn = conn_of(required, smb)
    tap = Tap(smb)
    tid = smb.connectTree("IPC$")
    sealed = [m for m in tap.sent if m[:4] == w.TRANSFORM_PROTOCOL_ID][-1]
    tap.nb.send_packet(sealed)                   # the same TREE_CONNECT, same nonce, same key
    with pytest.raises(Exception):
        smb.disconnectTree(tid)
    assert "transform_replayed_nonce" in [m["reason"] for m in required.records("malformed", conn=conn)]
    assert len([t for t in required.records("smb.tree_connect", conn=conn) if t["result"] == "ok"]) == 1


# ---------------------------------------------------------------- keys and ciphers

def test_key_derivation_matches_impacket_and_the_spec():
    """3.0.x and 3.1.1 keys against impacket's KDF (an independent implementation of SP800-108);
    AES-256 takes L=256 over the whole session key (MS-SMB2 3.3.5.5.3)."""
    from impacket import crypto
    key, preauth = bytes(range(16)), bytes(range(64))
    out_key, in_key = encryption_keys(w.DIALECT_300, CIPHERS[w.CIPHER_AES128_CCM], key, b"")
    assert out_key == crypto.KDF_CounterMode(key, b"SMB2AESCCM\x00", b"ServerOut\x00", 128)
    assert in_key == crypto.KDF_CounterMode(key, b"SMB2AESCCM\x00", b"ServerIn \x00", 128)
    out_key, in_key = encryption_keys(w.DIALECT_311, CIPHERS[w.CIPHER_AES128_GCM], key, preauth)
    assert out_key == crypto.KDF_CounterMode(key, b"SMBS2CCipherKey\x00", preauth, 128)
    assert in_key == crypto.KDF_CounterMode(key, b"SMBC2SCipherKey\x00", preauth, 128)
    long_key = bytes(range(32))
    out_key, _ = encryption_keys(w.DIALECT_311, CIPHERS[w.CIPHER_AES256_GCM], long_key, preauth)
    assert len(out_key) == 32 and out_key == kdf_counter_mode(long_key, b"SMBS2CCipherKey\x00", preauth, 256)


def test_cipher_choice_follows_the_client_order():
    assert choose_cipher([4, 2, 1]) == 4
    assert choose_cipher([1, 4]) == 1
    assert choose_cipher([7, 3]) == 3
    assert choose_cipher([9]) == 0


def test_server_nonces_never_repeat_under_one_key():
    from emulator.smb.smb3_encryption import Sealer
    sealer = Sealer(CIPHERS[w.CIPHER_AES128_GCM], b"K" * 16, 5)
    nonces = {w.parse_transform_header(sealer.seal(b"x" * 70)).nonce for _ in range(1000)}
    assert len(nonces) == 1000


# ---------------------------------------------------------------- tshark reads what was sealed

@pytest.mark.parametrize("dialect", ["3.0", "3.1.1"])
def test_tshark_decrypts_our_encrypted_capture_with_the_session_keys(tmp_path, dialect):
    """The lab's capture of an encrypted session, opened by Wireshark's dissector with the keys
    of impacket's side: every transform decrypts to the SMB2 messages inside, the EMSMDB call is
    there, and nothing is malformed."""
    tshark = need_tool("tshark")
    with Lab(default_config_with({"policy": {"smb_encryption": "required"}}), captures=str(tmp_path)) as lab:
        smb = impacket_login(lab, "alice", dialect)
        session = smb._SMBConnection._Session
        sid, s2c, c2s = session["SessionID"], session["DecryptionKey"], session["EncryptionKey"]
        key = session["SessionKey"]
        assert mailbox_answers(emsmdb_pipe(lab, smb), "bob") == [EC_LOGIN_PERM]
        smb.close()
        [path] = [p for p in lab.capture_paths if p.endswith("-smb.pcap")]
    # Wireshark's SMB2 session key table: SessionId as on the wire, session key, S2C, C2S keys.
    uat = f"uat:smb2_seskey_list:{sid.to_bytes(8, 'little').hex()},{key.hex()},{s2c.hex()},{c2s.hex()}"
    info = subprocess.run([tshark, "-r", path, "-o", uat, "-Y", "smb2", "-T", "fields", "-e", "_ws.col.Info"],
                          capture_output=True, text=True, timeout=60).stdout.splitlines()
    sealed = [i for i in info if "SMB3" in i]
    assert sealed and all(i.startswith("Decrypted SMB3") for i in sealed), info
    assert any("Create Request File: emsmdb" in i for i in sealed)
    names = subprocess.run([tshark, "-r", path, "-o", uat, "-Y", "mapi.EcDoConnect.name", "-T", "fields",
                            "-e", "mapi.EcDoConnect.name"], capture_output=True, text=True, timeout=60).stdout
    assert "cn=bob" in names
    bad = subprocess.run([tshark, "-r", path, "-o", uat, "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0 and bad.stdout.strip() == "", bad.stdout


# ---------------------------------------------------------------- a downgraded cipher list

def _reverse_ciphers(message: bytes) -> bytes:
    """In an SMB2 NEGOTIATE request, the ENCRYPTION_CAPABILITIES cipher list reversed (the
    client's least preferred cipher first), bytes elsewhere untouched (MS-SMB2 2.2.3)."""
    if message[:4] != w.PROTOCOL_ID or int.from_bytes(message[12:14], "little") != w.NEGOTIATE:
        return message
    body = w.HEADER_SIZE
    offset = int.from_bytes(message[body + 28:body + 32], "little")
    count = int.from_bytes(message[body + 32:body + 34], "little")
    out = bytearray(message)
    for _ in range(count):
        ctype = int.from_bytes(message[offset:offset + 2], "little")
        length = int.from_bytes(message[offset + 2:offset + 4], "little")
        data = offset + 8
        if ctype == w.ENCRYPTION_CAPABILITIES:
            n = int.from_bytes(message[data:data + 2], "little")
            ids = [message[data + 2 + 2 * i:data + 4 + 2 * i] for i in range(n)]
            out[data + 2:data + 2 + 2 * n] = b"".join(reversed(ids))
        offset = data + length + (-length % 8)
    return bytes(out)


@pytest.mark.parametrize("tamper", [False, True], ids=["untouched", "reversed"])
def test_downgraded_cipher_list_is_caught_by_the_preauth_hash(desired, tamper):
    """A man in the middle reorders the client's 3.1.1 cipher list so the server picks the
    client's last choice. The server's preauth integrity hash (SHA-512 over the messages as it
    received them) then differs from the client's, so the keys differ and the client rejects the
    signed SESSION_SETUP answer: no tree, no pipe (MS-SMB2 3.3.5.4, 3.2.5.3.1)."""
    from harness.tcp_proxy import RewritingProxy
    need_tool("rpcclient")
    before = len(desired.records())
    with RewritingProxy(desired.ports["smb"], _reverse_ciphers if tamper else (lambda m: m)) as proxy:
        argv = ["rpcclient", "-U", f"CORP/alice%{PASSWORD}", "-p", str(proxy.port), "--client-protection=encrypt",
                "--option=clientipcmaxprotocol=SMB3_11", "--option=clientipcminprotocol=SMB3_11",
                "--option=client smb3 encryption algorithms=AES-128-GCM,AES-256-CCM", "127.0.0.1", "-c", "srvinfo"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proxy.rewritten == (1 if tamper else 0)
    [neg] = new_records(desired, before, "smb.negotiate")
    if not tamper:
        assert out.returncode == 0, out.stdout + out.stderr
        assert neg["cipher"] == "AES-128-GCM"
        return
    assert out.returncode != 0, out.stdout
    assert neg["cipher"] == "AES-256-CCM"                 # the downgrade reached the server...
    assert not new_records(desired, before, "smb.tree_connect")   # ...and bought nothing
    assert not new_records(desired, before, "rpc.bind")


# ---------------------------------------------------------------- Kerberos sessions

@pytest.mark.parametrize("proto, algorithm, cipher", [("SMB3_00", None, "AES-128-CCM"),
                                                      ("SMB3_11", "AES-256-GCM", "AES-256-GCM")])
def test_kerberos_session_encrypts_with_keys_from_its_subkey(proto, algorithm, cipher):
    """MIT kinit, then rpcclient over a Kerberos SMB session with encryption required: the keys
    come from the Kerberos session key through the same KDF (AES-256 from the whole 32-byte key)."""
    from harness.kerberos import HOSTNAME, kinit, run_samba, start_kerberos_lab
    need_tool("rpcclient")
    lab = start_kerberos_lab(policy={"smb_encryption": "required"})
    try:
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        extra = [f"--option=client smb3 encryption algorithms={algorithm}"] if algorithm else []
        out = run_samba("rpcclient", lab, ticket, [
            f"ncacn_np:{HOSTNAME}[]", "--client-protection=encrypt", f"--option=clientipcmaxprotocol={proto}",
            f"--option=clientipcminprotocol={proto}", *extra, "-c", "srvinfo"])
        assert out.returncode == 0 and "platform_id" in out.stdout, out.stdout + out.stderr
        [setup] = lab.records("smb.session_setup")
        assert (setup["cipher"], setup["encrypt_data"]) == (cipher, True)
        [on] = lab.records("smb.encryption")
        assert on["cipher"] == cipher
        [identity] = lab.records("rpc.identity")[-1:]
        assert (identity["source"], identity["user"], identity["auth_layer"]) == (
            "smb_session", "alice", "smb_session_setup/spnego-kerberos")
    finally:
        lab.stop()


def test_smbtorture_encryption_tests_set_up_each_cipher():
    """smbtorture's smb2.session.encryption-* force one cipher each, with 3.1.1 signing
    negotiation (AES-128-GMAC): the encrypted session setup and tree connect pass for all four;
    the tests then open the share's root directory, which IPC$ does not have (recorded in
    scripts/conformance.py)."""
    need_tool("smbtorture")
    tests = [f"smb2.session.encryption-{c}" for c in ("aes-128-ccm", "aes-128-gcm", "aes-256-ccm", "aes-256-gcm")]
    with lab_with("desired") as lab:
        out = subprocess.run(
            ["smbtorture", "//127.0.0.1/IPC$", "-U", f"CORP/alice%{PASSWORD}", "-W", "CORP",
             f"--smb-ports={lab.ports['smb']}", "--maximum-runtime=30", *tests],
            capture_output=True, text=True, timeout=90)
        assert "Can't test without" not in out.stdout, out.stdout
        assert sorted(r["cipher"] for r in lab.records("smb.encryption")) == [
            "AES-128-CCM", "AES-128-GCM", "AES-256-CCM", "AES-256-GCM"], out.stdout
        assert {r["signing_algorithm"] for r in lab.records("smb.negotiate")} == {"AES-128-GMAC"}
        assert not lab.records("malformed")


# ---------------------------------------------------------------- the synthetic client

@pytest.mark.parametrize("mode, sealed", [("desired", False), ("required", True)])
def test_synthetic_client_encrypts_only_when_the_server_asks(mode, sealed):
    """The KB's client (emulator/client, on impacket) acts as the Windows redirector: a server that
    only offers encryption gets clear SMB, one that requires it gets it sealed. Either way the KB's
    outcome holds: alice's session, bob's mailbox, ecLoginPerm."""
    from emulator.client import Credentials, Profile, run_client
    from emulator.client.profile import Endpoint
    from harness.cast import dn
    with lab_with(mode) as lab:
        profile = Profile(dn("bob"), Credentials("alice", lab.password("alice")), binding_order=("ncacn_np",),
                          server=Endpoint(smb_port=lab.ports["smb"], epm_port=lab.ports["epm"]))
        run_client(profile, events=lab.events)
        assert bool(lab.records("smb.encryption")) is sealed
        connects = lab.records("emsmdb.connect")
        assert [(c["acting_user"], c["identity_source"], c["status_name"]) for c in connects] == [
            ("CORP\\alice", "smb_session", "ecLoginPerm")]
