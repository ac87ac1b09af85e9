"""A blocking loopback socket with exact reads, under the raw DCE/RPC and SMB clients."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


class Wire:
    """A blocking loopback socket with exact reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def peer_closed(self) -> bool:
        """True once the server has closed its side (EOF or reset, with nothing more to read)."""
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
