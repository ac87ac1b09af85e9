#!/usr/bin/env python3
"""Samba's own test suite, smbtorture, against the emulator and against a real Samba
configured the same way: one catalogue of runs and expected results, shared by
tests/test_smbtorture.py (the emulator column, in CI) and by docs/conformance.md (both
columns, regenerated with the command below).

    python3 scripts/conformance.py                    # print the table (emulator only)
    sudo python3 scripts/conformance.py --samba --write docs/conformance.md

Every run is one smbtorture process with a bounded run time. smbtorture is pointed at the
lab's ephemeral ports: `ncacn_ip_tcp:HOST[PORT,options]` for the endpoint mapper on TCP, and
`-p PORT` (smbtorture's --smb-ports, the smb.conf `smb ports` option) for SMB. Runs that need
the endpoint mapper on TCP port 135 (smbtorture maps every interface through it, whatever the
binding says) need root and a free port 135; they are skipped, with that reason, otherwise.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMBTORTURE = "smbtorture"
USER, PASSWORD, DOMAIN = "alice", "Alice-Pw-1", "CORP"
HOST = "127.0.0.1"
RUN_TIMEOUT = 60          # seconds; smbtorture's own --maximum-runtime is set a little lower
EPM_WELL_KNOWN = 135

# smb.conf protocol names for the dialects the emulator serves (clientmin/maxprotocol).
DIALECTS = {"NT1": "SMB1 (NT LM 0.12)", "SMB2_02": "SMB 2.0.2", "SMB2_10": "SMB 2.1",
            "SMB3_00": "SMB 3.0", "SMB3_02": "SMB 3.0.2", "SMB3_11": "SMB 3.1.1"}
DEFAULT_DIALECT = "SMB3_11"


# ------------------------------------------------------------------------------- catalogue

@dataclass(frozen=True)
class Run:
    """One smbtorture invocation. `transport` is "tcp" (binding on the endpoint mapper's TCP
    port), "np" (binding on a named pipe, `endpoint` the pipe) or "unc" (//HOST/IPC$)."""
    id: str
    family: str
    tests: tuple[str, ...]
    transport: str
    endpoint: str = ""
    options: str = ""                  # binding options: ntlm, spnego, connect, sign, seal, bigendian
    # SMB dialect, forced as both minimum and maximum; None leaves the choice to the test
    # (rpc.samba3's pipe tests pick SMB1 or SMB2 themselves).
    dialect: str | None = DEFAULT_DIALECT
    lab: str = "kb"                    # kb (the default KB lab), anonymous (anonymous logons allowed),
                                       # encryption (SMB3 encryption offered)
    needs_135: bool = False
    extra: tuple[str, ...] = ()
    subtests: tuple[str, ...] = ()     # the full names smbtorture reports for this run
    limit: int = RUN_TIMEOUT           # seconds the run may take


@dataclass(frozen=True)
class Expect:
    """What the emulator should score on a subtest. `result` is smbtorture's verdict; for a
    failure that Windows gives too, `detail` is a string its message must contain. `smb_cause`
    marks an SMB-side defect (emulator/smb) that makes the subtest fail today: the test is an
    xfail(strict) naming that cause, so it turns red the day the defect is fixed."""
    result: str = "success"
    detail: str = ""
    why: str = ""
    smb_cause: str = ""


EPM_SUBTESTS = tuple(f"rpc.epmapper.epmapper.{t}" for t in
                     ("Map_simple", "Map_full", "Lookup_simple", "Lookup_terminate_search", "Insert_noreplace"))
SAMBA3_SUBTESTS = tuple(f"rpc.samba3.{t}" for t in (
    "smb1-pipe-name", "smb2-pipe-name", "smb2-pipe-read-close", "smb2-pipe-read-tdis",
    "smb2-pipe-read-logoff", "smb-reauth1", "smb-reauth2", "smb2-reauth1", "smb2-reauth2"))
ENCRYPTION_SUBTESTS = tuple(f"smb2.session.encryption-{c}" for c in
                            ("aes-128-ccm", "aes-128-gcm", "aes-256-ccm", "aes-256-gcm"))
SRVSVC_SUBTESTS = ("rpc.srvsvc.srvsvc anonymous access.NetShareEnumAll",
                   "rpc.srvsvc.srvsvc anonymous access.NetShareEnum",
                   "rpc.srvsvc.srvsvc anonymous access.NetShareGetInfo",
                   # smbtorture repeats the test case's name when one test of it is selected
                   "rpc.srvsvc.srvsvc (admin access).srvsvc (admin access).NetSrvGetInfo")

_REGISTRATION = ("epm_Insert from the network is refused (NT_STATUS_ACCESS_DENIED): Windows and "
                 "Samba accept endpoint registration from local callers only (MS-RPCE 2.2.1.2; "
                 "Samba's _epm_Insert requires ncalrpc)")
_LSARPC_READ = ("the test opens the lsarpc pipe, which the emulator does not serve (it is only a "
                "name to hold open here), and expects a read on the empty pipe to stay pending "
                "until close / tree disconnect / logoff completes it with STATUS_PIPE_BROKEN; "
                "the SMB2 engine answers such a read at once with STATUS_PIPE_EMPTY")

_LOOKUP_END = ("Windows ends an ept_lookup walk with a short batch, status 0 and a null handle "
               "(impacket pull request 1849: a Windows AD 'always returns 0 and clears the "
               "handle'; impacket's hept_lookup / rpcdump.py raise on any other status), and "
               "the emulator does the same. Samba sends EPMAPPER_STATUS_NO_MORE_ENTRIES "
               "(0x16c9a0d6) with the last batch, which this test requires")

_ROOT_HANDLE = ("the encrypted session setup and tree connect pass with the cipher forced (3.1.1, "
                "AES-128-GMAC signing); the test then opens the root directory of the share, which "
                "IPC$ does not have (the emulator serves IPC$ only)")

EXPECT: dict[str, Expect] = {
    **{name: Expect("failure", "smb2_util_roothandle failed", _ROOT_HANDLE) for name in ENCRYPTION_SUBTESTS},
    "rpc.epmapper.epmapper.Lookup_simple": Expect("failure", "r.out.result == ( 0x16c9a0d6 )", _LOOKUP_END),
    "rpc.epmapper.epmapper.Map_full": Expect("failure", "test_Insert failed", _REGISTRATION),
    "rpc.epmapper.epmapper.Insert_noreplace": Expect("failure", "NT_STATUS_ACCESS_DENIED", _REGISTRATION),
    "rpc.samba3.smb1-pipe-name": Expect(smb_cause=(
        "SMB1 NT_CREATE_ANDX of 'pipe\\srvsvc' is refused with STATUS_OBJECT_NAME_NOT_FOUND, but "
        "'\\pipe\\srvsvc' still opens the pipe: impacket sends that name for the common binding "
        "ncacn_np:HOST[\\pipe\\NAME], and the lab keeps its peers working: samba3rpc.c:4020 "
        "status was NT_STATUS_OK, expected NT_STATUS_OBJECT_NAME_NOT_FOUND")),
    "rpc.samba3.smb2-pipe-name": Expect(smb_cause=(
        "SMB2 CREATE of '\\srvsvc' (leading backslash) is refused with "
        "STATUS_OBJECT_NAME_NOT_FOUND (MS-SMB2 2.2.13), but 'pipe\\srvsvc' still opens the pipe: "
        "impacket sends that name for the common binding ncacn_np:HOST[\\pipe\\NAME] (it drops "
        "only the leading backslash), and the lab keeps its peers working: samba3rpc.c:4280 "
        "status was NT_STATUS_OK, expected NT_STATUS_OBJECT_NAME_NOT_FOUND")),
    "rpc.samba3.smb2-pipe-read-close": Expect(smb_cause=_LSARPC_READ),
    "rpc.samba3.smb2-pipe-read-tdis": Expect(smb_cause=_LSARPC_READ),
    "rpc.samba3.smb2-pipe-read-logoff": Expect(smb_cause=_LSARPC_READ),
    "rpc.samba3.smb-reauth1": Expect(smb_cause=(
        "needs the lsarpc pipe (lsa_GetUserName before and after an SMB1 re-authentication "
        "to anonymous): samba3rpc.c:3439 pipe_bind_smb failed NT_STATUS_OBJECT_NAME_NOT_FOUND")),
    "rpc.samba3.smb-reauth2": Expect(smb_cause=(
        "the SMB1 re-authentication to anonymous succeeds; the test then opens lsarpc, which the "
        "emulator does not serve: samba3rpc.c:3615 pipe_bind_smb failed NT_STATUS_OBJECT_NAME_NOT_FOUND")),
    "rpc.samba3.smb2-reauth1": Expect(smb_cause=(
        "needs the lsarpc pipe (lsa_GetUserName around an SMB2 re-authentication): "
        "samba3rpc.c:3734 pipe_bind_smb2 failed NT_STATUS_OBJECT_NAME_NOT_FOUND")),
    "rpc.samba3.smb2-reauth2": Expect(smb_cause=(
        "the SMB2 re-authentication to anonymous succeeds; the test then opens lsarpc, which the "
        "emulator does not serve: samba3rpc.c:3896 pipe_bind_smb2 failed NT_STATUS_OBJECT_NAME_NOT_FOUND")),
}

# Binding options on TCP: the authentication type and level combinations smbtorture offers
# (no option: SPNEGO at integrity, Samba's default when credentials are given), and big-endian
# NDR alone and with each protection level.
TCP_OPTIONS = ("", "connect", "ntlm,connect", "sign", "ntlm,sign", "spnego,sign", "seal",
               "ntlm,seal", "spnego,seal", "bigendian", "bigendian,ntlm,sign", "bigendian,spnego,seal")
# On a pipe: the SMB session alone (no RPC authentication), then the same protections.
# (Samba's client binds without authentication on a pipe unless signing or sealing is asked:
# "connect" there changes nothing.)
PIPE_OPTIONS = ("sign", "seal", "ntlm,seal", "spnego,sign", "bigendian", "bigendian,seal")


def _opt_id(options: str) -> str:
    return options.replace(",", "-") or "default"


def catalogue() -> list[Run]:
    runs: list[Run] = []
    for opts in TCP_OPTIONS:
        runs.append(Run(f"epm-tcp-{_opt_id(opts)}", "rpc.epmapper", ("rpc.epmapper",), "tcp",
                        options=opts, subtests=EPM_SUBTESTS))
    # The endpoint mapper and the management interface over \pipe\epmapper (rpc.mgmt maps
    # every pipe it knows: epmapper and srvsvc here), on every dialect with signing required.
    for dialect in DIALECTS:
        runs.append(Run(f"epm-mgmt-np-{dialect}", "rpc.epmapper, rpc.mgmt", ("rpc.epmapper", "rpc.mgmt"),
                        "np", "epmapper", dialect=dialect, subtests=EPM_SUBTESTS + ("rpc.mgmt",)))
    for opts in PIPE_OPTIONS:
        runs.append(Run(f"epm-mgmt-np-{_opt_id(opts)}", "rpc.epmapper, rpc.mgmt", ("rpc.epmapper", "rpc.mgmt"),
                        "np", "epmapper", options=opts, subtests=EPM_SUBTESTS + ("rpc.mgmt",)))
    # SRVSVC as a non-administrator sees it (the anonymous-access cases log on anonymously,
    # so the lab allows anonymous logons here).
    srvsvc_tests = ("rpc.srvsvc.srvsvc anonymous access", "rpc.srvsvc.srvsvc (admin access).NetSrvGetInfo")
    for opts, dialect in (("", DEFAULT_DIALECT), ("seal", "SMB2_10"), ("bigendian", "NT1"),
                          ("bigendian,ntlm,sign", "SMB3_00")):
        runs.append(Run(f"srvsvc-np-{_opt_id(opts)}-{dialect}", "rpc.srvsvc", srvsvc_tests, "np", "srvsvc",
                        options=opts, dialect=dialect, lab="anonymous", subtests=SRVSVC_SUBTESTS))
    # How many operations each interface has: a fault other than "operation out of range"
    # below the last opnum, that fault above it.
    for iface in ("epmapper", "srvsvc"):
        runs.append(Run(f"countcalls-{iface}", "rpc.countcalls", ("rpc.countcalls",), "np", iface,
                        extra=(f"--option=countcalls:interface={iface}",), subtests=("rpc.countcalls",)))
    # rpc.samba3's SMB pipe tests, in three runs so that a test that hangs (a pending read
    # nothing completes) costs its own run only.
    for part, names in (("pipe-name", SAMBA3_SUBTESTS[:2]), ("pipe-read", SAMBA3_SUBTESTS[2:5]),
                        ("reauth", SAMBA3_SUBTESTS[5:])):
        runs.append(Run(f"samba3-{part}", "rpc.samba3", names, "unc", dialect=None, lab="anonymous",
                        subtests=names, limit=20))
    # FSCTL_VALIDATE_NEGOTIATE_INFO on a tree connect (IPC$ stands in for the "no permission"
    # share the test wants, the emulator serving no other); the test needs SMB 3.
    for dialect in ("SMB3_00", "SMB3_02", "SMB3_11"):
        runs.append(Run(f"validate-negotiate-{dialect}", "smb2.ioctl", ("smb2.ioctl.bug14788.VALIDATE_NEGOTIATE",),
                        "unc", dialect=dialect, extra=("--option=torture:noperm_share=IPC$",),
                        subtests=("smb2.ioctl.bug14788.VALIDATE_NEGOTIATE",)))
    # SMB3 encryption with each cipher forced, over 3.1.1 with signing negotiation.
    runs.append(Run("smb2-session-encryption", "smb2.session", ENCRYPTION_SUBTESTS, "unc", dialect="SMB3_11",
                    lab="encryption", subtests=ENCRYPTION_SUBTESTS))
    runs.append(Run("secleak-smb1", "base.secleak", ("base.secleak",), "unc", dialect=None,
                    extra=("--timelimit=2",), subtests=("base.secleak",)))
    # Through the endpoint mapper on TCP 135: rpc.mgmt over TCP maps each interface there.
    for opts in ("", "ntlm,seal", "bigendian"):
        runs.append(Run(f"mgmt-tcp135-{_opt_id(opts)}", "rpc.mgmt", ("rpc.mgmt",), "tcp", options=opts,
                        needs_135=True, subtests=("rpc.mgmt",)))
    return runs


# Tests of the families tried that are not run, and why.
LEFT_OUT: list[tuple[str, str]] = [
    ("rpc.srvsvc.srvsvc (admin access).* (all but NetSrvGetInfo)",
     ("expects an administrator (share levels 2/501/502, NetSessEnum, NetFileEnum, NetConnEnum, "
      "NetDiskEnum, NetTransportEnum, NetRemoteTOD, NetCharDev*): the lab has none and its "
      "SRVSVC serves share listing as Windows serves it to a non-administrator")),
    ("rpc.srvsvc.srvsvc (admin access).NetShareAddSetDel", "needs a disk share to create (dangerous test)"),
    ("rpc.samba3.bind, getusername, sessionkey, lsa, lsa_over_netlogon, getaliasmembership-0",
     "need lsarpc (and samr / a domain join for sessionkey)"),
    ("rpc.samba3.netlogon, randomauth2", "need netlogon and a machine account"),
    ("rpc.samba3.spoolss, wkssvc, winreg, regconfig, sharesec, srvsvc",
     "need spoolss / wkssvc / winreg / a disk share"),
    ("rpc.samba3.pipes_supported_interfaces", "needs the winreg and svcctl pipes"),
    ("smb2.ioctl.* (all but bug14788.VALIDATE_NEGOTIATE)",
     ("need a disk share (files, copy-chunk, "
      "sparse, compression, shadow copies, resume keys)")),
    ("smb2.ioctl.bug14788.NETWORK_INTERFACE, network_interface_info",
     ("multichannel interface "
      "discovery: not served (the emulator has no multichannel)")),
    ("rpc.secleak", "does not exist in smbtorture 4.17; base.secleak (SMB1 session setups) is run"),
    ("rpc.countcalls over every interface",
     ("run per served interface with countcalls:interface; "
      "the full scan binds ~80 interfaces the emulator does not serve")),
    ("rpc.mgmt on the EMSMDB endpoints",
     ("Samba's interface list has no EMSMDB, so smbtorture "
      "never maps it; tests/test_mgmt.py checks it there with impacket")),
    ("rpc.lsa, rpc.samr, rpc.netlogon, rpc.spoolss, rpc.winreg, rpc.wkssvc, rpc.svcctl, ...",
     "interfaces the emulator does not serve"),
    ("smb2.session.* (reauth1-6 among them)",
     ("create files on a disk share (session.c: smb2_create of a data file fails on IPC$); "
      "the SMB re-authentication they exercise is run through rpc.samba3's reauth tests")),
    ("smb2.* / base.* / raw.* other than the above", "need a disk share"),
]


# ------------------------------------------------------------------------------- running

@dataclass(frozen=True)
class Server:
    """Where a run goes: the SMB port and the endpoint mapper's TCP port."""
    kind: str           # "emulator" | "samba"
    smb: int
    epm: int


@dataclass
class Outcome:
    name: str
    result: str                  # success | failure | error | skip | xfail | missing
    detail: str = ""


@dataclass
class RunResult:
    run: Run
    outcomes: dict[str, Outcome]
    output: str
    elapsed: float
    returncode: int | None
    argv: list[str] = field(default_factory=list)
    # What the emulator saw of the run (its events): SMB dialects negotiated and RPC binds as
    # (interface, auth type, auth level). Empty for Samba.
    dialects: set[str] = field(default_factory=set)
    binds: set[tuple[str, str, str]] = field(default_factory=set)

    def outcome(self, name: str) -> Outcome:
        if name in self.outcomes:
            return self.outcomes[name]
        if self.returncode is None or "maximum runtime exceeded" in self.output.lower():
            return Outcome(name, "timeout", f"the run was stopped after {self.run.limit} s before {name} ended")
        return Outcome(name, "missing", f"smbtorture did not report {name}")


def have_smbtorture() -> bool:
    return shutil.which(SMBTORTURE) is not None


def argv_for(run: Run, server: Server) -> list[str]:
    opts = f",{run.options}" if run.options else ""
    if run.transport == "tcp":
        port = EPM_WELL_KNOWN if run.needs_135 else server.epm
        target = f"ncacn_ip_tcp:{HOST}[{port}{opts}]"
    elif run.transport == "np":
        target = f"ncacn_np:{HOST}[{run.endpoint}{opts}]"
    else:
        target = f"//{HOST}/IPC$"
    argv = [SMBTORTURE, target, "-U", f"{DOMAIN}/{USER}%{PASSWORD}", "-W", DOMAIN,
            f"--smb-ports={server.smb}", "--fullname", f"--maximum-runtime={run.limit - 5}",
            "--option=clientsigning=required", "--option=clientipcsigning=required"]
    if run.dialect:
        # DCE/RPC over a pipe connects to IPC$ with the `client ipc` protocol range; the SMB
        # tests' own connections use the `client` one. Force both.
        argv += [f"--option=client{ipc}{edge}protocol={run.dialect}"
                 for ipc in ("", "ipc") for edge in ("min", "max")]
    return argv + [*run.extra, *run.tests]


_VERDICT = re.compile(r"^(success|failure|error|skip|xfail|uxsuccess|fail): (.+?)( \[)?$")


def parse(output: str) -> dict[str, Outcome]:
    """smbtorture's default output is subunit v1 text: `test: NAME`, then a verdict line
    `success: NAME` or `failure|error|skip: NAME [` followed by the detail and a lone `]`."""
    outcomes: dict[str, Outcome] = {}
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        m = _VERDICT.match(lines[i])
        i += 1
        if not m:
            continue
        verdict, name, bracket = m.group(1), m.group(2), m.group(3)
        verdict = "failure" if verdict == "fail" else verdict
        detail: list[str] = []
        if bracket:
            while i < len(lines) and lines[i] != "]":
                if not lines[i].startswith("time: "):
                    detail.append(lines[i])
                i += 1
            i += 1
        outcomes[name] = Outcome(name, verdict, "\n".join(detail).strip())
    return outcomes


def run_smbtorture(run: Run, server: Server) -> RunResult:
    argv = argv_for(run, server)
    timeout = run.limit
    start = time.monotonic()
    # smbtorture writes its logs and state under the working directory: a private one.
    with tempfile.TemporaryDirectory(prefix="rpcauth-torture-") as cwd:
        env = {**os.environ, "HOME": cwd}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                                  check=False)
            output, code = proc.stdout + "\n" + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            output, code = out + f"\n[timed out after {timeout:.0f} s]", None
    return RunResult(run, parse(output), output, time.monotonic() - start, code, argv)


def excerpt(output: str, limit: int = 60) -> str:
    """The lines worth reading from a run's output (no timestamps, no skipped pipes)."""
    keep = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(("time: ", "progress: "))
            and "Interface not available - skipping" not in ln and "Failed to map port" not in ln
            and "NT_STATUS_OBJECT_NAME_NOT_FOUND" not in ln and not ln.startswith("Testing pipe")]
    return "\n".join(keep[-limit:])


def port_135_free() -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, EPM_WELL_KNOWN))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------- the emulator

def lab_config(kind: str):
    from emulator.config import default_config, default_config_with
    if kind == "anonymous":
        return default_config_with({"policy": {"anonymous_allowed": True}})
    if kind == "encryption":
        # The KB lab does not offer SMB3 encryption; this one offers it as a Windows server does.
        return default_config_with({"policy": {"smb_encryption": "desired"}})
    return default_config()


# The dialect names the emulator's events use.
SEEN_DIALECT = {"NT1": "NT LM 0.12", "SMB2_02": "2.0.2", "SMB2_10": "2.1", "SMB3_00": "3.0",
                "SMB3_02": "3.0.2", "SMB3_11": "3.1.1"}


@contextmanager
def emulator(kind: str, epm_135: bool = False) -> Iterator[tuple[Server, object]]:
    from emulator.lab import Lab
    lab = Lab(lab_config(kind), ports={"epm": EPM_WELL_KNOWN} if epm_135 else None)
    lab.start()
    try:
        yield Server("emulator", lab.ports["smb"], lab.ports["epm"]), lab
    finally:
        lab.stop()


def _run_observed(run: Run, server: Server, lab) -> RunResult:
    """One run, with what the lab saw of it: the connections it opened, their negotiated
    dialects and their binds (smbtorture has left when its events are all in)."""
    first = len(lab.records())
    result = run_smbtorture(run, server)
    deadline = time.monotonic() + 5
    while True:
        tail = lab.records()[first:]
        opened = {r["conn"] for r in tail if r["kind"] == "conn.open"}
        if opened <= {r["conn"] for r in tail if r["kind"] == "conn.close"} or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for rec in tail:
        if rec["conn"] not in opened:
            continue
        if rec["kind"] == "smb.negotiate" and rec.get("dialect"):
            result.dialects.add(rec["dialect"])
        elif rec["kind"] == "rpc.bind" and rec.get("result") == "ok":
            result.binds.add((rec.get("interface_name", ""), rec["auth_type"], rec["auth_level"]))
    return result


def run_on_emulator(runs: list[Run], log: Callable[[str], None] = lambda s: None) -> dict[str, RunResult | str]:
    """Every run against a fresh lab of its kind; a string instead of a result says why a run
    was not made."""
    results: dict[str, RunResult | str] = {}
    for kind in sorted({r.lab for r in runs}):
        group = [r for r in runs if r.lab == kind and not r.needs_135]
        if group:
            with emulator(kind) as (server, lab):
                for run in group:
                    results[run.id] = _run_observed(run, server, lab)
                    log(f"emulator {run.id}: {results[run.id].elapsed:.2f} s")
        root_group = [r for r in runs if r.lab == kind and r.needs_135]
        if not root_group:
            continue
        reason = needs_135_reason()
        if reason:
            for run in root_group:
                results[run.id] = reason
            continue
        try:
            ctx = emulator(kind, epm_135=True)
            server, lab = ctx.__enter__()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            for run in root_group:
                results[run.id] = "TCP port 135 on 127.0.0.1 is in use by another process"
            continue
        try:
            for run in root_group:
                results[run.id] = _run_observed(run, server, lab)
                log(f"emulator {run.id}: {results[run.id].elapsed:.2f} s")
        finally:
            ctx.__exit__(None, None, None)
    return results


def needs_135_reason() -> str:
    if os.geteuid() != 0:
        return ("smbtorture maps interfaces through the endpoint mapper on TCP port 135 whatever "
                "the binding says, and listening on 135 needs root: run as root to include it")
    if not port_135_free():
        return "TCP port 135 on 127.0.0.1 is in use by another process"
    return ""


# ------------------------------------------------------------------------------- Samba

SAMBA_OVERRIDES = {
    # The emulator's dialects and signing: SMB1 (NT LM 0.12) to 3.1.1, signing allowed.
    "server min protocol": "NT1",
    "server max protocol": "SMB3_11",
    # Anonymous share listing, as the emulator's "anonymous" lab allows.
    "restrict anonymous": "0",
}


def samba_conf(text: str, overrides: dict[str, str]) -> str:
    """bench/peers.py's smb.conf for Samba with some [global] keys replaced or added."""
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip().lower() if "=" in line else ""
        if key in overrides:
            lines.append(f"  {key} = {overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"  {k} = {v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def _bench_peers():
    """bench/peers.py, which starts the bench's private Samba."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import peers
    return peers


@contextmanager
def samba() -> Iterator[Server]:
    """smbd and samba-dcerpcd from a private config on loopback (root only): the bench's
    Samba peer (bench/peers.py) with the emulator's dialect range. samba-dcerpcd's endpoint
    mapper listens on TCP 135, its well-known port, so that port must be free."""
    peers = _bench_peers()
    original = peers.SMB_CONF
    peers.SMB_CONF = samba_conf(original, SAMBA_OVERRIDES)
    try:
        peer = peers.start_samba()
    finally:
        peers.SMB_CONF = original
    try:
        if not peers.wait_listening(EPM_WELL_KNOWN, 20):
            raise RuntimeError("samba-dcerpcd's endpoint mapper did not listen on TCP 135")
        yield Server("samba", peer.ports["smb"], EPM_WELL_KNOWN)
    finally:
        peer.stop()


def run_on_samba(runs: list[Run], log: Callable[[str], None] = lambda s: None) -> dict[str, RunResult | str]:
    if os.geteuid() != 0 or not shutil.which("smbd"):
        return {r.id: "Samba needs root and the samba package" for r in runs}
    if not port_135_free():
        return {r.id: "TCP port 135 is in use; samba-dcerpcd needs it" for r in runs}
    results: dict[str, RunResult | str] = {}
    with samba() as server:
        for run in runs:
            results[run.id] = run_smbtorture(run, server)
            log(f"samba {run.id}: {results[run.id].elapsed:.2f} s")
    return results


# ------------------------------------------------------------------------------- the table

def verdict(result: RunResult | str | None, name: str) -> str:
    if not isinstance(result, RunResult):
        return "not run"
    r = result.outcome(name).result
    return {"success": "pass", "failure": "FAIL", "error": "ERROR"}.get(r, r)


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _seconds(result: RunResult | str | None) -> str:
    return f"{result.elapsed:.2f}" if isinstance(result, RunResult) else "-"


def runs_table(runs: list[Run], emu: dict[str, RunResult | str], sam: dict[str, RunResult | str] | None) -> str:
    out = [("| run | smbtorture tests | transport | binding options | SMB dialect (signing required) | lab | "
            "emulator s | Samba s |"), "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        where = {"tcp": "ncacn_ip_tcp" + (" (port 135)" if run.needs_135 else ""),
                 "np": f"ncacn_np \\pipe\\{run.endpoint}", "unc": "SMB, IPC$"}[run.transport]
        dialect = "-" if run.transport == "tcp" else DIALECTS.get(run.dialect or "", "the test's own")
        extra = " ".join(run.extra)
        tests = ", ".join(run.tests) + (f" `{extra}`" if extra else "")
        out.append(f"| {run.id} | {tests} | {where} | {run.options or '-'} | {dialect} | {run.lab} | "
                   f"{_seconds(emu.get(run.id))} | {_seconds(sam.get(run.id)) if sam is not None else '-'} |")
    return "\n".join(out)


def _note(name: str, run_ids: list[str], emu: dict[str, RunResult | str],
          sam: dict[str, RunResult | str] | None) -> str:
    e = EXPECT.get(name, Expect())
    notes = [e.why] if e.why else []
    if e.smb_cause:
        notes.append("SMB side: " + e.smb_cause)
    skipped = {r for i in run_ids if isinstance(r := emu.get(i), str)}
    notes += [f"not run: {r}" for r in sorted(skipped)]
    if name == "rpc.countcalls":
        for label, results in (("emulator", emu), ("Samba", sam or {})):
            found = [m for i in run_ids if isinstance(r := results.get(i), RunResult)
                     for m in re.findall(r"Found (-?\d+) calls", r.output)]
            if found:
                notes.append(f"{label} found {', '.join(found)} calls")
    if not notes:
        details = {short(r.outcome(name).detail, 120) for i in run_ids
                   if isinstance(r := emu.get(i), RunResult) and r.outcome(name).result != "success"}
        notes += sorted(d for d in details if d)
    if sam:
        details = {short(r.outcome(name).detail, 120) for i in run_ids
                   if isinstance(r := sam.get(i), RunResult) and r.outcome(name).result != "success"}
        notes += [f"Samba: {d}" for d in sorted(details) if d]
        skipped = {r for i in run_ids if isinstance(r := sam.get(i), str)}
        notes += [f"Samba not run: {r}" for r in sorted(skipped)]
    return short("; ".join(notes), 400)


def results_table(runs: list[Run], emu: dict[str, RunResult | str],
                  sam: dict[str, RunResult | str] | None) -> str:
    """One row per subtest and pair of verdicts, listing the runs (binding options, dialects)
    that gave it."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for run in runs:
        for name in run.subtests:
            key = (run.family, name, verdict(emu.get(run.id), name),
                   verdict(sam.get(run.id), name) if sam is not None else "not measured")
            groups.setdefault(key, []).append(run.id)
    out = ["| family | subtest | runs | emulator | Samba 4.17 | note |", "|---|---|---|---|---|---|"]
    for (family, name, ev, sv), ids in groups.items():
        out.append(f"| {family} | {name} | {', '.join(ids)} | {ev} | {sv} | {_note(name, ids, emu, sam)} |")
    return "\n".join(out)


def left_out_table() -> str:
    out = ["| tests | why they do not apply |", "|---|---|"]
    out += [f"| {t} | {why} |" for t, why in LEFT_OUT]
    return "\n".join(out)


def timing(results: dict[str, RunResult | str]) -> str:
    done = [r for r in results.values() if isinstance(r, RunResult)]
    total = sum(r.elapsed for r in done)
    return f"{len(done)} smbtorture runs, {total:.1f} s in total (longest {max((r.elapsed for r in done), default=0):.1f} s)"


MARK_BEGIN = "<!-- conformance table: generated by scripts/conformance.py, do not edit by hand -->"
MARK_END = "<!-- end of generated table -->"


def render(runs: list[Run], emu: dict[str, RunResult | str], sam: dict[str, RunResult | str] | None) -> str:
    head = f"smbtorture: {smbtorture_version()}. Emulator: {timing(emu)}."
    head += f" Samba: {samba_version()}, {timing(sam)}." if sam else " Samba: not measured in this run."
    return "\n".join([MARK_BEGIN, "", head, "", "Runs:", "", runs_table(runs, emu, sam), "",
                      "Results:", "", results_table(runs, emu, sam), "", "Tests left out:", "",
                      left_out_table(), "", MARK_END])


def smbtorture_version() -> str:
    try:
        return subprocess.run([SMBTORTURE, "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip().splitlines()[-1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def samba_version() -> str:
    return _bench_peers().samba_version()


def write_into(path: str, block: str) -> None:
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samba", action="store_true", help="also score a private Samba (root, free port 135)")
    ap.add_argument("--write", metavar="FILE", help="replace the generated block of FILE (docs/conformance.md)")
    ap.add_argument("--only", metavar="PREFIX", help="runs whose id starts with PREFIX")
    args = ap.parse_args(argv)
    if not have_smbtorture():
        print("smbtorture is not installed (Debian package samba-testsuite)", file=sys.stderr)
        return 2
    runs = [r for r in catalogue() if not args.only or r.id.startswith(args.only)]
    log = lambda s: print(s, file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    emu = run_on_emulator(runs, log)
    sam = run_on_samba(runs, log) if args.samba else None
    block = render(runs, emu, sam)
    if args.write:
        write_into(args.write, block)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
