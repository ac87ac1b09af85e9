"""Does the live view slow the listeners? Server CPU per logon from /proc, the same logons
driven by bench/client.py, with the server in four settings:

  plain       rpcauth serve                       (no page, no capture)
  captures    rpcauth serve --captures DIR        (one pcap per connection, as the page records)
  ui-0        rpcauth serve --ui 127.0.0.1:0      (the page's server, nobody watching)
  ui-50       the same with 50 pages connected    (50 Server-Sent Events streams that accept gzip
                                                   as browsers do, read and discarded)

Each setting runs ROUNDS times in turn (interleaved, so drift on a shared machine spreads over all
of them) and the median is reported. It also times the pcap recorder per frame: the struct
writer the server uses against building the same frames with scapy as it used to.

By default the logons run back to back (a flood, where the page sends counts instead of
ladders); with --paced each logon is its own client process with a pause after it, a class's
pace, and every page is sent every ladder.

  python bench/ui_load.py [--logons 200] [--rounds 3] [--mode np|tcp] [--pages 50] [--paced]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import procstat  # noqa: E402

MAX_WAIT = 60.0


def start_server(tmp: str, setting: str) -> tuple[subprocess.Popen, dict]:
    ready = os.path.join(tmp, f"ready-{setting}.json")
    if os.path.exists(ready):
        os.unlink(ready)
    cmd = [sys.executable, "-m", "emulator.cli", "serve", "--smb-port", "0", "--epm-port", "0",
           "--emsmdb-port", "0", "--ready-file", ready]
    if setting == "captures":
        cmd += ["--captures", os.path.join(tmp, "captures")]
    if setting.startswith("ui"):
        cmd += ["--ui", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + MAX_WAIT
    while not os.path.exists(ready):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server ({setting}) did not start")
        time.sleep(0.05)
    with open(ready) as fh:
        return proc, json.load(fh)


class Pages:
    """N Server-Sent Events streams held open, everything they receive read and dropped."""

    def __init__(self, url: str, n: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sel = selectors.DefaultSelector()
        self.received = 0
        self.socks = []
        for _ in range(n):
            s = socket.create_connection((parts.hostname, parts.port))
            # As a browser asks: it accepts gzip, so the server sends the stream compressed.
            s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Accept-Encoding: gzip, deflate\r\n\r\n".encode())
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.append(s)
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.2):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(key.fileobj)
                self.received += len(data)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        for s in self.socks:
            s.close()


PACE_SECONDS = 0.3


def drive(mode: str, info: dict, count: int, paced: bool = False) -> int:
    port = info["smb"] if mode == "np" else info["emsmdb"]
    cmd = [sys.executable, os.path.join(HERE, "client.py"), mode, "--port", str(port), "--call", "emsmdb",
           "--max-seconds", "300"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    if not paced:
        out = subprocess.run(cmd + ["--count", str(count)], capture_output=True, text=True, timeout=600, env=env)
        return json.loads(out.stdout)["ok"]
    ok = 0
    for _ in range(count):
        out = subprocess.run(cmd + ["--count", "1"], capture_output=True, text=True, timeout=120, env=env)
        ok += json.loads(out.stdout)["ok"]
        time.sleep(PACE_SECONDS)
    return ok


def one_round(tmp: str, setting: str, mode: str, count: int, pages: int, paced: bool) -> dict:
    proc, info = start_server(tmp, setting)
    watchers = None
    try:
        drive(mode, info, 5)                                  # warm up: imports, first sessions
        if setting == "ui-50":
            watchers = Pages(info["ui"], pages)
            time.sleep(1.0)
        before = procstat.cpu_seconds(proc.pid)
        ok = drive(mode, info, count, paced)
        after = procstat.cpu_seconds(proc.pid)
        return {"setting": setting, "ok": ok, "cpu_ms": 1000 * (after - before) / ok if ok else None,
                "page_bytes": watchers.received if watchers else 0}
    finally:
        if watchers is not None:
            watchers.close()
        proc.terminate()
        proc.wait(30)


def recorder_cost(frames: int = 2000) -> dict:
    """Microseconds per frame: the struct recorder, and scapy building and writing the same frames."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapWriter

    from emulator.capture.recorder import CaptureWriter

    tmp = tempfile.mkdtemp(prefix="rpcauth-bench-rec-")
    payload = os.urandom(300)
    try:
        t0 = time.process_time()
        with CaptureWriter(os.path.join(tmp, "a.pcap")) as w:
            s = w.stream(("127.0.0.1", 50000), ("127.0.0.1", 445))
            for _ in range(frames // 2):
                s.client_data(payload)                         # one data frame and one ACK each
        ours = (time.process_time() - t0) / frames * 1e6
        t0 = time.process_time()
        pw = PcapWriter(os.path.join(tmp, "b.pcap"), linktype=1, sync=True)
        for i in range(frames):
            frame = (Ether(src="02:00:7f:00:00:01", dst="02:00:7f:00:00:01")
                     / IP(src="127.0.0.1", dst="127.0.0.1", id=i & 0xFFFF, flags="DF", ttl=128)
                     / TCP(sport=50000, dport=445, seq=i, ack=i, flags=0x18, window=65535) / payload)
            pw.write_packet(bytes(frame), sec=1, usec=i)
            pw.flush()
        pw.close()
        scapy = (time.process_time() - t0) / frames * 1e6
        return {"struct_us": ours, "scapy_us": scapy}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logons", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", choices=["np", "tcp"], default="np")
    p.add_argument("--pages", type=int, default=50)
    p.add_argument("--paced", action="store_true", help="one client process per logon, then a pause")
    a = p.parse_args(argv)
    rec = recorder_cost()
    print(f"recorder: {rec['struct_us']:.1f} us/frame (struct), {rec['scapy_us']:.1f} us/frame (scapy)", flush=True)
    settings = ["plain", "captures", "ui-0", "ui-50"]
    results: dict[str, list[dict]] = {s: [] for s in settings}
    tmp = tempfile.mkdtemp(prefix="rpcauth-bench-ui-")
    try:
        for r in range(a.rounds):
            for s in settings:
                res = one_round(tmp, s, a.mode, a.logons, a.pages, a.paced)
                results[s].append(res)
                print(f"round {r + 1} {s:9} ok={res['ok']} cpu={res['cpu_ms']:.2f} ms/logon"
                      + (f" pages received {res['page_bytes']} bytes" if res["page_bytes"] else ""), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {s: statistics.median(x["cpu_ms"] for x in results[s] if x["cpu_ms"]) for s in settings}
    print(f"\n| setting | server CPU ms/logon (median of {a.rounds}) | vs ui-0 |")
    print("|---|---|---|")
    for s in settings:
        print(f"| {s} | {med[s]:.2f} | {med[s] / med['ui-0']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
