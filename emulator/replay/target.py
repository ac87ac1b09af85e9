"""Where replay sends: a running emulator (its ready file) or one started here, and where it
reads what that server did (its event stream).

Replay connects to loopback and nowhere else, whatever the capture's addresses and whatever a
ready file says: `loopback_host` is the only way an address gets here, and `connect` checks the
socket's peer once more after connecting.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

LAB_PORTS = ("smb", "epm", "emsmdb")


class TargetError(Exception):
    """The server to replay against cannot be used (bad ready file, not loopback, ...)."""


def loopback_host(host: str) -> str:
    """`host` when it is a loopback address literal; TargetError otherwise."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise TargetError(f"{host!r} is not an IP address; replay connects to loopback only") from None
    if not addr.is_loopback:
        raise TargetError(f"{host} is not a loopback address; replay never connects anywhere else")
    return str(addr)


def connect(host: str, port: int, timeout: float) -> socket.socket:
    host = loopback_host(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        peer = sock.getpeername()[0]
        if not ipaddress.ip_address(peer).is_loopback:
            raise TargetError(f"connected to {peer}, which is not loopback")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class Target:
    """A lab's listeners and its events. Subclasses say where both come from."""
    host = "127.0.0.1"
    ports: dict[str, int]
    description = ""
    seed: int | None = None

    def records(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    has_events = True

    def conn_for(self, local_port: int, wait: float = 2.0) -> str | None:
        """The server's id for our connection from local port `local_port` (its conn.open
        names us as peer), waiting up to `wait` seconds for the event to be written."""
        if not self.has_events:
            return None
        want = {f"{self.host}:{local_port}", f"[{self.host}]:{local_port}"}
        deadline = time.monotonic() + wait
        while True:
            for r in self.records():
                if r.get("kind") == "conn.open" and r.get("peer") in want:
                    return str(r.get("conn"))
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def events_of(self, conn: str | None) -> list[dict[str, Any]]:
        if conn is None:
            return []
        return [r for r in self.records() if r.get("conn") == conn]

    def wait_closed(self, conn: str | None, wait: float = 2.0) -> None:
        """Until the server has written conn.close for `conn` (so its events are complete)."""
        if conn is None:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(r.get("kind") == "conn.close" for r in self.events_of(conn)):
                return
            time.sleep(0.02)

    def close(self) -> None:
        pass


class EmbeddedTarget(Target):
    """A lab started in this process (`emulator.lab.Lab`), on ephemeral loopback ports."""

    def __init__(self, config: Any = None, seed: int | None = None, config_name: str | None = None) -> None:
        from ..lab import Lab

        # A seeded lab's clock advances with every event and every frame it records, and its
        # NTLM CHALLENGE carries that clock. Seeded labs are run to record reproducible
        # captures, so this one records too (into a scratch directory): then a capture made by
        # such a lab meets the same challenge *and* the same timestamp here.
        self._scratch = tempfile.mkdtemp(prefix="rpcauth-replay-") if seed is not None else None
        self.lab = Lab(config, seed=seed, captures=self._scratch)
        try:
            self.lab.start()
        except BaseException:
            self._drop_scratch()
            raise
        self.ports = dict(self.lab.ports)
        self.host = loopback_host(self.lab.host)
        self.seed = seed
        self.description = (f"an embedded lab ({config_name or 'the default lab'}"
                            + (f", seed {seed}" if seed is not None else "") + ")")

    def records(self) -> list[dict[str, Any]]:
        return self.lab.records()

    def close(self) -> None:
        self.lab.stop()
        self._drop_scratch()

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


class ServedTarget(Target):
    """A lab started with `rpcauth serve --ready-file FILE [--events EVENTS]`."""

    def __init__(self, ready_file: str, events_file: str | None = None) -> None:
        try:
            with open(ready_file, encoding="utf-8") as fh:
                info = json.load(fh)
        except OSError as exc:
            raise TargetError(f"cannot read ready file {ready_file}: {exc.strerror or exc}") from None
        except ValueError:
            raise TargetError(f"ready file {ready_file} is not JSON") from None
        if not isinstance(info, dict):
            raise TargetError(f"ready file {ready_file} is not a JSON object")
        self.host = loopback_host(str(info.get("host", "")))
        self.ports = {}
        for name in LAB_PORTS:
            port = info.get(name)
            if port is None:
                continue
            if not isinstance(port, int) or not 0 < port < 65536:
                raise TargetError(f"ready file {ready_file}: bad {name} port {port!r}")
            self.ports[name] = port
        if not self.ports:
            raise TargetError(f"ready file {ready_file} names no listener")
        self.events_file = events_file
        self.has_events = events_file is not None
        self._lines: list[dict[str, Any]] = []
        self._offset = 0
        self.description = f"the lab served on {self.host} (ready file {ready_file})"

    def records(self) -> list[dict[str, Any]]:
        """Every complete line of the events file so far (read incrementally)."""
        if not self.events_file or not os.path.exists(self.events_file):
            return self._lines
        with open(self.events_file, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return self._lines
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                self._lines.append(rec)
        self._offset += end + 1
        return self._lines
