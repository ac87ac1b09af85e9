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
          user: str = peers.USER, password: str = peers.PASSWORD) -> dict[str, Any]:
    cmd = [sys.executable, CLIENT, mode, "--port", str(port), "--call", call, "--count", str(count),
           "--procs", str(procs), "--max-seconds", str(max_seconds), "--user", user, "--password", password]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds * 2 + 120)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": 0, "failures": count * procs, "errors": {"client crashed": r.stderr[-300:]},
                "latencies": [], "wall": 0.0}


def measure(peer: peers.Peer, mode: str, call: str, count: int, procs: int, max_seconds: float) -> dict[str, Any]:
    port = peer.ports["smb" if mode == "np" else "tcp"]
    drive(mode, port, call, 3, 1, 30)                               # warm up: imports, first fork, caches
    before = sum(procstat.cpu_seconds(p) for p in peer.pids())
    r = drive(mode, port, call, count, procs, max_seconds)
    time.sleep(0.3)                                                 # let the server finish closing
    after = sum(procstat.cpu_seconds(p) for p in peer.pids())
    lat = sorted(r["latencies"])
    ok = r["ok"]
    return {"peer": peer.name, "mode": mode, "call": call, "procs": procs, "ok": ok, "failures": r["failures"],
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
                                 "--count", str(per), "--max-seconds", "240", "--hold-seconds", "300"],
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


def capture_rows(quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    if not shutil.which("tshark"):
        notes.append("tshark missing: capture analysis skipped")
        return []
    sizes = [10, 30] if quick else [10, 100]
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


def ratio_table(rows, conc, caps) -> list[str]:
    out = ["| target | ours | peer | ratio | goal | met |", "|---|---|---|---|---|---|"]

    def cpu_ratio(label, ours, peer, goal):
        if ours and peer and ours["cpu_ms"] and peer["cpu_ms"]:
            ratio = ours["cpu_ms"] / peer["cpu_ms"]
            out.append(f"| {label} | {ours['cpu_ms']:.2f} ms | {peer['cpu_ms']:.2f} ms ({peer['peer']}) "
                       f"| {ratio:.2f}x | <= {goal}x | {'yes' if ratio <= goal and not ours['failures'] else 'NO'} |")
        else:
            out.append(f"| {label} | - | - | - | <= {goal}x | not measured |")

    cpu_ratio("named-pipe logon, server CPU vs smbd", find(rows, "ours", "np", "srvsvc"),
              find(rows, "samba", "np", "srvsvc"), 0.5)
    cpu_ratio("named-pipe logon (EcDoConnect) vs smbd srvsvc", find(rows, "ours", "np", "emsmdb"),
              find(rows, "samba", "np", "srvsvc"), 0.5)
    cpu_ratio("named-pipe logon vs impacket", find(rows, "ours", "np", "srvsvc"),
              find(rows, "impacket", "np", "srvsvc"), 0.25)
    cpu_ratio("TCP PKT_PRIVACY logon vs samba-dcerpcd", find(rows, "ours", "tcp", "emsmdb"),
              find(rows, "samba", "tcp", "srvsvc"), 1.0)
    if conc:
        c = conc
        met = c["rss_mb"] < 150 and c["failures"] == 0 and c["smb_held"] + c["tcp_held"] == 2 * c["n"]
        out.append(f"| {c['n']} SMB sessions + {c['n']} RPC connections | {c['rss_mb']:.0f} MB RSS, "
                   f"{c['failures']} failures | - | - | < 150 MB, 0 failures | {'yes' if met else 'NO'} |")
    if caps:
        c = caps[-1]
        ours_mbs, ts_mbs = c["mb"] / c["ours"]["wall"], c["mb"] / c["tshark"]["wall"]
        agree = c["agree"] == c["fields"] and not c["n_only_ours"]
        flat = len(caps) < 2 or caps[-1]["ours"]["peak_rss"] < 1.5 * caps[0]["ours"]["peak_rss"]
        ratio = ours_mbs / ts_mbs
        out.append(f"| capture analysis, {c['mb']:.0f} MB | {ours_mbs:.1f} MB/s | {ts_mbs:.1f} MB/s (tshark) "
                   f"| {ratio:.2f}x | >= 2x, 100% agree, flat memory | "
                   f"{'yes' if ratio >= 2 and agree and flat else 'NO'} (agree {c['agree']}/{c['fields']}, "
                   f"memory {'flat' if flat else 'grows'}) |")
    return out


def write_docs(path: str, quick: bool, rows, conc, growth, caps, versions, notes, started: str) -> None:
    lines = ["# Benchmarks", "",
             "Regenerated by `python bench/run.py" + (" --quick" if quick else "") + "` (see bench/run.py). "
             "Every server runs as its own process on 127.0.0.1 and is driven by the same impacket client "
             "(bench/client.py). Server CPU is utime+stime+cutime+cstime of the server's whole process tree from "
             "/proc, sampled before and after, divided by completed logons. Latency is the client's wall time "
             "per logon (impacket's client sets TCP_NODELAY here, so Nagle does not add 40 ms). Compare servers "
             "on CPU; latency includes the client's own Python cost.", "",
             "## Machine and run", "",
             f"- date: {started}", f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{platform.platform()}", f"- Python {platform.python_version()}",
             f"- command: `python bench/run.py{' --quick' if quick else ''}`", ""]
    lines += ["## Peers and settings", "", "| peer | version | settings |", "|---|---|---|"]
    for name, (ver, settings) in versions.items():
        lines.append(f"| {name} | {ver} | {settings} |")
    lines += ["", "Client: impacket " + peers._pkg_version("impacket") + ", SMB2 dialect 2.1 asked, NTLMv2, "
              "signing as negotiated (not required by either side); TCP logons bind with NTLM at "
              "PKT_PRIVACY (level 6) and seal one call.", "",
              "## Ratios", ""] + ratio_table(rows, conc, caps)
    lines += ["", "## Logons", ""] + logon_table(rows)
    if conc:
        lines += ["", "## Concurrency (ours)", "",
                  f"{conc['n']} SMB sessions held open, each with `\\emsmdb` opened and bound, plus {conc['n']} TCP "
                  f"connections bound with NTLM at PKT_PRIVACY, from {conc['procs']} client processes.", "",
                  "| SMB sessions held | RPC connections held | failures | server RSS MB |", "|---|---|---|---|",
                  f"| {conc['smb_held']} | {conc['tcp_held']} | {conc['failures']} | {conc['rss_mb']:.1f} |"]
        if conc["errors"]:
            lines += ["", "Errors: " + json.dumps(conc["errors"])]
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
        lines += ["Server CPU per named-pipe logon (srvsvc, sequential) while N other SMB sessions and N TCP "
                  "connections are held open on our server:", "",
                  "| sessions held | server CPU ms/logon | median ms | server RSS MB |", "|---|---|---|---|"]
        for g in growth:
            lines.append(f"| {g['n']} | {fmt(g['cpu_ms'], 2)} | {fmt(g['median_ms'])} | {g['rss_mb']:.1f} |")
    if caps:
        lines += ["", "Capture analysis per MB as the capture grows:", "",
                  "| MB | ours CPU s/MB | ours peak RSS MB | tshark CPU s/MB | tshark peak RSS MB |",
                  "|---|---|---|---|---|"]
        for c in caps:
            lines.append(f"| {c['mb']:.0f} | {c['ours']['cpu'] / c['mb']:.3f} | {c['ours']['peak_rss'] / 1e6:.0f} "
                         f"| {c['tshark']['cpu'] / c['mb']:.3f} | {c['tshark']['peak_rss'] / 1e6:.0f} |")
        lines += ["", "1,000 MB is not run by the bench command: it would take longer than the run's time box; "
                  "see \"Measured by hand\" below, if present."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in STANDING_NOTES + notes]
    text = "\n".join(lines) + "\n"
    # A "Measured by hand" section (figures too slow for this command) survives a rewrite.
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        old = ""
    marker = "\n## Measured by hand"
    if marker in old:
        text += old[old.index(marker):]
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts; about three minutes")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--skip", action="append", default=[], help="skip a part: logons, concurrency, growth, capture")
    a = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server is stopped and every temp dir removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = ensure_tools()
    n = 40 if a.quick else 200
    limit = 60 if a.quick else 180
    rows: list[dict[str, Any]] = []
    versions: dict[str, tuple[str, str]] = {}

    def run_on(peer: peers.Peer, plan: list[tuple[str, str]]) -> None:
        versions[peer.name] = (peer.version, peer.settings)
        for mode, call in plan:
            for procs in (1, 2):
                r = measure(peer, mode, call, n // procs, procs, limit)
                rows.append(r)
                print(f"  {peer.name:9} {mode} {call:6} procs={procs} ok={r['ok']} fail={r['failures']} "
                      f"cpu={fmt(r['cpu_ms'], 2)} ms/logon", flush=True)
                if r["ok"] == 0:
                    notes.append(f"{peer.name} {mode} {call}: no logon completed: "
                                 + "; ".join(f"{k} x{v}" for k, v in r['errors'].items()))
                    break

    if "logons" not in a.skip:
        print("logons", flush=True)
        with_peer(peers.start_ours, notes, lambda pr: run_on(pr, [("np", "srvsvc"), ("np", "emsmdb"),
                                                                  ("tcp", "emsmdb")]))
        with_peer(peers.start_samba, notes, lambda pr: run_on(pr, [("np", "srvsvc"), ("tcp", "srvsvc")]))
        with_peer(peers.start_impacket, notes, lambda pr: run_on(pr, [("np", "srvsvc")]))
        with_peer(peers.start_scapy_smb, notes, lambda pr: run_on(pr, [("np", "srvsvc")]))
        with_peer(peers.start_scapy_rpc, notes, lambda pr: run_on(pr, [("tcp", "srvsvc")]))

    conc = None
    if "concurrency" not in a.skip:
        print("concurrency", flush=True)
        nc = 1000
        conc = with_peer(peers.start_ours, notes, lambda pr: hold_and_measure(pr, nc, 4))
        if conc:
            conc.update(n=nc, procs=4)
            print(f"  held smb={conc['smb_held']} tcp={conc['tcp_held']} fail={conc['failures']} "
                  f"rss={conc['rss_mb']:.1f} MB", flush=True)

    growth = []
    if "growth" not in a.skip:
        print("growth", flush=True)
        for k in (10, 100, 1000):
            def grow(pr: peers.Peer, k: int = k) -> dict[str, Any]:
                held = hold_and_measure(pr, k, 2 if k > 10 else 1,
                                        extra=lambda: measure(pr, "np", "srvsvc", 20 if a.quick else 100, 1, limit))
                return {"n": k, "rss_mb": held["rss_mb"], **{x: held["extra"][x] for x in ("cpu_ms", "median_ms")}}
            g = with_peer(peers.start_ours, notes, grow)
            if g:
                growth.append(g)
                print(f"  {k:5} held: cpu={fmt(g['cpu_ms'], 2)} ms/logon rss={g['rss_mb']:.1f} MB", flush=True)

    caps = []
    if "capture" not in a.skip:
        print("capture", flush=True)
        caps = capture_rows(a.quick, notes)
        for c in caps:
            print(f"  {c['mb']:.0f} MB: ours {c['mb'] / c['ours']['wall']:.1f} MB/s, tshark "
                  f"{c['mb'] / c['tshark']['wall']:.1f} MB/s, agree {c['agree']}/{c['fields']}", flush=True)
        versions["tshark"] = (capture_bench.tshark_version(), "-T fields, default preferences, -n")

    print()
    print("\n".join(ratio_table(rows, conc, caps)))
    if not a.no_docs:
        write_docs(DOCS, a.quick, rows, conc, growth, caps, versions, notes, started)
        print(f"\nwrote {os.path.relpath(DOCS)}")
    for note in notes:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
