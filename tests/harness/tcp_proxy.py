"""A loopback TCP proxy that lets a test rewrite what a real client sends, message by message:
a man in the middle for downgrade tests. Client-to-server bytes are cut into NetBIOS session
messages and each goes through `rewrite`; server-to-client bytes pass unchanged."""

from __future__ import annotations

import socket
import threading
from typing import Callable

HOST = "127.0.0.1"


class RewritingProxy:
    def __init__(self, target_port: int, rewrite: Callable[[bytes], bytes]) -> None:
        self._target = target_port
        self._rewrite = rewrite
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(8)
        self.port: int = self._sock.getsockname()[1]
        self.rewritten = 0            # messages `rewrite` changed
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> "RewritingProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, self._target), timeout=30)
            threading.Thread(target=self._upstream, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big"):
                    n = 4 + int.from_bytes(buf[1:4], "big")
                    kind, message, buf = buf[:1], buf[4:n], buf[n:]
                    changed = self._rewrite(message)
                    if changed != message:
                        self.rewritten += 1
                    server.sendall(kind + len(changed).to_bytes(3, "big") + changed)
        except OSError:
            pass
        finally:
            server.close()
            client.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()
