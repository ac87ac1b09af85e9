"""The one client every server in the bench is driven with, built on impacket's client stack.

Workloads (one "logon" each):
  np   TCP connect, SMB2 negotiate (2.1), NTLMv2 session setup, tree connect IPC$, open the pipe,
       bind without auth, one call, close, tree disconnect, logoff, TCP close.
  tcp  TCP connect, bind with NTLM at PKT_PRIVACY (bind, bind_ack, auth3), one sealed call, close.
  hold open N SMB sessions with a pipe bound on each and N TCP connections bound with NTLM, keep
       them open until stdin closes (or --hold-seconds pass), then report.

  rpcclient  Samba's rpcclient `srvinfo` (NetrServerGetInfo 101 over \\srvsvc), one process per logon,
       SMB 3.1.1; with --encrypt it requires SMB3 encryption with AES-128-GCM (impacket's SMB3
       client implements only AES-128-CCM, so the encrypted rows use Samba's client for every server).

With --kerberos the np and tcp workloads log on with the Kerberos tickets in KRB5CCNAME (MIT kinit
and kvno filled it once, outside the loop), reaching --host (the service's host name) at 127.0.0.1;
tcp then binds with SPNEGO (impacket binds Kerberos only through SPNEGO).

Calls: srvsvc (NetrServerGetInfo level 101 with ServerName '\\\\127.0.0.1': impacket's own server
faults on a NULL name) or emsmdb (EcDoConnect for the user's own mailbox).

  python bench/client.py np --port P --call srvsvc --count 50 --procs 2

prints one JSON object: ok, failures, errors, latencies (seconds), wall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from typing import Any, Callable

from impacket.dcerpc.v5 import srvs, transport
from impacket.dcerpc.v5.rpcrt import (RPC_C_AUTHN_GSS_NEGOTIATE, RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
                                      RPC_C_AUTHN_WINNT)
from impacket.smb3structs import SMB2_DIALECT_21, SMB2_DIALECT_311
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

EMSMDB_UUID = "a4f1db00-ca47-1067-b31f-00dd010662da"
EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
PIPES = {"srvsvc": r"\srvsvc", "emsmdb": r"\emsmdb"}
MAX_SECONDS_PER_RUN = 600


def _nodelay(sock: socket.socket) -> None:
    # impacket leaves Nagle on: AUTH3 then a request would wait for a delayed ACK (~40 ms).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _server_get_info(dce: Any) -> None:
    req = srvs.NetrServerGetInfo()
    req["ServerName"] = "\\\\127.0.0.1\x00"
    req["Level"] = 101
    dce.request(req)


def _ec_do_connect(dce: Any, user: str) -> None:
    from emulator.interfaces.emsmdb import hEcDoConnect
    status = hEcDoConnect(dce, f"/o=Corp/ou=Site/cn=Recipients/cn={user}")[0]
    if status != 0:
        raise RuntimeError(f"EcDoConnect status 0x{status:x}")


def _bind_and_call(dce: Any, call: str, user: str) -> None:
    if call == "srvsvc":
        dce.bind(srvs.MSRPC_UUID_SRVS)
        _server_get_info(dce)
    else:
        dce.bind(EMSMDB)
        _ec_do_connect(dce, user)


def smb_session(a: argparse.Namespace) -> tuple[SMBConnection, Any, Any]:
    dialect = SMB2_DIALECT_311 if a.dialect == "3.1.1" else SMB2_DIALECT_21
    conn = SMBConnection(a.host, "127.0.0.1", sess_port=a.port, preferredDialect=dialect, timeout=30)
    _nodelay(conn.getSMBServer().get_socket())
    if a.kerberos:
        conn.kerberosLogin(a.user, "", a.realm, kdcHost="127.0.0.1", useCache=True)
    else:
        conn.login(a.user, a.password, a.domain)
    t = transport.SMBTransport("127.0.0.1", a.port, PIPES[a.call], smb_connection=conn)
    dce = t.get_dce_rpc()
    dce.connect()
    _bind_and_call(dce, a.call, a.user)
    return conn, t, dce


def np_logon(a: argparse.Namespace) -> None:
    conn, t, _ = smb_session(a)
    tid, fid = t._SMBTransport__tid, t._SMBTransport__handle
    conn.closeFile(tid, fid)
    conn.disconnectTree(tid)
    conn.logoff()
    conn.close()


def tcp_bound(a: argparse.Namespace) -> tuple[Any, Any]:
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{a.host}[{a.port}]")
    rt.setRemoteHost("127.0.0.1")
    rt.set_connect_timeout(30)
    if a.kerberos:
        rt.set_credentials(a.user, "", a.realm)
        rt.set_kerberos(True, "127.0.0.1")
    else:
        rt.set_credentials(a.user, a.password, a.domain)
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_GSS_NEGOTIATE if a.kerberos else RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
    dce.connect()
    _nodelay(rt.get_socket())
    if a.call == "srvsvc":
        dce.bind(srvs.MSRPC_UUID_SRVS)
    else:
        dce.bind(EMSMDB)
    return rt, dce


def tcp_logon(a: argparse.Namespace) -> None:
    rt, dce = tcp_bound(a)
    if a.call == "srvsvc":
        _server_get_info(dce)
    else:
        _ec_do_connect(dce, a.user)
    dce.disconnect()


def rpcclient_logon(a: argparse.Namespace) -> None:
    argv = ["rpcclient", "-U", f"{a.domain}/{a.user}%{a.password}", "-p", str(a.port),
            "--option=clientipcmaxprotocol=SMB3_11", "--option=clientipcminprotocol=SMB3_11"]
    if a.encrypt:
        argv += ["--client-protection=encrypt", "--option=client smb3 encryption algorithms=AES-128-GCM"]
    r = subprocess.run([*argv, "127.0.0.1", "-c", "srvinfo"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0 or "platform_id" not in r.stdout:
        raise RuntimeError((r.stdout + r.stderr).strip().splitlines()[-1] if (r.stdout + r.stderr).strip()
                           else f"rpcclient exit {r.returncode}")


def run_sequence(a: argparse.Namespace, one: Callable[[argparse.Namespace], None]) -> dict[str, Any]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    for _ in range(a.count):
        if time.monotonic() - start > a.max_seconds:
            break
        t0 = time.perf_counter()
        try:
            one(a)
        except Exception as exc:       # a failed logon is a result to count, not a crash
            key = f"{type(exc).__name__}: {str(exc)[:80]}"
            errors[key] = errors.get(key, 0) + 1
            continue
        lat.append(time.perf_counter() - t0)
    return {"ok": len(lat), "failures": sum(errors.values()), "errors": errors, "latencies": lat,
            "wall": time.monotonic() - start}


def hold(a: argparse.Namespace) -> dict[str, Any]:
    """Open a.count SMB sessions with a bound pipe and a.count TCP connections bound with NTLM."""
    held: list[Any] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    smb_ok = tcp_ok = 0
    tcp_args = argparse.Namespace(**{**vars(a), "port": a.tcp_port, "call": a.tcp_call})
    for i in range(a.count):
        if time.monotonic() - start > a.max_seconds:
            errors["time limit"] = errors.get("time limit", 0) + (a.count - i) * 2
            break
        for kind, fn, args in (("smb", smb_session, a), ("tcp", tcp_bound, tcp_args)):
            if kind == "tcp" and not a.tcp_port:
                continue
            if kind == "smb" and not a.port:
                continue
            try:
                held.append(fn(args))
                if kind == "smb":
                    smb_ok += 1
                else:
                    tcp_ok += 1
            except Exception as exc:
                key = f"{kind} {type(exc).__name__}: {str(exc)[:80]}"
                errors[key] = errors.get(key, 0) + 1
    ready = {"smb_held": smb_ok, "tcp_held": tcp_ok, "failures": sum(errors.values()), "errors": errors,
             "wall": time.monotonic() - start}
    print(json.dumps({"held": ready}), flush=True)
    # Hold until the driver closes our stdin (it measures the server meanwhile), bounded in time.
    select.select([sys.stdin], [], [], a.hold_seconds)
    return ready


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["np", "tcp", "hold", "rpcclient"])
    p.add_argument("--port", type=int, default=0, help="SMB port (np, hold) or RPC port (tcp)")
    p.add_argument("--tcp-port", type=int, default=0, help="hold: RPC port for the TCP connections")
    p.add_argument("--call", choices=list(PIPES), default="srvsvc")
    p.add_argument("--tcp-call", choices=list(PIPES), default="emsmdb")
    p.add_argument("--user", default="alice")
    p.add_argument("--password", default="Alice-Pw-1")
    p.add_argument("--domain", default="CORP")
    p.add_argument("--host", default="127.0.0.1", help="the server's name (Kerberos: its service host)")
    p.add_argument("--dialect", choices=["2.1", "3.1.1"], default="2.1")
    p.add_argument("--kerberos", action="store_true", help="log on with the tickets in KRB5CCNAME")
    p.add_argument("--realm", default="CORP.TEST")
    p.add_argument("--encrypt", action="store_true", help="rpcclient: require SMB3 encryption, AES-128-GCM")
    p.add_argument("--count", type=int, default=20, help="logons per process (hold: connections per process)")
    p.add_argument("--procs", type=int, default=1, help="client processes running at once")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new logons after this")
    p.add_argument("--hold-seconds", type=float, default=120.0)
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.procs > 1:
        return _fan_out(a, argv if argv is not None else sys.argv[1:])
    if a.mode == "hold":
        print(json.dumps(hold(a)))
        return 0
    out = run_sequence(a, {"np": np_logon, "tcp": tcp_logon, "rpcclient": rpcclient_logon}[a.mode])
    print(json.dumps(out))
    return 0


def _fan_out(a: argparse.Namespace, argv: list[str]) -> int:
    """Run a.procs copies of this script at once and merge their results."""
    child_argv = [x for x in argv]
    i = child_argv.index("--procs")
    del child_argv[i:i + 2]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *child_argv, "--procs", "1"],
                              stdout=subprocess.PIPE, text=True) for _ in range(a.procs)]
    merged: dict[str, Any] = {"ok": 0, "failures": 0, "errors": {}, "latencies": [], "wall": 0.0}
    for pr in procs:
        out, _ = pr.communicate(timeout=MAX_SECONDS_PER_RUN)
        r = json.loads(out.strip().splitlines()[-1])
        merged["ok"] += r["ok"]
        merged["failures"] += r["failures"]
        merged["latencies"] += r["latencies"]
        merged["wall"] = max(merged["wall"], r["wall"])
        for k, v in r["errors"].items():
            merged["errors"][k] = merged["errors"].get(k, 0) + v
    print(json.dumps(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
