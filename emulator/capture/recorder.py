"""Write the byte streams a server really exchanged as a pcap file that Wireshark can reassemble.

Frames are synthetic Ethernet/IPv4/TCP wrapped around the real payloads: a three-way handshake,
segments no larger than the MSS with consistent sequence and acknowledgement numbers (RFC 793
section 3.3), an ACK from the receiver after every burst, and a FIN exchange at close. Scapy
builds the frames (so IP and TCP checksums are correct) and writes the file; no raw socket and
no root are needed. With an injected clock the output is byte-identical for identical input.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Callable

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapWriter

_DLT_EN10MB = 1
_SYN, _ACK, _PSH, _FIN = 0x02, 0x10, 0x08, 0x01


def _mac_for(ip: str) -> str:
    # A locally administered MAC derived from the address, so each host keeps one MAC and the
    # file does not depend on the machine that wrote it.
    octets = [int(x) for x in ip.split(".")]
    return "02:00:" + ":".join(f"{o:02x}" for o in octets)


def _initial_sequence(client: tuple[str, int], server: tuple[str, int], side: str) -> int:
    # Deterministic ISNs: a run with the same endpoints gives the same file.
    return zlib.crc32(f"{side}|{client}|{server}".encode()) & 0x7FFFFFFF


class CaptureWriter:
    """One pcap file that may hold several TCP streams. Thread-safe: every frame is written
    under one lock, and the file is flushed after each frame so it is valid at any moment."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time, mss: int = 1460,
                 linktype: str = "ether") -> None:
        if linktype != "ether":
            raise ValueError(f"unsupported linktype {linktype!r}; only 'ether' is written")
        if not 1 <= mss <= 65495:
            raise ValueError("mss must be between 1 and 65495")
        self.path = path
        self.mss = mss
        self._clock = clock
        self._lock = threading.Lock()
        self._ip_id = 0
        self._writer: PcapWriter | None = PcapWriter(path, linktype=_DLT_EN10MB, sync=True)
        # Write the global header now: an empty capture is still a valid file.
        self._writer.write_header(None)
        self._writer.flush()

    def stream(self, client: tuple[str, int], server: tuple[str, int]) -> "StreamRecorder":
        rec = StreamRecorder(self, client, server)
        rec._handshake()
        return rec

    def _emit(self, src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int, flags: int,
              payload: bytes = b"") -> None:
        with self._lock:
            if self._writer is None:
                raise ValueError(f"capture {self.path} is closed")
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            frame = (Ether(src=_mac_for(src[0]), dst=_mac_for(dst[0]))
                     / IP(src=src[0], dst=dst[0], id=self._ip_id, flags="DF", ttl=128)
                     / TCP(sport=src[1], dport=dst[1], seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF,
                           flags=flags, window=65535)
                     / payload)
            stamp = self._clock()
            sec = int(stamp)
            usec = int(round((stamp - sec) * 1_000_000))
            if usec >= 1_000_000:
                sec, usec = sec + 1, usec - 1_000_000
            self._writer.write_packet(bytes(frame), sec=sec, usec=usec)
            self._writer.flush()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
                self._writer.close()
                self._writer = None

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamRecorder:
    """One TCP connection inside a CaptureWriter. `client_data` and `server_data` take the bytes
    exactly as they crossed the real socket."""

    def __init__(self, writer: CaptureWriter, client: tuple[str, int], server: tuple[str, int]) -> None:
        self._w = writer
        self.client, self.server = client, server
        self._lock = threading.Lock()
        # Next sequence number each side will send.
        self._cseq = _initial_sequence(client, server, "c")
        self._sseq = _initial_sequence(client, server, "s")
        self._closed = False

    def _handshake(self) -> None:
        with self._lock:
            w, c, s = self._w, self.client, self.server
            w._emit(c, s, self._cseq, 0, _SYN)
            self._cseq += 1
            w._emit(s, c, self._sseq, self._cseq, _SYN | _ACK)
            self._sseq += 1
            w._emit(c, s, self._cseq, self._sseq, _ACK)

    def _send(self, from_client: bool, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if self._closed:
                raise ValueError("stream is closed")
            w, mss = self._w, self._w.mss
            src, dst = (self.client, self.server) if from_client else (self.server, self.client)
            for start in range(0, len(data), mss):
                chunk = data[start:start + mss]
                last = start + mss >= len(data)
                flags = _ACK | (_PSH if last else 0)
                if from_client:
                    w._emit(src, dst, self._cseq, self._sseq, flags, chunk)
                    self._cseq += len(chunk)
                else:
                    w._emit(src, dst, self._sseq, self._cseq, flags, chunk)
                    self._sseq += len(chunk)
            # The receiver acknowledges the burst, as a real stack would after a delayed-ACK
            # interval; Wireshark then sees no unacknowledged data.
            if from_client:
                w._emit(dst, src, self._sseq, self._cseq, _ACK)
            else:
                w._emit(dst, src, self._cseq, self._sseq, _ACK)

    def client_data(self, data: bytes) -> None:
        self._send(True, bytes(data))

    def server_data(self, data: bytes) -> None:
        self._send(False, bytes(data))

    def close(self, by: str = "client") -> None:
        """FIN from `by` ("client" or "server"), FIN/ACK back, final ACK. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            w, c, s = self._w, self.client, self.server
            if by == "server":
                w._emit(s, c, self._sseq, self._cseq, _FIN | _ACK)
                self._sseq += 1
                w._emit(c, s, self._cseq, self._sseq, _FIN | _ACK)
                self._cseq += 1
                w._emit(s, c, self._sseq, self._cseq, _ACK)
            else:
                w._emit(c, s, self._cseq, self._sseq, _FIN | _ACK)
                self._cseq += 1
                w._emit(s, c, self._sseq, self._cseq, _FIN | _ACK)
                self._sseq += 1
                w._emit(c, s, self._cseq, self._sseq, _ACK)
