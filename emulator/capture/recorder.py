"""Write the byte streams a server really exchanged as a pcap file that Wireshark can reassemble.

Frames are synthetic Ethernet/IPv4/TCP wrapped around the real payloads: a three-way handshake,
segments no larger than the MSS with consistent sequence and acknowledgement numbers (RFC 793
section 3.3), an ACK from the receiver after every burst, and a FIN exchange at close. Headers
are packed with struct and checksummed here (RFC 791, RFC 793, RFC 1071); the bytes are the
ones scapy wrote for the same frames (the tests compare them), at a fraction of the cost, since
a listener records every frame of every connection while it serves. No raw socket and no root
are needed. With an injected clock the output is byte-identical for identical input.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
import zlib
from array import array
from functools import lru_cache
from typing import BinaryIO, Callable

_DLT_EN10MB = 1
_SYN, _ACK, _PSH, _FIN = 0x02, 0x10, 0x08, 0x01
# pcap global header (libpcap format): magic, version 2.4, GMT offset, accuracy, snaplen, link type.
_GLOBAL_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, _DLT_EN10MB)
_RECORD = struct.Struct("<IIII")           # ts_sec, ts_usec, incl_len, orig_len
_IPV4 = struct.Struct("!BBHHHBBH4s4s")     # version/IHL .. destination, checksum at offset 10
_TCP = struct.Struct("!HHIIBBHHH")         # ports, seq, ack, data offset, flags, window, checksum, urgent
_ETHERTYPE_IPV4 = b"\x08\x00"
_IP_DF = 0x4000
_TTL = 128
_WINDOW = 65535


def _mac_for(ip: str) -> str:
    # A locally administered MAC derived from the address, so each host keeps one MAC and the
    # file does not depend on the machine that wrote it.
    octets = [int(x) for x in ip.split(".")]
    return "02:00:" + ":".join(f"{o:02x}" for o in octets)


@lru_cache(maxsize=1024)
def _mac_bytes(ip: str) -> bytes:
    return bytes.fromhex(_mac_for(ip).replace(":", ""))


@lru_cache(maxsize=1024)
def _ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of 16-bit big-endian words."""
    if len(data) % 2:
        data += b"\0"
    words = array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet_ipv4_tcp(src: tuple[str, int], dst: tuple[str, int], ip_id: int, seq: int, ack: int,
                      flags: int, payload: bytes) -> bytes:
    """One Ethernet II / IPv4 / TCP frame with correct checksums and no options or padding."""
    sip, dip = _ip_bytes(src[0]), _ip_bytes(dst[0])
    tcp_len = 20 + len(payload)
    tcp = _TCP.pack(src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, _WINDOW, 0, 0)
    pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_TCP, tcp_len)
    # The pseudo-header (12 bytes) and header (20) are whole words: one pass covers all three.
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + payload)) + tcp[18:]
    ip = _IPV4.pack(0x45, 0, 20 + tcp_len, ip_id, _IP_DF, _TTL, socket.IPPROTO_TCP, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return _mac_bytes(dst[0]) + _mac_bytes(src[0]) + _ETHERTYPE_IPV4 + ip + tcp + payload


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
        self._file: BinaryIO | None = open(path, "wb")
        # Write the global header now: an empty capture is still a valid file.
        self._file.write(_GLOBAL_HEADER)
        self._file.flush()

    def stream(self, client: tuple[str, int], server: tuple[str, int]) -> "StreamRecorder":
        rec = StreamRecorder(self, client, server)
        rec._handshake()
        return rec

    def _emit(self, src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int, flags: int,
              payload: bytes = b"") -> None:
        with self._lock:
            if self._file is None:
                raise ValueError(f"capture {self.path} is closed")
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            frame = ethernet_ipv4_tcp(src, dst, self._ip_id, seq, ack, flags, payload)
            stamp = self._clock()
            sec = int(stamp)
            usec = int(round((stamp - sec) * 1_000_000))
            if usec >= 1_000_000:
                sec, usec = sec + 1, usec - 1_000_000
            # Record and frame in one write, flushed: the file is a valid pcap after every frame.
            self._file.write(_RECORD.pack(sec, usec, len(frame), len(frame)) + frame)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

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
