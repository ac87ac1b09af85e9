"""The benchmark: our server against impacket, scapy and Samba, and our capture reader against tshark.

  python bench/run.py [--quick] [--no-docs]

Installs what is missing (apt-get install samba tshark when root), starts every server as its
own process on 127.0.0.1 with a high port, drives each with bench/client.py (the same impacket
client for all), measures server CPU per logon from /proc (utime+stime+cutime+cstime of the
server's whole process tree, sampled before and after), prints the ratio table and rewrites
docs/benchmarks.md. Everything it starts is stopped and its temp dirs removed on exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import capture_bench  # noqa: E402
import make_pcap  # noqa: E402
import peers  # noqa: E402
import procstat  # noqa: E402

STANDING_NOTES = [
    "samba-dcerpcd: its endpoint mapper (rpcd_epmapper) always listens on TCP 135; with `interfaces = lo` "
    "and `bind interfaces only = yes` that is 127.0.0.1:135 only, while srvsvc's ncacn_ip_tcp endpoint sits "
    "on the high port set by `rpc server port` / `rpc server dynamic port range`. The bench asks that "
    "endpoint mapper for srvsvc's port, then drives the high port directly.",
    "scapy SMB_Server: impacket's client asks for 0 credits in NEGOTIATE; scapy then grants none and its "
    "automaton dies (INSUFFICIENT_CREDITS). The bench counts such a request as asking for one credit; "
    "session setup then still ends with STATUS_MORE_PROCESSING_REQUIRED for impacket's raw-NTLM SPNEGO "
    "exchange, so scapy's row reports failures rather than a cost.",
    "scapy DCERPC_Server (srvsvc over ncacn_ip_tcp, NTLM identities): after AUTH3 its NTLM unwrap of "
    "impacket's first sealed request fails (`Checksums don't match`) and it drops the connection, so no "
    "PKT_PRIVACY logon completes against it with impacket as the client.",
    "CPU is counted in clock ticks (1/100 s); with tens of logons per row a row's figure moves by a few "
    "tenths of a millisecond between runs. Compare ratios from one run.",
]
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")
CLIENT = os.path.join(HERE, "client.py")


def ensure_tools() -> list[str]:
    notes = []
    missing = [pkg for pkg, exe in (("samba", "smbd"), ("tshark", "tshark")) if not shutil.which(exe)
               and not os.path.exists(f"/usr/sbin/{exe}")]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("echo 'wireshark-common wireshark-common/install-setuid boolean false' | "
                       "debconf-set-selections", shell=True, env=env, timeout=60)
        subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, timeout=1200, capture_output=True)
    for pkg, exe in (("samba", "smbd"), ("tshark", "tshark")):
        if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}"):
            notes.append(f"{pkg} is not installed: its rows are skipped")
    return notes


def drive(mode: str, port: int, call: str, count: int, procs: int, max_seconds: float,
          user: str = peers.USER, password: str = peers.PASSWORD, extra: tuple[str, ...] = (),
          env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, CLIENT, mode, "--port", str(port), "--call", call, "--count", str(count),
           "--procs", str(procs), "--max-seconds", str(max_seconds), "--user", user, "--password", password,
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds * 2 + 120, env=env)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": 0, "failures": count * procs, "errors": {"client crashed": r.stderr[-300:]},
                "latencies": [], "wall": 0.0}


def measure(peer: peers.Peer, mode: str, call: str, count: int, procs: int, max_seconds: float,
            extra: tuple[str, ...] = (), env: dict[str, str] | None = None, label: str = "") -> dict[str, Any]:
    port = peer.ports["tcp" if mode == "tcp" else "smb"]
    drive(mode, port, call, 3, 1, 30, extra=extra, env=env)         # warm up: imports, first fork, caches
    before = sum(procstat.cpu_seconds(p) for p in peer.pids())
    r = drive(mode, port, call, count, procs, max_seconds, extra=extra, env=env)
    time.sleep(0.3)                                                 # let the server finish closing
    after = sum(procstat.cpu_seconds(p) for p in peer.pids())
    lat = sorted(r["latencies"])
    ok = r["ok"]
    return {"peer": peer.name, "mode": label or mode, "call": call, "procs": procs, "ok": ok, "failures": r["failures"],
            "errors": r["errors"], "cpu_ms": 1000 * (after - before) / ok if ok else None,
            "median_ms": 1000 * statistics.median(lat) if lat else None,
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None,
            "per_s": ok / r["wall"] if r["wall"] else None}


def with_peer(start: Callable[[], peers.Peer], notes: list[str], fn: Callable[[peers.Peer], Any]) -> Any:
    try:
        peer = start()
    except Exception as exc:
        notes.append(f"{start.__name__}: could not start: {exc}")
        return None
    try:
        return fn(peer)
    finally:
        peer.stop()


def hold_and_measure(peer: peers.Peer, n: int, procs: int, extra: Callable[[], Any] | None = None
                     ) -> dict[str, Any]:
    """Hold n SMB sessions (pipe bound) and n TCP connections (NTLM-bound) open; RSS while held."""
    per = max(1, n // procs)
    clients = [subprocess.Popen([sys.executable, CLIENT, "hold", "--port", str(peer.ports["smb"]),
                                 "--tcp-port", str(peer.ports["tcp"]), "--call", "emsmdb", "--tcp-call", "emsmdb",
                                 "--count", str(per), "--max-seconds", "900", "--hold-seconds", "1200"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    held = {"smb_held": 0, "tcp_held": 0, "failures": 0, "errors": {}}
    try:
        for c in clients:
            line = c.stdout.readline()
            info = json.loads(line)["held"] if line else {"failures": 2 * per, "errors": {"client died": 1}}
            for k in ("smb_held", "tcp_held", "failures"):
                held[k] += info.get(k, 0)
            for k, v in info.get("errors", {}).items():
                held["errors"][k] = held["errors"].get(k, 0) + v
        held["rss_mb"] = procstat.rss_bytes(peer.pid) / 1e6
        held["extra"] = extra() if extra else None
    finally:
        for c in clients:
            try:
                c.stdin.close()
                c.wait(timeout=60)
            except Exception:
                c.kill()
    return held


def record_own(tmp: str) -> str:
    """A capture recorded by our server: named-pipe EcDoConnect logons and connect-level TCP ones."""
    from emulator.lab import Lab
    path = os.path.join(tmp, "own.pcap")
    with Lab(capture_file=path) as lab:
        drive("np", lab.ports["smb"], "emsmdb", 3, 1, 30)
        drive("np", lab.ports["smb"], "srvsvc", 3, 1, 30)
        drive("tcp", lab.ports["emsmdb"], "emsmdb", 3, 1, 30)
    return path


def record_sealed(tmp: str, logons: int) -> str:
    """A capture recorded by our server of sealed traffic only: TCP logons at PKT_PRIVACY (NTLM) and
    named-pipe logons over SMB 3.1.1 encrypted with AES-128-GCM (rpcclient), on a lab whose policy
    requires SMB encryption."""
    from emulator.config import default_config_with
    from emulator.lab import Lab
    path = os.path.join(tmp, "sealed.pcap")
    with Lab(default_config_with({"policy": {"smb_encryption": "required"}}), capture_file=path) as lab:
        drive("tcp", lab.ports["emsmdb"], "emsmdb", logons, 1, 120)
        if shutil.which("rpcclient"):
            drive("rpcclient", lab.ports["smb"], "srvsvc", max(1, logons // 4), 1, 120, extra=("--encrypt",))
    return path


def decryption_rows(quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    """Our reader on a sealed capture with `--password` (it unseals the stubs) and without; tshark
    with the NTLM password (`ntlmssp.nt_password`: it unseals NTLM PKT_PRIVACY, not SMB3 without
    session keys) and without."""
    tmp = tempfile.mkdtemp(prefix="rpcauth-bench-sealed-")
    try:
        path = os.path.join(tmp, "sealed-big.pcap")
        make_pcap.build(path, 10 if quick else 50, [record_sealed(tmp, 20)])
        mb = os.path.getsize(path) / 1e6
        rows = []
        for label, ours_extra, ts_extra in (
                ("without keys", [], []),
                ("with the password", ["--password", f"{peers.USER}:{peers.PASSWORD}"],
                 ["-o", f"ntlmssp.nt_password:{peers.PASSWORD}"])):
            out = os.path.join(tmp, "out")
            o = capture_bench.timed([sys.executable, "-m", "emulator.cli", "explain", path, "--format", "json",
                                     *ours_extra], out)
            t = capture_bench.timed(["tshark", "-n", "-r", path, *ts_extra, "-Y", capture_bench.TSHARK_FILTER,
                                     "-T", "fields", *sum((["-e", f] for f in capture_bench.TSHARK_FIELDS), [])],
                                    out) if shutil.which("tshark") else None
            rows.append({"label": label, "mb": mb, "ours": o, "tshark": t})
        return rows
    except Exception as exc:
        notes.append(f"decryption rows: {type(exc).__name__}: {exc}")
        return []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def live_view(quick: bool, notes: list[str]) -> dict[str, float] | None:
    """bench/ui_load.py: server CPU per logon with no page (ui-0) and with 50 pages (ui-50)."""
    cmd = [sys.executable, os.path.join(HERE, "ui_load.py"), "--logons", "40" if quick else "200",
           "--rounds", "1" if quick else "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    med = {}
    for line in r.stdout.splitlines():
        cols = [c.strip() for c in line.strip("|").split("|")]
        if len(cols) == 3 and cols[0] in ("plain", "captures", "ui-0", "ui-50"):
            med[cols[0]] = float(cols[1])
    if "ui-0" not in med or "ui-50" not in med:
        notes.append("live view: bench/ui_load.py gave no figures: " + (r.stderr or r.stdout)[-300:])
        return None
    return med


def capture_rows(quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    if not shutil.which("tshark"):
        notes.append("tshark missing: capture analysis skipped")
        return []
    sizes = [10, 100] if quick else [100, 1000]
    rows = []
    tmp = tempfile.mkdtemp(prefix="rpcauth-bench-pcap-")
    try:
        sources = make_pcap.reference_sources()
        try:
            sources.append(record_own(tmp))
        except Exception as exc:
            notes.append(f"could not record our own capture: {exc}")
        for mb in sizes:
            path = os.path.join(tmp, f"mapi-{mb}mb.pcap")
            make_pcap.build(path, mb, sources)
            rows.append(capture_bench.compare(path))
            os.remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------- output
def fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def logon_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| workload | server | client procs | logons ok | failures | server CPU ms/logon | median ms | p95 ms "
           "| logons/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} {r['call']} | {r['peer']} | {r['procs']} | {r['ok']} | {r['failures']} "
                   f"| {fmt(r['cpu_ms'], 2)} | {fmt(r['median_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['per_s'])} |")
    return out


def find(rows: list[dict[str, Any]], peer: str, mode: str, call: str | None = None, procs: int = 1):
    for r in rows:
        if r["peer"] == peer and r["mode"] == mode and r["procs"] == procs and (call is None or r["call"] == call):
            return r
    return None


def ratio_table(rows, growth, caps, decrypt=None, live=None) -> list[str]:
    out = ["| target | ours | reference | ratio | goal | met |", "|---|---|---|---|---|---|"]

    def cpu_ratio(label, ours, ref, goal):
        if ours and ref and ours["cpu_ms"] and ref["cpu_ms"]:
            ratio = ours["cpu_ms"] / ref["cpu_ms"]
            met = ratio <= goal and not ours["failures"]
            miss = "" if met else f" (by {ratio / goal - 1:.0%})"
            out.append(f"| {label} | {ours['cpu_ms']:.2f} ms | {ref['cpu_ms']:.2f} ms ({ref['peer']} {ref['mode']}) "
                       f"| {ratio:.2f}x | <= {goal}x | {'yes' if met else 'NO' + miss} |")
        else:
            out.append(f"| {label} | - | - | - | <= {goal}x | not measured |")

    cpu_ratio("named-pipe logon (SMB2.1, srvsvc) vs smbd", find(rows, "ours", "np", "srvsvc"),
              find(rows, "samba", "np", "srvsvc"), 0.25)
    cpu_ratio("TCP PKT_PRIVACY logon vs samba-dcerpcd", find(rows, "ours", "tcp", "emsmdb"),
              find(rows, "samba", "tcp", "srvsvc"), 0.5)
    cpu_ratio("named-pipe logon, SMB 3.1.1 AES-128-GCM required, vs smbd encrypt required",
              find(rows, "ours-enc", "rpcclient-enc", "srvsvc"), find(rows, "samba-enc", "rpcclient-enc", "srvsvc"), 0.5)
    cpu_ratio("named-pipe logon, SMB 3.1.1 AES-128-GCM required, vs our unencrypted 3.1.1 logon",
              find(rows, "ours-enc", "rpcclient-enc", "srvsvc"), find(rows, "ours", "rpcclient", "srvsvc"), 1.3)
    cpu_ratio("Kerberos SMB session + pipe vs our NTLM named-pipe logon",
              find(rows, "ours-krb", "np-krb", "srvsvc"), find(rows, "ours-krb", "np", "srvsvc"), 1.5)
    cpu_ratio("Kerberos (SPNEGO) TCP bind at privacy vs our NTLM one",
              find(rows, "ours-krb", "tcp-krb", "emsmdb"), find(rows, "ours-krb", "tcp", "emsmdb"), 1.5)
    if growth:
        c = growth[-1]
        met = c["rss_mb"] < 1000 and c["failures"] == 0 and c["smb_held"] + c["tcp_held"] == 2 * c["n"]
        goal = "10000 each: < 1 GB RSS, 0 failures"
        out.append(f"| {c['smb_held']} SMB sessions with a bound pipe + {c['tcp_held']} TCP RPC connections at "
                   f"privacy | {c['rss_mb']:.0f} MB RSS, {c['failures']} failures | - | - | {goal} | "
                   f"{('yes' if met else 'NO') if c['n'] >= 10000 else ('held, ' if met else 'NO, ') + 'below 10000 (quick run)'} |")
    for c in caps:
        ours_mbs, ts_mbs = c["mb"] / c["ours"]["wall"], c["mb"] / c["tshark"]["wall"]
        agree = c["agree"] == c["fields"] and not c["n_only_ours"]
        flat = caps[-1]["ours"]["peak_rss"] < 1.5 * caps[0]["ours"]["peak_rss"]
        ratio = ours_mbs / ts_mbs
        met = ratio >= 5 and agree and flat
        out.append(f"| capture analysis, {c['mb']:.0f} MB | {ours_mbs:.1f} MB/s | {ts_mbs:.1f} MB/s (tshark) "
                   f"| {ratio:.2f}x | >= 5x, 100% agree, flat memory | "
                   f"{'yes' if met else 'NO' + (f' (by {1 - ratio / 5:.0%})' if ratio < 5 else '')} "
                   f"(agree {c['agree']}/{c['fields']}, memory {'flat' if flat else 'grows'}) |")
    if decrypt and len(decrypt) == 2:
        plain, keyed = decrypt
        r = keyed["ours"]["wall"] / plain["ours"]["wall"]
        ts = (f"tshark {plain['mb'] / keyed['tshark']['wall']:.1f} MB/s with the password" if keyed["tshark"]
              else "tshark -")
        out.append(f"| capture analysis with decryption, {keyed['mb']:.0f} MB sealed | "
                   f"{keyed['mb'] / keyed['ours']['wall']:.1f} MB/s | {plain['mb'] / plain['ours']['wall']:.1f} MB/s "
                   f"without keys; {ts} | {r:.2f}x the time | reported | reported |")
    if live:
        r = live["ui-50"] / live["ui-0"]
        out.append(f"| live view: 50 open pages during a logon run | {live['ui-50']:.2f} ms | {live['ui-0']:.2f} ms "
                   f"(no page) | {r:.2f}x | <= 1.10x | {'yes' if r <= 1.10 else f'NO (by {r / 1.10 - 1:.0%})'} |")
    return out


def write_docs(path: str, quick: bool, rows, growth, caps, decrypt, live, versions, notes, started: str,
               command: str = "python bench/run.py") -> None:
    lines = ["# Benchmarks", "",
             f"Regenerated by `{command.strip()}` (see bench/run.py; "
             + ("`--quick`: small counts, 100 MB the largest capture; the full run adds 1 GB and 200 logons "
                "a row" if quick else "the full run") + "). "
             "Every server runs as its own process on 127.0.0.1 and is driven by the same impacket client "
             "(bench/client.py). Server CPU is utime+stime+cutime+cstime of the server's whole process tree from "
             "/proc, sampled before and after, divided by completed logons. Latency is the client's wall time "
             "per logon (impacket's client sets TCP_NODELAY here, so Nagle does not add 40 ms). Compare servers "
             "on CPU; latency includes the client's own Python cost.", "",
             "## Machine and run", "",
             f"- date: {started}", f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{platform.platform()}", f"- Python {platform.python_version()}",
             f"- command: `{command}`", ""]
    lines += ["## Peers and settings", "", "| peer | version | settings |", "|---|---|---|"]
    for name, (ver, settings) in versions.items():
        lines.append(f"| {name} | {ver} | {settings} |")
    lines += ["", "Client: impacket " + peers._pkg_version("impacket") + ", SMB2 dialect 2.1 asked, NTLMv2, "
              "signing as negotiated (not required by either side); TCP logons bind with NTLM at "
              "PKT_PRIVACY (level 6) and seal one call. Encrypted rows (`rpcclient`, `rpcclient-enc`): Samba's "
              "rpcclient `srvinfo` (one process per logon; NetrServerGetInfo 101 over \\srvsvc) on SMB 3.1.1, "
              "`-enc` with `--client-protection=encrypt` and `client smb3 encryption algorithms = AES-128-GCM` "
              "(impacket's SMB3 client implements only AES-128-CCM), the same client for both servers. "
              "Kerberos rows (`np-krb`, `tcp-krb`): impacket with the tickets MIT kinit and kvno put in a ccache "
              "once before the loop (KRB5CCNAME; impacket's own KDC client cannot talk to MIT's KDC), on the "
              "same lab process as the NTLM rows beside them; the TCP bind is SPNEGO at PKT_PRIVACY.", "",
              "## Ratios", ""] + ratio_table(rows, growth, caps, decrypt, live)
    lines += ["", "## Logons", ""] + logon_table(rows)
    if caps:
        lines += ["", "## Capture analysis", "",
                  "The pcap repeats the conversations of the reference captures (mapi.pcap, raw_ntlm_in_smb.pcap, "
                  "dce_rpc_ntlm.pcapng) and of a capture our server records in the run (named-pipe EcDoConnect "
                  "and srvsvc logons, PKT_PRIVACY TCP logons) with fresh addresses and client ports per copy (bench/make_pcap.py). "
                  "Fields compared per frame: NTLM user, auth level of authenticated binds, EcDoConnect DN.", "",
                  "| MB | tool | wall s | CPU s | MB/s | peak RSS MB | fields | agree |", "|---|---|---|---|---|---|---|---|"]
        for c in caps:
            for tool in ("ours", "tshark"):
                t = c[tool]
                lines.append(f"| {c['mb']:.0f} | {tool} | {t['wall']:.2f} | {t['cpu']:.2f} | {c['mb'] / t['wall']:.1f} "
                             f"| {t['peak_rss'] / 1e6:.0f} | {c['fields']} | {c['agree']} |")
    lines += ["", "## How cost grows", ""]
    if growth:
        lines += ["Server CPU per named-pipe logon (srvsvc, sequential) while N SMB sessions (each with "
                  "`\\emsmdb` opened and bound) and N TCP connections (bound with NTLM at PKT_PRIVACY) are held "
                  "open on our server, from several client processes; the open-file limit is raised by the bench:", "",
                  "| N asked | SMB sessions held | TCP connections held | failures | server CPU ms/logon | median ms "
                  "| server RSS MB | RSS KB per held connection |", "|---|---|---|---|---|---|---|---|"]
        for g in growth:
            per = 1000 * g["rss_mb"] / max(1, g["smb_held"] + g["tcp_held"])
            lines.append(f"| {g['n']} | {g['smb_held']} | {g['tcp_held']} | {g['failures']} | {fmt(g['cpu_ms'], 2)} "
                         f"| {fmt(g['median_ms'])} | {g['rss_mb']:.1f} | {per:.0f} |")
        errs = {k: v for g in growth for k, v in g["errors"].items()}
        if errs:
            lines += ["", "Errors while holding: " + json.dumps(errs)]
    if caps:
        lines += ["", "Capture analysis per MB as the capture grows:", "",
                  "| MB | ours CPU s/MB | ours peak RSS MB | tshark CPU s/MB | tshark peak RSS MB |",
                  "|---|---|---|---|---|"]
        for c in caps:
            lines.append(f"| {c['mb']:.0f} | {c['ours']['cpu'] / c['mb']:.3f} | {c['ours']['peak_rss'] / 1e6:.0f} "
                         f"| {c['tshark']['cpu'] / c['mb']:.3f} | {c['tshark']['peak_rss'] / 1e6:.0f} |")
    if decrypt:
        lines += ["", "## Capture analysis with decryption", "",
                  "A capture our server recorded of sealed traffic only (TCP logons at PKT_PRIVACY with NTLM, and "
                  "rpcclient over SMB 3.1.1 encrypted with AES-128-GCM), repeated to size by bench/make_pcap.py; "
                  "`rpcauth explain --format json` with `--password alice:...` (it unseals the stubs and SMB3) and "
                  "without; tshark with `ntlmssp.nt_password` (it unseals NTLM-sealed DCE/RPC; SMB3 needs the "
                  "session keys, which a password alone does not give it) and without.", "",
                  "| MB | setting | ours wall s | ours MB/s | ours peak RSS MB | tshark wall s | tshark MB/s |",
                  "|---|---|---|---|---|---|---|"]
        for d in decrypt:
            o, t = d["ours"], d["tshark"]
            lines.append(f"| {d['mb']:.0f} | {d['label']} | {o['wall']:.2f} | {d['mb'] / o['wall']:.1f} "
                         f"| {o['peak_rss'] / 1e6:.0f} | {fmt(t and t['wall'], 2)} "
                         f"| {fmt(t and d['mb'] / t['wall'])} |")
    if live:
        lines += ["", "## Live view", "",
                  "bench/ui_load.py (run by this command): server CPU per named-pipe logon with the server in "
                  "each setting, median of its rounds.", "", "| setting | server CPU ms/logon | vs ui-0 |",
                  "|---|---|---|"]
        for k, v in live.items():
            lines.append(f"| {k} | {v:.2f} | {v / live['ui-0']:.2f}x |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in STANDING_NOTES + notes]
    text = "\n".join(lines) + "\n"
    # A "Measured by hand" section (figures too slow for this command) survives a rewrite.
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        old = ""
    for marker in ("\n## What the profile showed and what changed", "\n## Measured by hand"):
        if marker in old:
            rest = old[old.index(marker) + 1:]
            nxt = rest.find("\n## ", 1)
            text += "\n" + (rest if nxt < 0 else rest[:nxt + 1])
    with open(path, "w") as f:
        f.write(text)


def raise_open_files(want: int) -> int:
    """Raise RLIMIT_NOFILE for this process and its children (the held-sessions rows need ~2 fds
    per session on each side); as root the hard limit too. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts; about ten minutes")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--skip", action="append", default=[],
                   help="skip a part: logons, encryption, kerberos, growth, capture, decryption, live")
    p.add_argument("--held", help="held-session counts, comma-separated (default 10,100,1000,10000; "
                                  "--quick 10,100,300)")
    a = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server is stopped and every temp dir removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    held_counts = (tuple(int(x) for x in a.held.split(",")) if a.held
                   else (10, 100, 300) if a.quick else (10, 100, 1000, 10000))
    nofile = raise_open_files(4 * held_counts[-1] + 1024)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = ensure_tools()
    n = 80 if a.quick else 200
    limit = 60 if a.quick else 180
    rows: list[dict[str, Any]] = []
    versions: dict[str, tuple[str, str]] = {}

    def record(peer: peers.Peer, r: dict[str, Any]) -> None:
        rows.append(r)
        print(f"  {peer.name:9} {r['mode']:13} {r['call']:6} procs={r['procs']} ok={r['ok']} fail={r['failures']} "
              f"cpu={fmt(r['cpu_ms'], 2)} ms/logon", flush=True)
        if r["ok"] == 0:
            notes.append(f"{peer.name} {r['mode']} {r['call']}: no logon completed: "
                         + "; ".join(f"{k} x{v}" for k, v in r['errors'].items()))

    def run_on(peer: peers.Peer, plan: list[tuple[str, str]], both: bool = True) -> None:
        versions[peer.name] = (peer.version, peer.settings)
        for mode, call in plan:
            for procs in ((1, 2) if both else (1,)):
                r = measure(peer, mode, call, n // procs, procs, limit)
                record(peer, r)
                if r["ok"] == 0:
                    break

    if "logons" not in a.skip:
        print("logons", flush=True)
        with_peer(peers.start_ours, notes, lambda pr: run_on(pr, [("np", "srvsvc"), ("np", "emsmdb"),
                                                                  ("tcp", "emsmdb")]))
        with_peer(peers.start_samba, notes, lambda pr: run_on(pr, [("np", "srvsvc"), ("tcp", "srvsvc")]))
        with_peer(peers.start_impacket, notes, lambda pr: run_on(pr, [("np", "srvsvc")]))
        with_peer(peers.start_scapy_smb, notes, lambda pr: run_on(pr, [("np", "srvsvc")], both=False))
        with_peer(peers.start_scapy_rpc, notes, lambda pr: run_on(pr, [("tcp", "srvsvc")], both=False))

    if "encryption" not in a.skip:
        print("encryption (rpcclient, SMB 3.1.1)", flush=True)
        if not shutil.which("rpcclient"):
            notes.append("rpcclient missing: the SMB3 encryption rows are skipped")
        else:
            ne = n // 2        # one rpcclient process per logon: slower for the client, not the server

            def enc(pr: peers.Peer, encrypt: bool) -> None:
                versions[pr.name] = (pr.version, pr.settings)
                record(pr, measure(pr, "rpcclient", "srvsvc", ne, 1, limit * 2,
                                   extra=("--encrypt",) if encrypt else (),
                                   label="rpcclient-enc" if encrypt else "rpcclient"))
            with_peer(peers.start_ours, notes, lambda pr: enc(pr, False))
            with_peer(lambda: peers.start_ours(policy={"smb_encryption": "required"}, label="ours-enc"), notes,
                      lambda pr: enc(pr, True))
            with_peer(lambda: peers.start_samba(encrypted=True), notes, lambda pr: enc(pr, True))

    if "kerberos" not in a.skip:
        print("kerberos", flush=True)

        def krb(pr: peers.Peer) -> None:
            versions[pr.name] = (pr.version, pr.settings)
            env = peers.kerberos_tickets(pr)           # once, outside every loop
            k = ("--kerberos", "--host", pr.info["kerberos_host"], "--realm", pr.info["realm"])
            for mode, call in (("np", "srvsvc"), ("tcp", "emsmdb")):
                record(pr, measure(pr, mode, call, n, 1, limit, env=env))
                record(pr, measure(pr, mode, call, n, 1, limit, extra=k, env=env, label=f"{mode}-krb"))
        with_peer(lambda: peers.start_ours(kerberos=True, label="ours-krb"), notes, krb)

    growth = []
    if "growth" not in a.skip and "concurrency" not in a.skip:
        print(f"held sessions (open-file limit {nofile})", flush=True)
        for k in held_counts:
            def grow(pr: peers.Peer, k: int = k) -> dict[str, Any]:
                held = hold_and_measure(pr, k, 1 if k <= 10 else 4 if k <= 1000 else 8,
                                        extra=lambda: measure(pr, "np", "srvsvc", 20 if a.quick else 100, 1, limit))
                return {"n": k, **{x: held[x] for x in ("rss_mb", "smb_held", "tcp_held", "failures", "errors")},
                        **{x: held["extra"][x] for x in ("cpu_ms", "median_ms")}}
            g = with_peer(lambda k=k: peers.start_ours(connections=k), notes, grow)
            if g:
                growth.append(g)
                if g["failures"] and nofile < 2 * k + 64:
                    notes.append(f"held {k}: the open-file limit could be raised only to {nofile} (the hard "
                                 f"limit; this machine does not let root raise it) while {2 * k} sockets were "
                                 "asked of the server: the failures may be the limit's")
                print(f"  {k:5} held: smb={g['smb_held']} tcp={g['tcp_held']} fail={g['failures']} "
                      f"cpu={fmt(g['cpu_ms'], 2)} ms/logon rss={g['rss_mb']:.1f} MB", flush=True)

    caps = []
    if "capture" not in a.skip:
        print("capture", flush=True)
        caps = capture_rows(a.quick, notes)
        for c in caps:
            print(f"  {c['mb']:.0f} MB: ours {c['mb'] / c['ours']['wall']:.1f} MB/s, tshark "
                  f"{c['mb'] / c['tshark']['wall']:.1f} MB/s, agree {c['agree']}/{c['fields']}", flush=True)
        versions["tshark"] = (capture_bench.tshark_version(), "-T fields, default preferences, -n")

    decrypt = []
    if "decryption" not in a.skip:
        print("capture with decryption", flush=True)
        decrypt = decryption_rows(a.quick, notes)
        for d in decrypt:
            print(f"  {d['mb']:.0f} MB {d['label']}: ours {d['mb'] / d['ours']['wall']:.1f} MB/s", flush=True)

    live = None
    if "live" not in a.skip:
        print("live view (bench/ui_load.py)", flush=True)
        live = live_view(a.quick, notes)
        print(f"  {live}", flush=True)

    print()
    print("\n".join(ratio_table(rows, growth, caps, decrypt, live)))
    if not a.no_docs:
        write_docs(DOCS, a.quick, rows, growth, caps, decrypt, live, versions, notes, started,
                   command="python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"\nwrote {os.path.relpath(DOCS)}")
    for note in notes:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
