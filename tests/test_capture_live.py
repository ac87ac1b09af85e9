"""Per-connection captures written by a running lab decode in tshark as the protocols they carry."""

from __future__ import annotations

import os
import subprocess

from emulator.client import Credentials, Profile, run_client
from emulator.client.profile import Endpoint
from emulator.config import default_config_with
from emulator.lab import Lab

from harness.cast import dn, need_tool

# impacket encrypts SMB3 whenever a server offers it; these captures are of the clear path.
CLEAR = default_config_with({"policy": {"smb_encryption": "off"}})


def _tshark_fields(path: str, *fields: str) -> list[str]:
    cmd = ["tshark", "-r", path, "-T", "fields"] + [x for f in fields for x in ("-e", f)]
    return [line for line in subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.splitlines()
            if line.strip()]


def _clean(path: str) -> bool:
    r = subprocess.run(["tshark", "-r", path, "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and r.stdout.strip() == ""


def test_each_connection_gets_a_capture_tshark_decodes(tmp_path):
    need_tool("tshark")
    with Lab(CLEAR, captures=str(tmp_path)) as lab:
        for order in (("ncacn_np",), ("ncacn_ip_tcp",)):
            profile = Profile(dn("bob"), Credentials("alice", lab.password("alice")), binding_order=order,
                              prompt_answer=Credentials("bob", lab.password("bob")),
                              server=Endpoint(smb_port=lab.ports["smb"], epm_port=lab.ports["epm"]))
            run_client(profile, events=lab.events)
        paths = lab.capture_paths
    names = sorted(os.path.basename(p) for p in paths)
    assert any(n.endswith("-smb.pcap") for n in names) and any(n.endswith("-emsmdb.pcap") for n in names)
    for path in paths:
        assert _clean(path), path
    # The client may open more than one SMB connection (a retry under load): one of them opens
    # the pipe, as alice.
    smb = [p for p in paths if p.endswith("-smb.pcap")]
    assert any("emsmdb" in " ".join(_tshark_fields(p, "smb2.filename")) for p in smb)
    assert any("alice" in _tshark_fields(p, "ntlmssp.auth.username") for p in smb)
    tcp = next(p for p in paths if p.endswith("-emsmdb.pcap"))
    assert "bob" in _tshark_fields(tcp, "ntlmssp.auth.username")
    assert dn("bob") in _tshark_fields(tcp, "mapi.EcDoConnect.name")


def test_emsmdb_on_an_x11_port_is_written_where_wireshark_reads_dcerpc(tmp_path):
    need_tool("tshark")
    with Lab(CLEAR, captures=str(tmp_path), ports={"emsmdb": 6001}) as lab:
        profile = Profile(dn("bob"), Credentials("alice", lab.password("alice")), binding_order=("ncacn_ip_tcp",),
                          prompt_answer=Credentials("bob", lab.password("bob")),
                          server=Endpoint(smb_port=lab.ports["smb"], epm_port=lab.ports["epm"]))
        assert run_client(profile, events=lab.events).opened
        tcp = next(p for p in lab.capture_paths if p.endswith("-emsmdb.pcap"))
    assert "49601" in _tshark_fields(tcp, "tcp.srcport")
    assert dn("bob") in _tshark_fields(tcp, "mapi.EcDoConnect.name")
