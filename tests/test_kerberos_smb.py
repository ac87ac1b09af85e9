"""Kerberos at both layers with Samba's clients: MIT kinit, then smbclient and rpcclient with
--use-kerberos=required, the lab's krb5.conf and that ccache. The SMB session is Kerberos
through SPNEGO; binds on its pipes are Kerberos again (DCE style, auth_type 16 or SPNEGO 9),
signed or sealed with GSS MIC and wrap tokens."""

from __future__ import annotations

import subprocess

import pytest

from harness.cast import need_tool
from harness.kerberos import HOSTNAME, REALM, kadmin, kinit, run_samba, start_kerberos_lab


@pytest.fixture(scope="module")
def alice(krb_lab):
    proc, ticket = kinit(krb_lab, "alice")
    assert proc.returncode == 0, proc.stderr
    return ticket


def conns_of(lab, kind="smb.session_setup"):
    return {r["conn"] for r in lab.records(kind)}


def new_records(lab, before, kind):
    return [r for r in lab.records(kind) if r["conn"] not in before]


@pytest.mark.parametrize("protocol", ["SMB3_11", "SMB3_00", "SMB2_10", "SMB2_02", "NT1"])
def test_smbclient_kerberos_session_on_ipc(krb_lab, alice, protocol):
    smbclient = need_tool("smbclient")
    before = conns_of(krb_lab)
    proc = run_samba(smbclient, krb_lab, alice, [f"//{HOSTNAME}/IPC$", "-m", protocol,
                                                 f"--option=client min protocol={protocol}",
                                                 "--client-protection=sign", "-c", "ls"])
    # IPC$ has no directory to list; the session and the tree connect are what counts.
    assert "session setup failed" not in proc.stderr + proc.stdout, proc.stderr
    setups = new_records(krb_lab, before, "smb.session_setup")
    assert [(s["result"], s["user"], s["signing"]) for s in setups] == [("ok", "alice", True)]
    conn = setups[0]["conn"]
    accepts = [r for r in krb_lab.records("kerberos.accept") if r["conn"] == conn]
    assert [(a["result"], a["principal"], a["service"], a["dce_style"]) for a in accepts] == [
        ("ok", f"alice@{REALM}", f"cifs/{HOSTNAME}@{REALM}", False)]
    spnego = [r for r in krb_lab.records("spnego.accept") if r["conn"] == conn]
    assert spnego[-1]["result"] == "ok" and spnego[-1]["selected"] == "kerberos"
    trees = [r for r in krb_lab.records("smb.tree_connect") if r["conn"] == conn]
    assert trees and trees[-1]["result"] == "ok"


# (binding options, auth_type the server saw, level)
BINDINGS = [
    ("krb5,sign", "kerberos", "integrity"),
    ("krb5,seal", "kerberos", "privacy"),
    ("spnego,sign", "spnego", "integrity"),
    ("spnego,seal", "spnego", "privacy"),
]


@pytest.mark.parametrize("options, auth_type, level", BINDINGS)
@pytest.mark.parametrize("command, pipe_iface", [("srvinfo", "srvsvc"), ("epmlookup", "epm")])
def test_rpcclient_kerberos_bind_on_a_pipe(krb_lab, alice, options, auth_type, level, command,
                                           pipe_iface):
    rpcclient = need_tool("rpcclient")
    before = conns_of(krb_lab)
    proc = run_samba(rpcclient, krb_lab, alice, [f"ncacn_np:{HOSTNAME}[{options}]", "-c", command])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if command == "srvinfo":
        assert "EXCH01" in proc.stdout
    else:
        assert "ncacn_np:" in proc.stdout and "emsmdb" in proc.stdout.lower()
    setups = new_records(krb_lab, before, "smb.session_setup")
    assert len(setups) == 1 and setups[0]["result"] == "ok"
    conn = setups[0]["conn"]
    binds = [b for b in krb_lab.records("rpc.bind", conn=conn) if b.get("interface_name") == pipe_iface]
    assert [(b["auth_type"], b["auth_level"], b["result"]) for b in binds] == [(auth_type, level, "ok")]
    # The bind proved alice again, by her ticket for host/: the identity is the bind's.
    ident = krb_lab.records("rpc.identity", conn=conn)[-1]
    assert (ident["user"], ident["source"]) == ("alice", "rpc_auth")
    assert ident["mechanism"] == ("kerberos" if auth_type == "kerberos" else "spnego-kerberos")
    assert ident["auth_layer"] == ("rpc_bind/kerberos" if auth_type == "kerberos" else "rpc_bind/spnego-kerberos")
    legs = [a for a in krb_lab.records("kerberos.accept", conn=conn) if a["dce_style"]]
    assert [(a["result"], a["legs"], a["service"]) for a in legs] == [("ok", 2, f"host/{HOSTNAME}@{REALM}")]
    verify = krb_lab.records("rpc.verify", conn=conn)
    assert not [v for v in verify if v.get("result") != "ok"]
    assert not krb_lab.records("malformed", conn=conn)


def test_a_disabled_user_with_a_ticket_is_still_refused(krb_lab):
    """The KDC refuses mallory a TGT (-allow_tix). Should it issue one anyway (here: allowed by
    hand), the acceptor still refuses a user the lab has disabled."""
    smbclient = need_tool("smbclient")
    assert kadmin(krb_lab, "modprinc +allow_tix mallory").returncode == 0
    try:
        proc, ticket = kinit(krb_lab, "mallory")
        assert proc.returncode == 0, proc.stderr
        before = conns_of(krb_lab)
        out = run_samba(smbclient, krb_lab, ticket, [f"//{HOSTNAME}/IPC$", "-c", "ls"])
    finally:
        kadmin(krb_lab, "modprinc -allow_tix mallory")
    assert out.returncode != 0
    setups = new_records(krb_lab, before, "smb.session_setup")
    assert [s["result"] for s in setups] == ["disabled"], out.stdout + out.stderr
    refused = [a for a in krb_lab.records("kerberos.accept") if a["conn"] == setups[0]["conn"]]
    assert refused[-1]["result"] == "disabled" and refused[-1]["principal"] == f"mallory@{REALM}"


def test_a_ticket_for_another_service_is_refused(krb_lab, alice):
    """The KDC knows cifs/other.corp.test; the lab's keytab does not: the ticket cannot be
    decrypted here, and the session is refused."""
    smbclient = need_tool("smbclient")
    assert kadmin(krb_lab, f"addprinc -randkey cifs/other.corp.test@{REALM}").returncode == 0
    before = conns_of(krb_lab)
    out = run_samba(smbclient, krb_lab, alice, ["//other.corp.test/IPC$", "-c", "ls"],
                    host="other.corp.test")
    assert out.returncode != 0
    setups = new_records(krb_lab, before, "smb.session_setup")
    assert [s["result"] for s in setups] == ["wrong_service"]
    refused = [a for a in krb_lab.records("kerberos.accept") if a["conn"] == setups[0]["conn"]]
    assert refused[-1]["result"] == "wrong_service"
    assert "key" not in " ".join(str(v) for v in refused[-1].values() if isinstance(v, bytes))


def test_ntlm_through_spnego_is_a_downgrade_when_kerberos_is_required():
    smbclient = need_tool("smbclient")
    lab = start_kerberos_lab(policy={"require_kerberos": True})
    try:
        before = conns_of(lab)
        out = subprocess.run(
            [smbclient, f"//{HOSTNAME}/IPC$", "-I", "127.0.0.1", "-p", str(lab.ports["smb"]),
             "--use-kerberos=disabled", "-U", f"CORP/alice%{lab.password('alice')}", "-c", "ls"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode != 0
        setups = new_records(lab, before, "smb.session_setup")
        assert setups and all(s["result"] == "downgrade" for s in setups)
        refused = [r for r in lab.records("spnego.accept") if r["conn"] in {s["conn"] for s in setups}]
        assert refused and refused[-1]["result"] == "downgrade"
        # Kerberos itself still works in that lab.
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0
        before = conns_of(lab)
        ok = run_samba(smbclient, lab, ticket, [f"//{HOSTNAME}/IPC$", "-c", "ls"])
        assert "session setup failed" not in ok.stdout + ok.stderr
        assert [s["result"] for s in new_records(lab, before, "smb.session_setup")] == ["ok"]
    finally:
        lab.stop()
