"""Samba's rpcclient against our endpoint mapper over ncacn_ip_tcp, with NTLM and SPNEGO at
levels connect, packet, integrity (`sign`) and privacy (`seal`).

Samba checks the signature on every response it receives (impacket's client does not), so a
successful signed or sealed call here means our outgoing signatures and seals are right too.
rpcclient's ncacn_ip_tcp binding always asks the endpoint mapper on port 135 first, so the lab
must listen on 135, which needs root.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time

import pytest
from harness.cast import need_tool

from emulator.interfaces.emsmdb import EMSMDB_UUID
from emulator.lab import Lab

EPT_S_NOT_REGISTERED = 0x16C9A0D6     # C706 / MS-RPCE: no endpoint for the requested interface


@pytest.fixture(scope="module")
def rpcclient() -> str:
    return need_tool("rpcclient")


@pytest.fixture(scope="module")
def lab135(rpcclient):
    if os.geteuid() != 0:
        pytest.skip("rpcclient always asks the endpoint mapper on TCP port 135 before binding, "
                    "and listening on port 135 needs root; run the tests as root to include it")
    try:
        running = Lab(ports={"epm": 135}).start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.skip("TCP port 135 on 127.0.0.1 is in use by another process")
        raise
    try:
        yield running
    finally:
        running.stop()


def epm_conns(lab) -> set[str]:
    return {r["conn"] for r in lab.records("conn.open", listener="epm")}


def wait_for(predicate, timeout: float = 5.0):
    """Events of a connection rpcclient has already left arrive when the server gets there."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def run_rpcclient(lab, rpcclient: str, options: str, command: str, *, user: str = "alice",
                  password: str | None = None, extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """Run one rpcclient command; return (its output, the lab's connection id for it)."""
    before = epm_conns(lab)
    pw = lab.password(user) if password is None else password
    proc = subprocess.run(
        [rpcclient, "-U", f"CORP/{user}%{pw}", f"ncacn_ip_tcp:127.0.0.1[135,{options}]",
         "-c", command, *extra],
        capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    new = wait_for(lambda: epm_conns(lab) - before)
    assert len(new) == 1, f"expected one connection from rpcclient, got {sorted(new)}:\n{output}"
    return output, new.pop()


def assert_authenticated(lab, conn: str, auth_type: str, level: str) -> None:
    binds = lab.records("rpc.bind", conn=conn)
    assert [(b["interface_name"], b["auth_type"], b["auth_level"], b["result"]) for b in binds] == [
        ("epm", auth_type, level, "ok")]
    ident = lab.records("rpc.identity", conn=conn)
    assert [(i["source"], i["user"], i["domain"]) for i in ident] == [("rpc_auth", "alice", "CORP")]
    auth = lab.records("ntlm.authenticate", conn=conn)
    assert [(a["user"], a["ntlm_version"], a["result"]) for a in auth] == [("alice", "NTLMv2", "ok")]
    assert not lab.records("rpc.fault", conn=conn)
    assert not lab.records("rpc.verify", conn=conn, result="bad_signature")


CASES = [
    # (binding options, extra rpcclient arguments, auth_type seen by the server, level)
    ("connect", (), "ntlm", "connect"),
    ("packet", (), "ntlm", "packet"),
    ("sign", (), "ntlm", "integrity"),
    ("seal", (), "ntlm", "privacy"),
    ("ntlm,sign", (), "ntlm", "integrity"),
    ("ntlm,seal", (), "ntlm", "privacy"),
    ("sign", ("--option=clientntlmv2auth=yes",), "ntlm", "integrity"),
    ("seal", ("--option=clientntlmv2auth=yes",), "ntlm", "privacy"),
    ("spnego,connect", (), "spnego", "connect"),
    ("spnego,sign", (), "spnego", "integrity"),
    ("spnego,seal", (), "spnego", "privacy"),
]
CASE_IDS = [opts.replace(",", "-") + ("-ntlmv2" if extra else "") for opts, extra, _, _ in CASES]


@pytest.mark.parametrize("options, extra, auth_type, level", CASES, ids=CASE_IDS)
def test_epmlookup_lists_emsmdb(lab135, rpcclient, options, extra, auth_type, level):
    output, conn = run_rpcclient(lab135, rpcclient, options, "epmlookup", extra=extra)
    tcp = re.search(r"ncacn_ip_tcp:127\.0\.0\.1\[(\d+),abstract_syntax=" + EMSMDB_UUID + r"/", output)
    assert tcp, output
    assert int(tcp.group(1)) == lab135.ports["emsmdb"]
    pipe = lab135.config.transports.smb.pipes["emsmdb"]
    assert re.search(r"ncacn_np:\w+\[\\PIPE\\" + re.escape(pipe) + r",abstract_syntax=" + EMSMDB_UUID, output,
                     re.IGNORECASE), output
    assert "epm_Lookup no more entries" in output
    assert_authenticated(lab135, conn, auth_type, level)
    # Unlike impacket and scapy at level packet, Samba puts a verifier on every request, so
    # each call is served with the protection the bind promised.
    assert {r["auth_level"] for r in lab135.records("rpc.request", conn=conn)} == {level}


def test_spnego_mech_list_mic_from_samba_is_in_the_specified_form(lab135, rpcclient):
    """Samba negotiates key exchange when it signs and sends the mechListMIC as MS-NLMP
    3.4.4.2 defines it; the acceptor verifies it without any tolerance."""
    _, conn = run_rpcclient(lab135, rpcclient, "spnego,sign", "epmlookup")
    accepts = lab135.records("spnego.accept", conn=conn)
    assert [(a["result"], a["mech_list_mic"]) for a in accepts] == [("ok", True)]
    assert "mech_list_mic_form" not in accepts[0]


@pytest.mark.parametrize("options, level", [("sign", "integrity"), ("seal", "privacy"),
                                            ("spnego,seal", "privacy")])
def test_epmmap_answers_not_registered_for_an_interface_the_lab_does_not_serve(
        lab135, rpcclient, options, level):
    """rpcclient's epmmap asks for lsarpc over ncacn_np, which the lab does not serve: the
    endpoint mapper's answer, through a signed or sealed call, is ept_s_not_registered."""
    output, conn = run_rpcclient(lab135, rpcclient, options, "epmmap")
    assert f"epm_Map returned {EPT_S_NOT_REGISTERED} (0x{EPT_S_NOT_REGISTERED:08X})" in output, output
    assert_authenticated(lab135, conn, "spnego" if options.startswith("spnego") else "ntlm", level)
    maps = lab135.records("epm.map", conn=conn)
    assert [(m["protseq"], m["result"]) for m in maps] == [("ncacn_np", "not_registered")]


@pytest.mark.parametrize("options, extra, password, reason", [
    ("seal", (), "not-alices-password", "wrong_password"),
    ("spnego,sign", (), "not-alices-password", "wrong_password"),
    ("sign", ("--option=clientntlmv2auth=no",), None, "ntlmv1_forbidden"),
], ids=["wrong-password", "spnego-wrong-password", "ntlmv1-refused-by-policy"])
def test_failed_logon_is_refused(lab135, rpcclient, options, extra, password, reason):
    output, conn = run_rpcclient(lab135, rpcclient, options, "epmlookup", password=password, extra=extra)
    assert "EMSMDB" not in output
    assert re.search(r"NT_STATUS_(ACCESS_DENIED|LOGON_FAILURE)", output), output
    binds = lab135.records("rpc.bind", conn=conn)
    assert [b["result"] for b in binds] == [reason]
    assert not lab135.records("rpc.identity", conn=conn, source="rpc_auth")
    assert not lab135.records("epm.lookup", conn=conn)
