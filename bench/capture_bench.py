"""Capture analysis, side by side: `rpcauth explain --format json` against `tshark -T fields`.

Both extract the same three fields, keyed by frame number:
  user   NTLM AUTHENTICATE user name (ntlmssp.auth.username / our ntlm.authenticate event)
  level  auth level of each authenticated bind or alter_context (dcerpc.auth_level / our binds)
  dn     EcDoConnect szUserDN (mapi.EcDoConnect.name / our emsmdb.connect_request)
and the two sets must be equal. Each tool runs as its own process; its CPU and peak RSS come
from wait4()'s rusage, its speed is file MB per wall second.

  python bench/capture_bench.py FILE.pcap
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

LEVELS = {"none": 1, "connect": 2, "call": 3, "packet": 4, "integrity": 5, "privacy": 6}
TSHARK_FILTER = ("ntlmssp.messagetype == 3 || dcerpc.pkt_type == 11 || dcerpc.pkt_type == 14 "
                 "|| mapi.EcDoConnect.name")
TSHARK_FIELDS = ["frame.number", "ntlmssp.auth.username", "dcerpc.pkt_type", "dcerpc.auth_level",
                 "mapi.EcDoConnect.name"]
LIMIT_SECONDS = 900


def timed(cmd: list[str], out_path: str) -> dict[str, float]:
    """Run cmd with stdout to out_path; wall seconds, CPU seconds and peak RSS of the child."""
    t0 = time.perf_counter()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + LIMIT_SECONDS
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime, "peak_rss": ru.ru_maxrss * 1024,
            "rc": proc.returncode}


def ours_fields(path: str) -> set[tuple[int, str, str]]:
    with open(path) as f:
        doc = json.load(f)
    out: set[tuple[int, str, str]] = set()
    for conn in doc["connections"]:
        for ev in conn.get("events", ()):
            if ev["kind"] == "ntlm.authenticate" and ev.get("user"):
                out.add((ev["frame"], "user", ev["user"]))
            elif ev["kind"] == "emsmdb.connect_request" and ev.get("call") == "EcDoConnect" and ev.get("user_dn"):
                out.add((ev["frame"], "dn", ev["user_dn"]))
        for b in conn.get("binds", ()):
            if b.get("auth_type", "none") != "none" and b.get("auth_level") in LEVELS:
                out.add((b["frame"], "level", str(LEVELS[b["auth_level"]])))
    return out


def tshark_fields(path: str) -> set[tuple[int, str, str]]:
    out: set[tuple[int, str, str]] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 5 or not cols[0].isdigit():
                continue
            frame = int(cols[0])
            for user in filter(None, cols[1].split(",")):
                out.add((frame, "user", user))
            types, levels = cols[2].split(","), cols[3].split(",")
            # levels are listed only for PDUs that carry a verifier; binds (11) and alter_contexts (14)
            if levels != [""] and any(t in ("11", "14") for t in types):
                for lv in levels:
                    out.add((frame, "level", lv))
            for dn in filter(None, cols[4].split(",")):
                out.add((frame, "dn", dn))
    return out


def compare(pcap: str, keep: str | None = None) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="rpcauth-capbench-")
    try:
        ours_out, tshark_out = os.path.join(tmp, "ours.json"), os.path.join(tmp, "tshark.tsv")
        rpcauth = [sys.executable, "-m", "emulator.cli", "explain", pcap, "--format", "json"]
        tshark = ["tshark", "-n", "-r", pcap, "-Y", TSHARK_FILTER, "-T", "fields", "-E", "separator=/t",
                  "-E", "aggregator=,", *sum((["-e", f] for f in TSHARK_FIELDS), [])]
        r_ours = timed(rpcauth, ours_out)
        r_tshark = timed(tshark, tshark_out)
        a, b = ours_fields(ours_out), tshark_fields(tshark_out)
        if keep:
            shutil.copy(ours_out, keep + ".ours.json")
            shutil.copy(tshark_out, keep + ".tshark.tsv")
        mb = os.path.getsize(pcap) / 1e6
        return {"mb": mb, "ours": r_ours, "tshark": r_tshark, "fields": len(b), "agree": len(a & b),
                "only_ours": sorted(a - b)[:10], "only_tshark": sorted(b - a)[:10],
                "n_only_ours": len(a - b), "n_only_tshark": len(b - a),
                "by_kind": {k: sum(1 for x in b if x[1] == k) for k in ("user", "level", "dn")}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tshark_version() -> str:
    try:
        return subprocess.run(["tshark", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    print(json.dumps(compare(sys.argv[1]), indent=1, default=str))
