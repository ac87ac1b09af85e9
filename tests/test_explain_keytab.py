"""`rpcauth explain --keytab`: the reader decrypts the tickets of real Kerberos clients with the
lab's service keys, names the client as tshark does with the same keytab, and unseals the
Kerberos-sealed calls (checking every wrap token).

The lab's own captures come from Samba's rpcclient (a kinit ticket, a sealed bind on a pipe of a
Kerberos SMB session), impacket (SPNEGO with Kerberos over TCP, sealed EcDoConnect calls) and
MIT's GSS-API initiator (auth_type 16, the final AP-REP in AUTH3, a sealed call). The truth is
tshark's reading of the same file with the same keytab, and the lab's own events.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from harness.cast import CORPUS, dn, need_tool
from harness.kerberos import (
    HOSTNAME,
    REALM,
    kerberos_config,
    kinit,
    kvno,
    mit_sealed_mgmt_call,
    need_kerberos,
    run_samba,
)

from emulator.lab import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAILBOXES = ("alice", "bob")   # alice's own (ecSuccess), bob's (ecLoginPerm)


def explain(pcap, *args: str, fmt: str = "json") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emulator.cli", "explain", str(pcap), "--format", fmt,
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def explain_json(pcap, *args: str) -> dict:
    out = explain(pcap, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def tshark_clients(pcap, keytab) -> dict[int, str]:
    """{frame: client principal} of every AP-REQ whose ticket tshark decrypts with the keytab."""
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-o", "kerberos.decrypt:TRUE",
                          "-o", f"kerberos.file:{keytab}", "-Y", "kerberos.CNameString",
                          "-T", "fields", "-e", "frame.number", "-e", "kerberos.CNameString",
                          "-e", "kerberos.crealm"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    # The ticket's cname comes first; the authenticator repeats it.
    return {int(r[0]): f"{r[1].split(',')[0]}@{r[2].split(',')[0]}" for r in rows}


def explain_clients(doc: dict) -> dict[int, str]:
    """{frame: client principal} of every ticket explain decrypted."""
    return {e["frame"]: e["principal"] for c in doc["connections"] for e in c["events"]
            if e["kind"] == "kerberos.ticket" and e["result"] == "ok"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A Kerberos lab's per-connection captures, its keytab, and its own emsmdb.connect events."""
    need_kerberos()
    rpcclient = need_tool("rpcclient")
    need_tool("tshark")
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import (
        RPC_C_AUTHN_GSS_NEGOTIATE,
        RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
    )
    from impacket.uuid import uuidtup_to_bin

    from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect

    tmp = tmp_path_factory.mktemp("krbkeytab")
    captures, keytab = tmp / "captures", tmp / "lab.keytab"
    lab = Lab(kerberos_config(), captures=str(captures)).start()
    saved = {k: os.environ.get(k) for k in ("KRB5CCNAME", "KRB5_CONFIG")}
    try:
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        for svc in ("host", "cifs"):
            assert kvno(ticket, f"{svc}/{HOSTNAME}@{REALM}").returncode == 0
        # Samba: a Kerberos SMB session, then a sealed Kerberos bind on a pipe.
        out = run_samba(rpcclient, lab, ticket, [f"ncacn_np:{HOSTNAME}[krb5,seal]", "-c", "srvinfo"])
        assert out.returncode == 0, out.stdout + out.stderr
        # impacket: SPNEGO with Kerberos over TCP, sealed EcDoConnect calls (tickets from the ccache).
        os.environ["KRB5CCNAME"], os.environ["KRB5_CONFIG"] = ticket.path, ticket.env["KRB5_CONFIG"]
        rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{HOSTNAME}[{lab.ports['emsmdb']}]")
        rt.setRemoteHost("127.0.0.1")
        rt.set_credentials("alice", "", REALM)
        rt.set_kerberos(True, "127.0.0.1")
        dce = rt.get_dce_rpc()
        dce.set_auth_type(RPC_C_AUTHN_GSS_NEGOTIATE)
        dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
        dce.connect()
        dce.bind(uuidtup_to_bin((EMSMDB_UUID, "0.81")))
        try:
            for mailbox in MAILBOXES:
                hEcDoConnect(dce, dn(mailbox))
        finally:
            dce.disconnect()
        # MIT's initiator: auth_type 16, the final AP-REP in AUTH3, one sealed call.
        assert mit_sealed_mgmt_call(lab, ticket)[-4:] == b"\0\0\0\0"
        shutil.copy(lab.realm.keytab, keytab)        # the realm's directory goes with the lab
        connects = lab.records("emsmdb.connect")
        identities = [(r["user"], r["domain"]) for r in lab.records("rpc.identity")
                      if r["source"] == "rpc_auth"]
    finally:
        lab.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pcaps = sorted(captures.glob("*.pcap"))
    assert len(pcaps) == 3, pcaps
    return pcaps, keytab, connects, identities


def test_explain_names_the_client_tshark_names(recorded):
    pcaps, keytab, *_ = recorded
    seen = 0
    for pcap in pcaps:
        truth = tshark_clients(pcap, keytab)
        assert truth, f"tshark decrypted no ticket in {pcap.name}"
        assert explain_clients(explain_json(pcap, "--keytab", str(keytab))) == truth, pcap.name
        seen += len(truth)
    assert seen == 4    # cifs (SMB session), host (bind on the pipe), host (impacket), host (MIT)


def test_the_identity_is_the_ticket_client_mapped_to_the_lab_user(recorded):
    pcaps, keytab, *_ = recorded
    conns = [c for p in pcaps for c in explain_json(p, "--keytab", str(keytab))["connections"]]
    assert len(conns) == 3
    for c in conns:
        assert (c["identity_source"], c["user"], c["principal"]) == ("rpc_auth", "alice",
                                                                    f"alice@{REALM}"), c["stream"]
        assert c["bad_signatures"] == 0 and c["verified_pdus"] >= 2
    assert {c["mechanism"] for c in conns} == {"kerberos", "spnego-kerberos"}


def test_with_the_lab_config_the_client_is_named_as_the_live_server_names_it(recorded):
    """--lab maps the principal to the lab user in the lab's domain: the words of the live
    server's own rpc.identity events."""
    from emulator.capture import explain as explain_api

    pcaps, keytab, _, identities = recorded
    named = [(c["user"], c["domain"]) for p in pcaps for c in json.loads(
        explain_api(str(p), "json", lab=kerberos_config(), keytab=str(keytab)))["connections"]]
    assert sorted(named) == sorted(identities) and len(named) == 3


def test_sealed_ecdoconnect_reads_as_the_lab_answered(recorded):
    """The impacket connection's sealed EcDoConnect calls: the DN and status explain unseals
    are those the lab's own events recorded."""
    pcaps, keytab, connects, _ = recorded
    docs = [explain_json(p, "--keytab", str(keytab)) for p in pcaps]
    calls = [e for d in docs for c in d["connections"] for e in c["emsmdb"]]
    assert [(e["user_dn"], e["status_name"], e["unsealed"]) for e in calls] == [
        (c["user_dn"], c["status_name"], True) for c in connects]
    assert [c["user_dn"] for c in connects] == [dn(m) for m in MAILBOXES]


def test_without_keys_kerberos_is_labelled_and_the_principal_left_in_the_ticket(recorded):
    pcaps, *_ = recorded
    for pcap in pcaps:
        doc = explain_json(pcap)
        for c in doc["connections"]:
            assert (c["identity_source"], c["user"], "principal" in c) == ("rpc_auth", None, False)
            assert "kerberos" in c["mechanism"]
            assert all(e["sealed"] and e["user_dn"] is None for e in c["emsmdb"])
        text = explain(pcap, fmt="text").stdout
        assert "Kerberos AP-REQ" in text and "inside the ticket" in text


def test_a_tampered_sealed_stub_fails_verification(recorded, tmp_path):
    """One bit of the first sealed EcDoConnect request flipped in the capture: its wrap token no
    longer verifies, so explain reports the failure and does not read the DN."""
    from scapy.all import Raw, rdpcap, wrpcap

    pcaps, keytab, *_ = recorded
    for pcap in pcaps:
        doc = explain_json(pcap, "--keytab", str(keytab))
        calls = [e for c in doc["connections"] for e in c["emsmdb"]]
        if calls:
            break
    frame = calls[0]["frame"]
    packets = rdpcap(str(pcap))
    payload = bytes(packets[frame - 1][Raw].load)
    # The stub sits after the 24-byte request header; flip a bit in its middle.
    at = 24 + (len(payload) - 24 - 8 - 60) // 2
    packets[frame - 1][Raw].load = payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]
    tampered = tmp_path / "tampered.pcap"
    wrpcap(str(tampered), packets)
    conn = next(c for c in explain_json(tampered, "--keytab", str(keytab))["connections"] if c["emsmdb"])
    first = conn["emsmdb"][0]
    assert (first["user_dn"], first["unsealed"]) == (None, True)
    assert conn["bad_signatures"] >= 1
    assert [e["result"] for e in conn["events"] if e["kind"] == "rpc.verify"][0] == "bad_seal"
    assert conn["emsmdb"][1]["user_dn"] == calls[1]["user_dn"]    # the next call still reads


def test_a_tampered_authenticator_names_nobody(recorded, tmp_path):
    """MIT's auth_type 16 bind ends with the AP-REQ, whose last bytes are the authenticator's
    ciphertext: one bit flipped there and the ticket no longer vouches for anyone."""
    from scapy.all import Raw, rdpcap, wrpcap

    pcaps, keytab, *_ = recorded
    for pcap in pcaps:
        (conn,) = explain_json(pcap, "--keytab", str(keytab))["connections"]
        if conn["mechanism"] == "kerberos" and conn["transport"] == "ncacn_ip_tcp":
            break
    frame = next(e["frame"] for e in conn["events"] if e["kind"] == "kerberos.ticket")
    packets = rdpcap(str(pcap))
    payload = bytes(packets[frame - 1][Raw].load)
    packets[frame - 1][Raw].load = payload[:-3] + bytes([payload[-3] ^ 0x01]) + payload[-2:]
    tampered = tmp_path / "authenticator.pcap"
    wrpcap(str(tampered), packets)
    (conn,) = explain_json(tampered, "--keytab", str(keytab))["connections"]
    ticket = next(e for e in conn["events"] if e["kind"] == "kerberos.ticket")
    assert (ticket["result"], ticket["principal"]) == ("bad_integrity", None)
    assert conn["user"] is None and "principal" not in conn
    assert conn["verified_pdus"] == 0


def test_edited_tickets_and_tokens_never_raise(recorded):
    """Every truncation and a sweep of byte edits of a real AP-REQ, and arbitrary wrap tokens,
    come back as a result word or None: a capture's bytes cannot crash the reader."""
    import random

    from scapy.all import Raw, rdpcap

    from emulator.auth.acceptor import PacketParts
    from emulator.capture.kdc import looks_like_kdc, read_kdc_message
    from emulator.capture.kerberos_keys import (
        KerberosExchange,
        KerberosKeys,
        KerberosPacketReader,
    )

    pcaps, keytab, *_ = recorded
    keys = KerberosKeys.load(str(keytab))
    for pcap in pcaps:
        (conn,) = explain_json(pcap, "--keytab", str(keytab))["connections"]
        if conn["mechanism"] == "kerberos" and conn["transport"] == "ncacn_ip_tcp":
            break
    frame = next(e["frame"] for e in conn["events"] if e["kind"] == "kerberos.ticket")
    payload = bytes(rdpcap(str(pcap))[frame - 1][Raw].load)
    token = payload[-int.from_bytes(payload[10:12], "little"):]
    exchange = KerberosExchange(keys)
    assert exchange.ap_req(token).result == "ok"
    rng = random.Random(4121)
    edits = [token[:n] for n in range(len(token))]
    edits += [token[:i] + bytes([token[i] ^ rng.randrange(1, 256)]) + token[i + 1:]
              for i in range(0, len(token), 3)]
    results = {KerberosExchange(keys).ap_req(t).result for t in edits}
    assert results <= {"ok", "no_key", "bad_integrity", "malformed"} and "bad_integrity" in results
    reader = KerberosPacketReader(exchange)
    for _ in range(300):
        blob = rng.randbytes(rng.randrange(0, 80))
        parts = PacketParts(rng.randbytes(24), rng.randbytes(rng.randrange(0, 48)), rng.randbytes(8),
                            rng.random() < 0.5)
        for head in (b"\x05\x04", b"\x04\x04", b"\x60\x2b", b""):
            sig = head + blob
            assert reader.unseal_packet(parts, sig) is None
            assert reader.check_packet(parts, sig) is False
        record = len(blob).to_bytes(4, "big") + blob
        looks_like_kdc(record)
        for tag in (0x6A, 0x6B, 0x6C, 0x6D, 0x7E):
            assert read_kdc_message(bytes([tag]) + blob, 1, True)["kind"] in (
                "malformed", "kerberos.as_req", "kerberos.as_rep", "kerberos.tgs_req",
                "kerberos.tgs_rep", "kerberos.krb_error")


def test_no_key_reaches_the_output(recorded):
    from impacket.krb5.keytab import Keytab

    pcaps, keytab, *_ = recorded
    keys = [bytes(e.main_part["keyblock"]["keyvalue"]["data"]) for e in Keytab.loadFile(str(keytab)).entries]
    assert keys
    for fmt in ("json", "text", "html"):
        out = explain(pcaps[0], "--keytab", str(keytab), fmt=fmt).stdout.lower()
        for key in keys:
            assert key.hex() not in out


def test_an_unreadable_keytab_is_a_clear_error(recorded, tmp_path):
    pcaps, *_ = recorded
    bogus = tmp_path / "not.keytab"
    bogus.write_bytes(b"\x05\x02garbage")
    for path in (bogus, tmp_path / "missing.keytab"):
        out = explain(pcaps[0], "--keytab", str(path))
        assert out.returncode == 2
        assert "keytab" in out.stderr and "Traceback" not in out.stderr


def test_corpus_smb2_krb_principal_agrees_with_tshark():
    pcap, keytab = os.path.join(CORPUS, "smb2_krb.pcap"), os.path.join(CORPUS, "smb2_krb.keytab")
    if not (os.path.exists(pcap) and os.path.exists(keytab)):
        pytest.skip(f"the corpus capture smb2_krb.pcap and its keytab are not in {CORPUS}")
    need_tool("tshark")
    truth = tshark_clients(pcap, keytab)
    assert truth
    doc = explain_json(pcap, "--keytab", keytab)
    assert explain_clients(doc) == truth
    (conn,) = doc["connections"]
    principal = next(iter(truth.values()))
    assert (conn["identity_source"], conn["principal"]) == ("smb_session", principal)
    assert conn["user"] == principal.split("@")[0]
    sessions = [s for n in doc["streams"] for s in n["smb_sessions"]]
    assert [s["principal"] for s in sessions if s["established"]] == [principal]


# ---------------------------------------------------------------- AS and TGS, from the wire

@pytest.fixture(scope="module")
def kdc_capture(tmp_path_factory):
    """The real loopback traffic of MIT kinit, kvno and rpcclient with a lab's KDC and SMB
    listener, recorded by Wireshark's dumpcap (root only)."""
    need_kerberos()
    dumpcap, rpcclient = need_tool("dumpcap"), need_tool("rpcclient")
    need_tool("tshark")
    if os.geteuid() != 0:
        pytest.skip("capturing loopback traffic with dumpcap needs root")
    import time

    pcap = tmp_path_factory.mktemp("kdccap") / "kdc.pcapng"
    lab = Lab(kerberos_config()).start()
    try:
        kdc_port = lab.realm.port
        ports = (kdc_port, lab.ports["smb"])
        cap = subprocess.Popen([dumpcap, "-q", "-i", "lo", "-f",
                                " or ".join(f"tcp port {p}" for p in ports), "-w", str(pcap)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20     # dumpcap says "File:" once it is capturing
            while time.monotonic() < deadline and not os.path.exists(pcap):
                time.sleep(0.1)
            time.sleep(1)
            proc, ticket = kinit(lab, "alice")
            assert proc.returncode == 0, proc.stderr
            for svc in ("cifs", "host"):      # the service tickets, as a Windows logon fetches them
                assert kvno(ticket, f"{svc}/{HOSTNAME}@{REALM}").returncode == 0
            out = run_samba(rpcclient, lab, ticket, [f"ncacn_np:{HOSTNAME}[krb5,seal]", "-c", "srvinfo"])
            assert out.returncode == 0, out.stdout + out.stderr
            time.sleep(1)
        finally:
            cap.terminate()
            cap.wait(timeout=20)
        keytab = pcap.parent / "lab.keytab"
        shutil.copy(lab.realm.keytab, keytab)
    finally:
        lab.stop()
    return pcap, keytab, kdc_port


def tshark_kdc(pcap, port) -> dict[int, tuple[str, str]]:
    """{frame: (message type, client)} of the KDC messages tshark decodes on the KDC's port."""
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-d", f"tcp.port=={port},kerberos",
                          "-Y", "(kerberos.msg_type >= 10 and kerberos.msg_type <= 13) or kerberos.msg_type == 30",
                          "-T", "fields", "-e", "frame.number", "-e", "kerberos.msg_type",
                          "-e", "kerberos.CNameString"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    names = {"10": "as_req", "11": "as_rep", "12": "tgs_req", "13": "tgs_rep", "30": "krb_error"}
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return {int(r[0]): (names[r[1].split(",")[0]], r[2].split(",")[0]) for r in rows}


def test_as_and_tgs_exchanges_read_as_tshark_reads_them(kdc_capture):
    pcap, keytab, port = kdc_capture
    truth = tshark_kdc(pcap, port)
    doc = explain_json(pcap, "--keytab", str(keytab))
    ours = {e["frame"]: (e["kind"].split(".")[1], e.get("client") or "")
            for n in doc["streams"] for e in n.get("kdc", [])}
    assert ours == truth
    kinds = [k for _, (k, _) in sorted(ours.items())]
    # kinit: an AS-REQ without pre-authentication, the KDC's PREAUTH_REQUIRED error (lab users
    # require it), the AS-REQ with the encrypted timestamp and its AS-REP; then the service tickets.
    assert kinds[:4] == ["as_req", "krb_error", "as_req", "as_rep"] and "tgs_rep" in kinds
    # The service tickets the KDC issued are the ones the server was shown.
    issued = {e["service"] for n in doc["streams"] for e in n.get("kdc", []) if e["kind"] == "kerberos.tgs_rep"}
    shown = {e["service"].split("@")[0] for c in doc["connections"] for e in c["events"]
             if e["kind"] == "kerberos.ticket"}
    assert shown and shown <= issued


def test_the_report_draws_as_tgs_ap_req_and_ap_rep(kdc_capture):
    pcap, keytab, _ = kdc_capture
    html = explain(pcap, "--keytab", str(keytab), fmt="html").stdout
    for word in ("AS-REQ alice@CORP.TEST", "AS-REP", "TGS-REQ", "TGS-REP", "Kerberos AP-REQ",
                 "Kerberos AP-REP", "ticket for host/exch01.corp.test: client alice@CORP.TEST",
                 "from the bind&#x27;s ticket"):
        assert word in html, word


# ---------------------------------------------------------------- an RC4-HMAC context (RFC 4757)

@pytest.fixture(scope="module")
def rc4_capture(tmp_path_factory):
    """MIT's initiator with an RC4-HMAC session key (the client asks for arcfour-hmac first in
    its TGS-REQ, as an old Windows client would): auth_type 16, AUTH3, one sealed call."""
    need_kerberos()
    need_tool("tshark")
    tmp = tmp_path_factory.mktemp("rc4")
    captures = tmp / "captures"
    lab = Lab(kerberos_config(), captures=str(captures)).start()
    saved = os.environ.get("KRB5_CONFIG")
    try:
        with open(lab.realm.krb5_conf) as f:
            conf = f.read().replace("[libdefaults]", "[libdefaults]\n default_tgs_enctypes = "
                                    "arcfour-hmac aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96\n", 1)
        rc4_conf = tmp / "rc4-krb5.conf"
        rc4_conf.write_text(conf)
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        ticket.env["KRB5_CONFIG"] = os.environ["KRB5_CONFIG"] = str(rc4_conf)   # the initiator is in-process
        assert kvno(ticket, f"host/{HOSTNAME}@{REALM}").returncode == 0
        assert mit_sealed_mgmt_call(lab, ticket)[-4:] == b"\0\0\0\0"
        klist = subprocess.run(["klist", "-e"], env=ticket.env, capture_output=True, text=True).stdout
        keytab = tmp / "lab.keytab"
        shutil.copy(lab.realm.keytab, keytab)
    finally:
        lab.stop()
        if saved is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = saved
    assert "arcfour-hmac, aes256" in klist, klist          # an RC4 session key, an AES ticket
    (pcap,) = captures.glob("*.pcap")
    return pcap, keytab


def test_rc4_sealed_calls_are_verified_and_a_tampered_one_fails(rc4_capture, tmp_path):
    from scapy.all import Raw, rdpcap, wrpcap

    pcap, keytab = rc4_capture
    doc = explain_json(pcap, "--keytab", str(keytab))
    assert explain_clients(doc) == tshark_clients(pcap, keytab)
    (conn,) = doc["connections"]
    assert (conn["user"], conn["principal"]) == ("alice", f"alice@{REALM}")
    assert (conn["verified_pdus"], conn["bad_signatures"]) == (2, 0)
    # Flip one bit of the RFC 4757 checksum of the request's token (its stub is empty).
    packets = rdpcap(str(pcap))
    # The request's header (version 5, request, first and last fragment, little endian); the
    # recorder may carry it in one segment after the AUTH3, so it is found by its bytes, last.
    req = next(i for i, p in enumerate(packets) if Raw in p
               and b"\x05\x00\x00\x03\x10\x00\x00\x00" in bytes(p[Raw].load))
    payload = bytes(packets[req][Raw].load)
    at = len(payload) - 45 + 13 + 16                       # framing, header and sequence number
    packets[req][Raw].load = payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]
    tampered = tmp_path / "rc4-tampered.pcap"
    wrpcap(str(tampered), packets)
    (conn,) = explain_json(tampered, "--keytab", str(keytab))["connections"]
    assert (conn["verified_pdus"], conn["bad_signatures"]) == (1, 1)
    assert [e["result"] for e in conn["events"] if e["kind"] == "rpc.verify"] == ["bad_seal"]


# ---------------------------------------------------------------- SMB3 encryption on a Kerberos session

ENCRYPTED = [("SMB3_00", None, "AES-128-CCM"), ("SMB3_11", "AES-256-GCM", "AES-256-GCM")]


@pytest.fixture(scope="module", params=ENCRYPTED, ids=[p[0] for p in ENCRYPTED])
def encrypted_capture(request, tmp_path_factory):
    """rpcclient over a Kerberos SMB session with encryption required: the SMB3 keys come from
    the session's Kerberos key, which only the keytab opens."""
    need_kerberos()
    rpcclient = need_tool("rpcclient")
    need_tool("tshark")
    proto, algorithm, cipher = request.param
    tmp = tmp_path_factory.mktemp(f"enc{proto}")
    pcap, keytab = tmp / "enc.pcap", tmp / "lab.keytab"
    lab = Lab(kerberos_config(policy={"smb_encryption": "required"}), capture_file=str(pcap)).start()
    try:
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        extra = [f"--option=client smb3 encryption algorithms={algorithm}"] if algorithm else []
        out = run_samba(rpcclient, lab, ticket, [
            f"ncacn_np:{HOSTNAME}[]", "--client-protection=encrypt", f"--option=clientipcmaxprotocol={proto}",
            f"--option=clientipcminprotocol={proto}", *extra, "-c", "srvinfo"])
        assert out.returncode == 0, out.stdout + out.stderr
        shutil.copy(lab.realm.keytab, keytab)
        [identity] = lab.records("rpc.identity")[-1:]
    finally:
        lab.stop()
    return pcap, keytab, cipher, identity


def test_kerberos_smb3_session_is_decrypted_with_the_keytab(encrypted_capture):
    pcap, keytab, cipher, identity = encrypted_capture
    doc = explain_json(pcap, "--keytab", str(keytab))
    [session] = [s for n in doc["streams"] for s in n["smb_sessions"]]
    assert (session["cipher"], session["decryption"], session["failed_messages"]) == (cipher, "ok", 0)
    assert session["decrypted_messages"] > 0 and session["encrypted_messages"] == 0
    (conn,) = doc["connections"]
    assert (conn["pipes"], conn["identity_source"], conn["user"], conn["principal"]) == (
        ["srvsvc"], identity["source"], identity["user"], f"alice@{REALM}")
    # Without the keytab the session stays sealed, and says why.
    [sealed] = [s for n in explain_json(pcap)["streams"] for s in n["smb_sessions"]]
    assert (sealed["decrypted_messages"], sealed["encrypted_messages"]) == (0, session["decrypted_messages"])


def test_kerberos_smb3_decryption_agrees_with_tshark(encrypted_capture):
    """tshark decrypts the AP-REP with the keytab and shows its subkey; given that key as the
    session's key, it opens the same transforms and sees the same pipe. (Wireshark 4.0 takes
    16-byte session keys only, so AES-256 sessions are checked above, by their GCM tags.)"""
    pcap, keytab, cipher, _ = encrypted_capture
    if cipher.startswith("AES-256"):
        pytest.skip("Wireshark 4.0's SMB2 key table holds 16-byte session keys, AES-256 needs 32")
    [(key, sid)] = [tuple(line.split("\t")) for line in subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-o", "kerberos.decrypt:TRUE", "-o", f"kerberos.file:{keytab}",
         "-Y", "kerberos.msg_type == 15", "-T", "fields", "-e", "kerberos.keyvalue", "-e", "smb2.sesid"],
        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines() if line.strip()]
    session = int(sid.split(",")[0], 16).to_bytes(8, "little").hex()
    keyed = ["-o", f'uat:smb2_seskey_list:{session},{key.replace(":", "")[:32]},"",""']

    def fields(flt: str, name: str) -> list[str]:
        out = subprocess.run(["tshark", "-n", "-r", str(pcap), *keyed, "-Y", flt, "-T", "fields", "-e", name],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return [line for line in out.splitlines() if line.strip()]
    nonces = fields("smb2.header.transform.nonce && smb2.cmd", "smb2.header.transform.nonce")
    pipes = sorted(set(fields("smb2.cmd == 5 && smb2.flags.response == 0", "smb2.filename")))
    doc = explain_json(pcap, "--keytab", str(keytab))
    [s] = [s for n in doc["streams"] for s in n["smb_sessions"]]
    assert s["decrypted_messages"] == sum(len(n.split(",")) for n in nonces) > 0
    assert pipes == sorted({p for c in doc["connections"] for p in c["pipes"]})
