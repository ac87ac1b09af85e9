"""`rpcauth serve --live-capture IFACE`: record the real kernel traffic with dumpcap instead of
(or beside) the synthetic per-connection captures. Needs root and Wireshark's dumpcap or tshark;
the capture filter keeps it to the lab's own ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess


class LiveCaptureError(RuntimeError):
    pass


class LiveCapture:
    def __init__(self, iface: str, ports: list[int], path: str) -> None:
        tool = shutil.which("dumpcap") or shutil.which("tshark")
        if tool is None:
            raise LiveCaptureError("--live-capture needs dumpcap or tshark (Debian package tshark)")
        if os.geteuid() != 0:
            raise LiveCaptureError("--live-capture needs root to open the interface")
        if not ports:
            raise LiveCaptureError("no listener to capture")
        self.path = path
        bpf = " or ".join(f"tcp port {p}" for p in sorted(set(ports)))
        self._proc = subprocess.Popen([tool, "-q", "-i", iface, "-f", bpf, "-w", path],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)   # dumpcap finishes the file on SIGINT
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
