"""Start each server of the bench as its own process on 127.0.0.1 and stop it again.

Every peer is a `Peer`: a process (whose /proc tree is measured), the ports it answers on, a
version string and its settings. Servers written in Python (impacket's SimpleSMBServer, scapy's
SMB_Server and DCERPC_Server) run in a child started from this file
(`python bench/peers.py impacket|scapy-smb|scapy-rpc PORT`); Samba runs from a private smb.conf in
a temp dir that is removed on stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

USER, PASSWORD, DOMAIN = "alice", "Alice-Pw-1", "CORP"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LAB = os.path.join(HERE, "..", "emulator", "default_lab.yaml")
KERBEROS_HOST = "exch01.corp.test"     # Samba's and MIT's clients refuse Kerberos to "localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, seconds: float = 30.0, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def nt_hash(password: str) -> bytes:
    try:
        return hashlib.new("md4", password.encode("utf-16-le")).digest()
    except ValueError:                 # OpenSSL 3 without the legacy provider
        from impacket.ntlm import compute_nthash
        return compute_nthash(password)


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen
    ports: dict[str, int]
    version: str
    settings: str
    cleanup: list[str] = field(default_factory=list)
    extra_procs: list[subprocess.Popen] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    tmp: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.proc.pid, *(p.pid for p in self.extra_procs)]

    def stop(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in (self.proc, *self.extra_procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for d in self.cleanup:
            shutil.rmtree(d, ignore_errors=True)


def _pkg_version(dist: str) -> str:
    from importlib.metadata import version
    try:
        return version(dist)
    except Exception:
        return "?"


# ---------------------------------------------------------------------- ours
def start_ours(smb: bool = True, tcp: bool = True, *, policy: dict | None = None, kerberos: bool = False,
               connections: int = 1024, label: str = "ours", root: str | None = None) -> Peer:
    """Our server (`rpcauth serve`) from the default lab with `policy` merged in; with `kerberos` the
    lab starts its realm (MIT KDC on an ephemeral port) and the peer's `info` holds krb5.conf and the
    service host name from the ready file."""
    import yaml
    tmp = tempfile.mkdtemp(prefix="rpcauth-bench-")
    ready = os.path.join(tmp, "ready.json")
    smb_port, tcp_port = free_port(), free_port()
    config = os.path.join(tmp, "lab.yaml")
    # Another checkout reads its own default lab: an older one refuses keys it does not know.
    default_lab = os.path.join(root, "emulator", "default_lab.yaml") if root else DEFAULT_LAB
    with open(default_lab) as src:
        lab = yaml.safe_load(src)
    # every bench client comes from 127.0.0.1: allow the held sessions and connections from it
    lab["policy"]["limits"] = {"max_connections_per_peer": 2 * connections + 64,
                               "max_connections": 2 * connections + 64}
    lab["policy"].update(policy or {})
    if kerberos:
        lab["kerberos"] = {"enabled": True, "hostname": KERBEROS_HOST, "kdc_port": 0}
    with open(config, "w") as dst:
        yaml.safe_dump(lab, dst)
    cmd = [sys.executable, "-m", "emulator.cli", "serve", "--host", "127.0.0.1", "--config", config,
           "--smb-port", str(smb_port if smb else 0), "--epm-port", "0",
           "--emsmdb-port", str(tcp_port if tcp else 0), "--ready-file", ready]
    env = {**os.environ, "PYTHONPATH": root} if root else None      # `root`: another checkout's code
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp, env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)
    if not os.path.exists(ready):
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("rpcauth serve did not start")
    info = json.load(open(ready))
    settings = ("SMB 2.0.2-3.1.1, signing as negotiated (not required), NTLMv2; TCP min level connect; "
                f"policy.limits {lab['policy']['limits']}; no capture, no event file")
    if policy:
        settings += f"; policy {policy}"
    if kerberos:
        settings += f"; kerberos realm {info.get('realm')} (MIT KDC), services on {KERBEROS_HOST}"
    peer = Peer(label, proc, {"smb": info["smb"], "tcp": info["emsmdb"]},
                f"rpcauth-emulator {_pkg_version('rpcauth-emulator')}", settings, cleanup=[tmp])
    peer.info = info
    peer.tmp = tmp
    return peer


def kerberos_tickets(peer: Peer, user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    """MIT kinit for `user`, then kvno for the SMB (cifs/) and RPC (host/) services, into a ccache in
    the peer's temp dir: the environment a client needs to log on with those tickets."""
    info = peer.info
    host, realm = info["kerberos_host"], info["realm"]
    env = {**os.environ, "KRB5_CONFIG": info["krb5_conf"],
           "KRB5CCNAME": os.path.join(peer.tmp, f"{user}.ccache")}     # a path: impacket reads no FILE: prefix
    env.pop("KRB5_KTNAME", None)
    r = subprocess.run(["kinit", f"{user}@{realm}"], input=password + "\n", capture_output=True, text=True,
                       env=env, timeout=30)
    if r.returncode:
        raise RuntimeError(f"kinit failed: {r.stderr.strip()}")
    for svc in ("cifs", "host"):
        r = subprocess.run(["kvno", f"{svc}/{host}@{realm}"], capture_output=True, text=True, env=env, timeout=30)
        if r.returncode:
            raise RuntimeError(f"kvno {svc} failed: {r.stderr.strip()}")
    return env


# ---------------------------------------------------------------------- impacket / scapy (children)
def _start_child(kind: str, version: str, settings: str, port_key: str) -> Peer:
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "peers.py"), kind, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_listening(port, 30, proc):
        proc.kill()
        raise RuntimeError(f"{kind} did not start")
    return Peer(kind, proc, {port_key: port}, version, settings)


def start_impacket() -> Peer:
    return _start_child("impacket", f"impacket {_pkg_version('impacket')} SimpleSMBServer",
                        "SMB2 support on (2.0.2/2.1), signing not required, NTLMv2, fixed challenge", "smb")


def start_scapy_smb() -> Peer:
    return _start_child("scapy-smb", f"scapy {_pkg_version('scapy')} SMB_Server",
                        "MAX_DIALECT 2.1 (a zero CreditRequest counted as one), NTLM identities (logins checked), signing as negotiated", "smb")


def start_scapy_rpc() -> Peer:
    return _start_child("scapy-rpc", f"scapy {_pkg_version('scapy')} DCERPC_Server",
                        "ncacn_ip_tcp, NTLM identities, srvsvc NetrServerGetInfo", "tcp")


def _run_impacket(port: int) -> None:
    from impacket import smbserver
    srv = smbserver.SimpleSMBServer(listenAddress="127.0.0.1", listenPort=port)
    srv.setSMB2Support(True)
    srv.setSMBChallenge("")
    srv.addCredential(USER, 1000, "aad3b435b51404eeaad3b435b51404ee", nt_hash(PASSWORD).hex())
    srv.setLogFile("/dev/null")
    srv.start()


def _scapy_ssp():
    from scapy.layers.ntlm import NTLMSSP
    return NTLMSSP(IDENTITIES={USER: nt_hash(PASSWORD)}, DOMAIN_NB_NAME=DOMAIN, COMPUTER_NB_NAME="SCAPY")


def _run_scapy_smb(port: int) -> None:
    from scapy.config import conf
    from scapy.layers.smbserver import SMB_Server
    from scapy.layers.spnego import SPNEGOSSP
    conf.verb = 0

    class CreditTolerantSMBServer(SMB_Server):
        # impacket's client asks for 0 credits in NEGOTIATE; scapy then grants none, has no sequence
        # number left and its automaton dies. Count such a request as asking for one credit.
        def update_smbheader(self, pkt):
            if pkt.CreditRequest == 0:
                pkt.CreditRequest = 1
            return super().update_smbheader(pkt)

    CreditTolerantSMBServer.spawn(port=port, iface=conf.loopback_name, local_ip="127.0.0.1", verb=False,
                     ssp=SPNEGOSSP([_scapy_ssp()]), shares=[], MAX_DIALECT=0x0210, LOCAL_IPS=["127.0.0.1"])


def _run_scapy_rpc(port: int) -> None:
    from scapy.config import conf
    from scapy.layers.dcerpc import DCERPC_Transport
    from scapy.layers.smbserver import SMB_DCERPC_Server
    import builtins
    conf.verb = 0
    builtins.print = lambda *a, **k: None          # its accept loop prints every connection
    from scapy.arch import get_if_addr              # noqa: F401 (spawn resolves the interface)
    SMB_DCERPC_Server.spawn(DCERPC_Transport.NCACN_IP_TCP, iface=conf.loopback_name, port=port,
                            ssp=_scapy_ssp(), shares=[], verb=False)


# ---------------------------------------------------------------------- Samba
SMB_CONF = """[global]
  workgroup = {domain}
  netbios name = SAMBABENCH
  server role = standalone server
  smb ports = {smb_port}
  interfaces = lo
  bind interfaces only = yes
  private dir = {d}/private
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  pid directory = {d}/pid
  ncalrpc dir = {d}/ncalrpc
  binddns dir = {d}/binddns
  log file = {d}/log.%m
  log level = 0
  max log size = 100
  server min protocol = SMB2_02
  server signing = auto
  ntlm auth = ntlmv2-only
  passdb backend = tdbsam:{d}/private/passdb.tdb
  rpc start on demand helpers = false
  rpc server port = {rpc_port}
  rpc server dynamic port range = {rpc_port}-{rpc_port_hi}
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  disable netbios = yes
{encryption}
"""
SMB_PLAIN = """  server max protocol = SMB2_10
  smb encrypt = off"""
SMB_ENCRYPTED = """  server max protocol = SMB3_11
  server smb encrypt = required
  server smb3 encryption algorithms = AES-128-GCM"""


def samba_version() -> str:
    try:
        return subprocess.run(["smbd", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


def start_samba(encrypted: bool = False) -> Peer:
    """smbd plus samba-dcerpcd from a private config in a temp dir (root only); `encrypted`: SMB up to
    3.1.1 with `server smb encrypt = required` and AES-128-GCM only."""
    if os.geteuid() != 0 or not shutil.which("smbd"):
        raise RuntimeError("Samba needs root and the Debian samba package")
    d = tempfile.mkdtemp(prefix="rpcauth-bench-samba-")
    for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc", "binddns"):
        os.makedirs(os.path.join(d, sub), mode=0o755)
    smb_port, rpc_port = free_port(), 49600 + os.getpid() % 200 + (40 if encrypted else 0)
    conf = os.path.join(d, "smb.conf")
    with open(conf, "w") as f:
        f.write(SMB_CONF.format(domain=DOMAIN, smb_port=smb_port, d=d, rpc_port=rpc_port,
                                rpc_port_hi=rpc_port + 20, encryption=SMB_ENCRYPTED if encrypted else SMB_PLAIN))
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", USER], check=True, env=env,
                       capture_output=True)
    subprocess.run(["smbpasswd", "-c", conf, "-a", "-s", USER], input=f"{PASSWORD}\n{PASSWORD}\n", text=True,
                   check=True, capture_output=True, env=env)
    dcerpcd = subprocess.Popen(["/usr/libexec/samba/samba-dcerpcd", "--libexec-rpcds", "--foreground",
                                "--no-process-group", f"--configfile={conf}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    smbd = subprocess.Popen(["smbd", "--foreground", "--no-process-group", f"--configfile={conf}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    settings = ("smbd + samba-dcerpcd, server max protocol SMB3_11, server smb encrypt = required, "
                "server smb3 encryption algorithms = AES-128-GCM" if encrypted else
                "smbd + samba-dcerpcd, server max protocol SMB2_10 (2.1), smb encrypt = off")
    peer = Peer("samba-enc" if encrypted else "samba", smbd, {"smb": smb_port, "tcp": rpc_port}, samba_version(),
                settings + ", server signing auto, ntlm auth ntlmv2-only", cleanup=[d], extra_procs=[dcerpcd])
    if not wait_listening(smb_port, 30, smbd):
        peer.stop()
        raise RuntimeError("smbd did not start")
    peer.ports["tcp"] = _samba_srvsvc_port(rpc_port, rpc_port + 20)
    return peer


def _samba_srvsvc_port(lo: int, hi: int) -> int:
    """Ask samba-dcerpcd's endpoint mapper where srvsvc listens on TCP (0 when it does not)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            from impacket.dcerpc.v5 import epm, srvs
            binding = epm.hept_map("127.0.0.1", srvs.MSRPC_UUID_SRVS, protocol="ncacn_ip_tcp")
            return int(binding.split("[")[1].rstrip("]"))
        except Exception:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    {"impacket": _run_impacket, "scapy-smb": _run_scapy_smb, "scapy-rpc": _run_scapy_rpc}[kind](port)
