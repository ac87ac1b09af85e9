"""tshark reads the lab's own Kerberos captures: no malformed packets, and with the lab keytab
it decrypts the service tickets and names the client the lab acted for."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from emulator.lab import Lab

from harness.cast import need_tool
from harness.kerberos import HOSTNAME, REALM, kerberos_config, kinit, need_kerberos, run_samba


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    need_kerberos()
    rpcclient = need_tool("rpcclient")
    need_tool("tshark")
    tmp = tmp_path_factory.mktemp("krbcap")
    pcap, keytab = tmp / "lab.pcap", tmp / "lab.keytab"
    lab = Lab(kerberos_config(), capture_file=str(pcap)).start()
    try:
        proc, ticket = kinit(lab, "alice")
        assert proc.returncode == 0, proc.stderr
        out = run_samba(rpcclient, lab, ticket, [f"ncacn_np:{HOSTNAME}[krb5,seal]", "-c", "srvinfo"])
        assert out.returncode == 0, out.stdout + out.stderr
        shutil.copy(lab.realm.keytab, keytab)        # the realm's directory goes with the lab
        identities = [r for r in lab.records("rpc.identity") if r["source"] == "rpc_auth"]
    finally:
        lab.stop()
    return pcap, keytab, identities


def tshark(pcap, *args: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), *args], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


FIELDS = ["-Y", "kerberos.msg_type == 14", "-T", "fields", "-e", "kerberos.SNameString",
          "-e", "kerberos.CNameString", "-e", "kerberos.crealm"]


def test_no_malformed_packets(capture):
    pcap, keytab, _ = capture
    for keys in ([], ["-o", "kerberos.decrypt:TRUE", "-o", f"kerberos.file:{keytab}"]):
        assert tshark(pcap, *keys, "-Y", "_ws.malformed or _ws.expert.severity >= 8388608") == []


def test_without_keys_the_client_stays_inside_the_ticket(capture):
    pcap, _, _ = capture
    rows = tshark(pcap, *FIELDS)
    assert {r[0] for r in rows} == {f"cifs,{HOSTNAME}", f"host,{HOSTNAME}"}     # SMB, then the bind
    assert all(r[1] == "" for r in rows)


def test_with_the_keytab_tshark_names_the_client_the_lab_acted_for(capture):
    pcap, keytab, identities = capture
    rows = tshark(pcap, "-o", "kerberos.decrypt:TRUE", "-o", f"kerberos.file:{keytab}", *FIELDS)
    by_service = {r[0]: (r[1].split(",")[0], r[2].split(",")[0]) for r in rows}
    assert by_service[f"host,{HOSTNAME}"] == ("alice", REALM)
    assert by_service[f"cifs,{HOSTNAME}"] == ("alice", REALM)
    assert [i["user"] for i in identities] == ["alice"]
