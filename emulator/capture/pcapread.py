"""Streaming pcap/pcapng reader with per-stream TCP reassembly.

The file is read record by record; nothing but small per-stream state is kept, so memory does
not grow with the capture. Frame numbers are counted exactly as Wireshark counts them: 1-based,
one per packet record, whatever the record carries. Stream numbers follow tshark's tcp.stream:
the order in which a conversation's first segment appears.

Any problem with the file itself (not a capture, truncated, corrupt, no TCP) is reported as a
`CaptureError` with a message meant for a person.
"""

from __future__ import annotations

import os
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Protocol

Endpoint = tuple[str, int]
ProgressFn = Callable[[int, int], None]

# libpcap LINKTYPE_* values we can strip down to IP.
LT_NULL, LT_EN10MB, LT_RAW, LT_LOOP, LT_LINUX_SLL, LT_LINUX_SLL2 = 0, 1, 101, 108, 113, 276
LT_RAW_ALIASES = {12, 14, 101, 228, 229}

# Bytes we hold for one direction while waiting for a missing segment before we give up on it
# and skip the hole (the stream is then marked partial).
MAX_PENDING_BYTES = 1 << 20
MAX_PENDING_SEGMENTS = 512


class CaptureError(Exception):
    """The capture cannot be read or holds nothing this tool can analyse."""


@dataclass
class Packet:
    frame: int
    time: float
    linktype: int
    data: bytes


# ---------------------------------------------------------------------------------------------
# File formats


def _read_exact(f: BinaryIO, n: int, what: str, frame: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CaptureError(f"capture is truncated: {what} of record {frame} is cut short "
                           f"({len(data)} of {n} bytes)")
    return data


def _pcap_header(f: BinaryIO, magic: bytes) -> tuple[str, bool, int, int, int]:
    """The libpcap global header after its magic: (endian, nanosecond stamps, snaplen, linktype,
    the largest record length we accept). Records follow with 16-byte headers."""
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    header = _read_exact(f, 20, "global header", 0)
    major, _minor, _tz, _sig, snaplen, linktype = struct.unpack(endian + "HHiIII", header)
    if major != 2:
        raise CaptureError(f"unsupported pcap version {major}")
    # A snaplen of 0 or below 256 KiB still allows 256 KiB records: some writers lie low.
    return endian, nano, snaplen, linktype & 0x0FFFFFFF, max(snaplen, 1 << 18)


def _pcap_records(f: BinaryIO, magic: bytes) -> Iterator[Packet]:
    endian, nano, snaplen, linktype, limit = _pcap_header(f, magic)
    frame = 0
    while True:
        rec = f.read(16)
        if not rec:
            return
        frame += 1
        if len(rec) < 16:
            raise CaptureError(f"capture is truncated inside the header of frame {frame}")
        sec, frac, caplen, _wirelen = struct.unpack(endian + "IIII", rec)
        if caplen > limit:
            raise CaptureError(f"capture is corrupt: frame {frame} claims {caplen} bytes "
                               f"(snaplen {snaplen})")
        data = _read_exact(f, caplen, "data", frame)
        yield Packet(frame, sec + frac / (1e9 if nano else 1e6), linktype, data)


def _pcapng_records(f: BinaryIO) -> Iterator[Packet]:
    # pcapng (draft-ietf-opsawg-pcapng): blocks of type/length/body/length. Interfaces are
    # numbered per section; each Section Header Block resets them.
    frame = 0
    endian = "<"
    interfaces: list[tuple[int, float]] = []  # (linktype, seconds per tick)
    first = True
    while True:
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            raise CaptureError("capture is truncated inside a pcapng block header")
        if head[:4] == b"\x0a\x0d\x0d\x0a":
            bom = _read_exact(f, 4, "section header", frame)
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError("capture is corrupt: bad pcapng byte-order magic")
            (length,) = struct.unpack(endian + "I", head[4:])
            if length < 28 or length % 4:
                raise CaptureError("capture is corrupt: bad pcapng section header length")
            _read_exact(f, length - 12, "section header", frame)
            interfaces = []
            first = False
            continue
        if first:
            raise CaptureError("not a pcapng file")
        btype, length = struct.unpack(endian + "II", head)
        if length < 12 or length % 4 or length > (1 << 26):
            raise CaptureError(f"capture is corrupt: pcapng block of length {length} "
                               f"after frame {frame}")
        body = _read_exact(f, length - 8, "pcapng block", frame + 1)
        body = body[:-4]
        if btype == 1:  # Interface Description Block
            linktype = struct.unpack(endian + "H", body[:2])[0]
            interfaces.append((linktype, _ts_resolution(body[8:], endian)))
        elif btype in (6, 3, 2):  # Enhanced, Simple, obsolete Packet Block
            frame += 1
            if btype == 6:
                if len(body) < 20:
                    raise CaptureError(f"capture is corrupt: frame {frame} block too short")
                iface, hi, lo, caplen, _orig = struct.unpack(endian + "IIIII", body[:20])
                data = body[20:20 + caplen]
            elif btype == 2:
                iface = struct.unpack(endian + "H", body[:2])[0]
                hi, lo, caplen = struct.unpack(endian + "III", body[4:16])
                data = body[20:20 + caplen]
            else:
                iface, hi, lo = 0, 0, 0
                orig = struct.unpack(endian + "I", body[:4])[0]
                data = body[4:4 + orig]
            if iface >= len(interfaces):
                raise CaptureError(f"capture is corrupt: frame {frame} names interface {iface}, "
                                   f"which was never described")
            linktype, tick = interfaces[iface]
            yield Packet(frame, ((hi << 32) | lo) * tick, linktype, data)
        # Other blocks (name resolution, statistics, custom) carry no frames.


def _ts_resolution(options: bytes, endian: str) -> float:
    pos = 0
    while pos + 4 <= len(options):
        code, length = struct.unpack(endian + "HH", options[pos:pos + 4])
        value = options[pos + 4:pos + 4 + length]
        if code == 0:
            break
        if code == 9 and value:  # if_tsresol
            v = value[0]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        pos += 4 + ((length + 3) & ~3)
    return 1e-6


PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def _with_progress(f: BinaryIO, total: int, records: Iterator[Packet],
                   progress: ProgressFn | None) -> Iterator[Packet]:
    if progress is None:
        yield from records
        return
    last_report = 0
    for pkt in records:
        pos = f.tell()
        if pos - last_report >= (1 << 20) or pos == total:
            progress(pos, total)
            last_report = pos
        yield pkt
    progress(total, total)


def read_packets(path: str, progress: ProgressFn | None = None) -> Iterator[Packet]:
    """Yield every record of a pcap or pcapng file, in file order."""
    f, magic, total = _open_capture(path)
    with f:
        if magic in PCAP_MAGICS:
            records = _pcap_records(f, magic)
        else:
            f.seek(0)
            records = _pcapng_records(f)
        yield from _with_progress(f, total, records, progress)


# ---------------------------------------------------------------------------------------------
# Link, network and transport layers
#
# Endpoints travel through the hot path as integers: the address shifted left 16 bits, or'ed
# with the port (an IPv6 endpoint also carries bit 144, so the families never collide). Text
# ("10.0.0.1", 445) is made once per stream, not once per packet.

IPV6_MARK = 1 << 144
MASK32 = 0xFFFFFFFF


@dataclass
class Segment:
    frame: int
    time: float
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int
    flags: int
    payload: bytes


def _ip_payload(linktype: int, data: bytes) -> tuple[int, bytes] | None:
    """(ethertype-like version, IP packet) for the link layers we know; None otherwise."""
    if linktype == LT_EN10MB:
        if len(data) < 14:
            return None
        etype, pos = struct.unpack(">H", data[12:14])[0], 14
        while etype in (0x8100, 0x88A8, 0x9100) and len(data) >= pos + 4:  # 802.1Q / QinQ
            etype, pos = struct.unpack(">H", data[pos + 2:pos + 4])[0], pos + 4
        return etype, data[pos:]
    if linktype == LT_LINUX_SLL:
        return (struct.unpack(">H", data[14:16])[0], data[16:]) if len(data) >= 16 else None
    if linktype == LT_LINUX_SLL2:
        return (struct.unpack(">H", data[0:2])[0], data[20:]) if len(data) >= 20 else None
    if linktype in (LT_NULL, LT_LOOP):
        if len(data) < 4:
            return None
        fam = data[0] or data[3]  # host byte order on NULL, network order on LOOP
        return (0x0800 if fam == 2 else 0x86DD, data[4:])
    if linktype in LT_RAW_ALIASES:
        if not data:
            return None
        return (0x0800 if data[0] >> 4 == 4 else 0x86DD, data)
    return None


def _ipv6_text(b: bytes) -> str:
    import ipaddress
    return str(ipaddress.IPv6Address(b))


def endpoint_text(ep: int) -> Endpoint:
    """The (address, port) text form of an integer endpoint."""
    port, addr = ep & 0xFFFF, ep >> 16
    if ep & IPV6_MARK:
        return _ipv6_text((addr & ((1 << 128) - 1)).to_bytes(16, "big")), port
    return f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}", port


def endpoint_int(ep: Endpoint) -> int:
    import ipaddress
    addr = ipaddress.ip_address(ep[0])
    return (int(addr) << 16 | ep[1]) | (IPV6_MARK if addr.version == 6 else 0)


_IPV4 = struct.Struct(">BxHxxHxBxxII")  # version/ihl, total length, flags/fragment, protocol, src, dst
_TCP = struct.Struct(">HHIIH")          # ports, sequence, acknowledgement, offset/flags
_U16 = struct.Struct(">H")


def tcp_fields(linktype: int, data: bytes) -> tuple[int, int, int, int, int, bytes] | None:
    """(src, dst, seq, ack, flags, payload) of the TCP segment in a frame, endpoints as
    integers; None for anything else (ARP, UDP, non-first fragments, broken headers)."""
    inner = _ip_payload(linktype, data)
    if inner is None:
        return None
    etype, ip = inner
    if etype == 0x0800:
        if len(ip) < 20:
            return None
        vihl, total, frag, proto, s_addr, d_addr = _IPV4.unpack_from(ip, 0)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or proto != 6 or frag & 0x1FFF or ihl < 20:
            return None  # not TCP, or a non-first fragment
        # Ethernet pads short frames; the IP total length says where the packet ends. Some
        # offloaded captures write 0 there; then trust the frame.
        end = total if ihl <= total <= len(ip) else len(ip)
        src_base, dst_base, pos = s_addr << 16, d_addr << 16, ihl
    elif etype == 0x86DD:
        if len(ip) < 40:
            return None
        nxt, plen = ip[6], _U16.unpack_from(ip, 4)[0]
        src_base = (int.from_bytes(ip[8:24], "big") << 16) | IPV6_MARK
        dst_base = (int.from_bytes(ip[24:40], "big") << 16) | IPV6_MARK
        pos = 40
        while nxt in (0, 43, 60) and len(ip) >= pos + 8:  # hop-by-hop, routing, destination
            nxt, pos = ip[pos], pos + (ip[pos + 1] + 1) * 8
        if nxt != 6:
            return None
        end = 40 + plen if plen and 40 + plen <= len(ip) else len(ip)
    else:
        return None
    if end - pos < 20:
        return None
    sport, dport, seq, ack, off_flags = _TCP.unpack_from(ip, pos)
    hlen = (off_flags >> 12) * 4
    if hlen < 20 or hlen > end - pos:
        return None
    return src_base | sport, dst_base | dport, seq, ack, off_flags & 0x1FF, bytes(ip[pos + hlen:end])


def parse_tcp(pkt: Packet) -> Segment | None:
    """The TCP segment inside a frame, or None for anything else (ARP, UDP, fragments...)."""
    f = tcp_fields(pkt.linktype, pkt.data)
    if f is None:
        return None
    src, dst, seq, ack, flags, payload = f
    return Segment(pkt.frame, pkt.time, endpoint_text(src), endpoint_text(dst), seq, ack, flags, payload)


# ---------------------------------------------------------------------------------------------
# Reassembly

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

# Ended streams are remembered (by 4-tuple, as a bare stream number) so that their late ACKs
# and retransmissions are not counted as new streams, exactly as tshark numbers them. The
# memory of ended streams is bounded: past this many, the oldest are forgotten.
MAX_ENDED_STREAMS = 1 << 16

# A stream that carries no segment for this long (capture time, the latest timestamp seen so
# far) is ended, so captures full of connections that never close (the capture started or
# stopped while they were open) do not hold them all. Should it carry data again later, it
# resumes under the same stream number as a partial stream: its output is then split in two,
# never lost.
IDLE_TIMEOUT = 900
SWEEP_EVERY = 60


class StreamSink(Protocol):
    def data(self, from_a: bool, payload: bytes, frame: int) -> None: ...
    def gap(self, from_a: bool, frame: int) -> None: ...
    # Optional: `close()` is called once the connection has ended (RST, or FIN both ways, or
    # the end of the capture), so the sink can settle and drop its buffers; a long capture
    # then holds state only for open streams.


class _Direction:
    __slots__ = ("next_seq", "pending", "pending_bytes", "bytes_seen", "fin")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.pending: dict[int, tuple[bytes, int]] = {}
        self.pending_bytes = 0
        self.bytes_seen = 0
        self.fin = False


class TcpStream:
    """One TCP conversation. Side A is the side that sent the first segment we saw (the
    client when the SYN was captured)."""
    __slots__ = ("number", "a_ep", "b_ep", "first_frame", "saw_syn", "partial", "closed", "sink",
                 "dirs", "key", "last_seen", "_a", "_b")

    def __init__(self, number: int, a_ep: int, b_ep: int, first_frame: int) -> None:
        self.number, self.a_ep, self.b_ep, self.first_frame = number, a_ep, b_ep, first_frame
        self.saw_syn = self.partial = self.closed = False
        self.sink: StreamSink | None = None
        self.dirs = (_Direction(), _Direction())
        self.key = 0
        self.last_seen = 0.0
        self._a: Endpoint | None = None
        self._b: Endpoint | None = None

    @property
    def a(self) -> Endpoint:
        if self._a is None:
            self._a = endpoint_text(self.a_ep)
        return self._a

    @property
    def b(self) -> Endpoint:
        if self._b is None:
            self._b = endpoint_text(self.b_ep)
        return self._b

    @property
    def client(self) -> Endpoint:
        return self.a

    @property
    def server(self) -> Endpoint:
        return self.b

    def one_sided(self) -> bool:
        return (self.dirs[0].bytes_seen > 0) != (self.dirs[1].bytes_seen > 0)

    def has_payload(self) -> bool:
        return self.dirs[0].bytes_seen > 0 or self.dirs[1].bytes_seen > 0

    def ignore(self) -> None:
        """The sink has seen enough to know the stream carries nothing it reads: from now on
        only byte counts are kept, with no reassembly."""
        self.sink = None
        for d in self.dirs:
            d.pending.clear()
            d.pending_bytes = 0


def _seq_lt(x: int, y: int) -> bool:
    return ((x - y) & 0xFFFFFFFF) > 0x7FFFFFFF


class Reassembler:
    """Turns segments into ordered byte runs per stream and direction.

    Retransmitted bytes (already delivered) are dropped; segments ahead of the expected
    sequence number wait (bounded) for the hole to fill. A capture that starts mid-stream
    starts each direction at its first segment; a hole that never fills is skipped and the
    stream marked partial, and the sink is told so that it can resynchronise.

    With `keep_streams=False` only open streams are held: an ended stream is handed to
    `on_end` and then forgotten but for its number, so memory does not grow with the capture.
    """

    def __init__(self, sink_factory: Callable[[TcpStream], StreamSink | None],
                 keep_streams: bool = True, on_end: Callable[[TcpStream], None] | None = None) -> None:
        self._by_key: dict[int, TcpStream | int] = {}
        self._open: dict[int, TcpStream] = {}
        self._ended: deque[int] = deque()
        self._sink_factory = sink_factory
        self._keep = keep_streams
        self._on_end = on_end
        self.streams: list[TcpStream] = []
        self.stream_count = 0
        self.tcp_segments = 0
        self.partial_streams: list[int] = []
        self.two_sided = False  # some stream carried payload both ways
        self.first_one_sided: TcpStream | None = None
        self.now = 0.0  # the latest packet time seen (see clock)
        self._next_sweep = 0.0

    def clock(self, t: float) -> None:
        """The capture time of the packets about to be fed. Streams idle for IDLE_TIMEOUT are
        ended (only when ended streams are not kept, i.e. when streaming)."""
        if t <= self.now:
            return
        self.now = t
        if t >= self._next_sweep and not self._keep:
            self._next_sweep = t + SWEEP_EVERY
            idle_before = t - IDLE_TIMEOUT
            for st in [st for st in self._open.values() if st.last_seen < idle_before]:
                self._end(st, idle=True)

    def feed(self, seg: Segment) -> None:
        self.feed_raw(seg.frame, endpoint_int(seg.src), endpoint_int(seg.dst), seg.seq, seg.flags,
                      seg.payload)

    def feed_raw(self, frame: int, src: int, dst: int, seq: int, flags: int, payload: bytes) -> None:
        self.tcp_segments += 1
        key = (src << 176 | dst) if src <= dst else (dst << 176 | src)
        st = self._by_key.get(key)
        if st is None or flags & SYN:
            st = self._stream_for(st, key, frame, src, dst, flags, payload)
            if st is None:
                return
        elif st.__class__ is int:
            if st >= 0 or not payload:
                return  # a late segment of a stream that has ended
            st = self._resume(-st - 1, key, frame, src, dst)
        st.last_seen = self.now  # type: ignore[union-attr]
        idx = 0 if src == st.a_ep else 1  # type: ignore[union-attr]
        d = st.dirs[idx]  # type: ignore[union-attr]
        if flags & SYN:
            st.saw_syn = True  # type: ignore[union-attr]
            seq = (seq + 1) & MASK32
            d.next_seq = seq
        if payload:
            if st.sink is not None:  # type: ignore[union-attr]
                nxt = d.next_seq
                if nxt is None:
                    if not st.saw_syn:  # type: ignore[union-attr]
                        st.partial = True  # type: ignore[union-attr]
                    nxt = d.next_seq = seq
                if seq == nxt and not d.pending:
                    # The common case: the next bytes in order, nothing waiting.
                    n = len(payload)
                    d.next_seq = (seq + n) & MASK32
                    d.bytes_seen += n
                    st.sink.data(idx == 0, payload, frame)  # type: ignore[union-attr]
                else:
                    self._accept(st, idx, seq, payload, frame)  # type: ignore[arg-type]
            else:
                d.bytes_seen += len(payload)
        if flags & (FIN | RST):
            st.closed = True  # type: ignore[union-attr]
            d.fin = True
            if flags & RST or (st.dirs[0].fin and st.dirs[1].fin):  # type: ignore[union-attr]
                self._end(st)  # type: ignore[arg-type]

    def _stream_for(self, st: TcpStream | int | None, key: int, frame: int, src: int, dst: int,
                    flags: int, payload: bytes) -> TcpStream | None:
        new_connection = flags & SYN and not flags & ACK
        if st.__class__ is int:
            if new_connection:
                st = None
            elif st < 0 and payload:  # type: ignore[operator]
                return self._resume(-st - 1, key, frame, src, dst)  # type: ignore[operator]
            else:
                return None
        elif st is not None:
            if new_connection and (st.closed or st.has_payload()):  # type: ignore[union-attr]
                # The 4-tuple is reused by a new connection: tshark starts a new stream too.
                self._end(st)  # type: ignore[arg-type]
                st = None
            else:
                return st  # type: ignore[return-value]
        st = self._new_stream(self.stream_count, key, frame, src, dst)
        self.stream_count += 1
        if flags & SYN and flags & ACK:
            # We only saw the server's SYN-ACK: the receiver is the client.
            st.a_ep, st.b_ep = dst, src
        st.sink = self._sink_factory(st)
        return st

    def _new_stream(self, number: int, key: int, frame: int, src: int, dst: int) -> TcpStream:
        st = TcpStream(number, src, dst, frame)
        st.key = key
        self._by_key[key] = st
        self._open[number] = st
        if self._keep:
            self.streams.append(st)
        return st

    def _resume(self, number: int, key: int, frame: int, src: int, dst: int) -> TcpStream:
        """Data again on a stream ended for idleness: carry on under its number, as a stream
        picked up in the middle."""
        st = self._new_stream(number, key, frame, src, dst)
        st.partial = True
        st.sink = self._sink_factory(st)
        return st

    def _end(self, st: TcpStream, idle: bool = False) -> None:
        """The connection is over (RST, FIN both ways, its 4-tuple reused, or the capture
        ends): flush what waits behind holes, let the sink settle, and forget the stream."""
        if self._open.pop(st.number, None) is None:
            return
        self._finish(st)
        if st.has_payload():
            if st.one_sided():
                if self.first_one_sided is None:
                    self.first_one_sided = st
            else:
                self.two_sided = True
        if st.sink is not None:
            close = getattr(st.sink, "close", None)
            if close is not None:
                close()
            st.sink = None
        for d in st.dirs:
            d.pending.clear()
            d.pending_bytes = 0
        if st.partial:
            self.partial_streams.append(st.number)
        if self._on_end is not None:
            self._on_end(st)
        if not self._keep and self._by_key.get(st.key) is st:
            self._by_key[st.key] = -st.number - 1 if idle else st.number
            self._ended.append(st.key)
            if len(self._ended) > MAX_ENDED_STREAMS:
                old = self._ended.popleft()
                if self._by_key.get(old).__class__ is int:
                    del self._by_key[old]

    def _accept(self, st: TcpStream, idx: int, seq: int, payload: bytes, frame: int) -> None:
        d = st.dirs[idx]
        assert d.next_seq is not None
        if _seq_lt(seq, d.next_seq):
            overlap = (d.next_seq - seq) & 0xFFFFFFFF
            if overlap >= len(payload):
                return  # a retransmission of bytes already delivered
            payload, seq = payload[overlap:], d.next_seq
        if seq != d.next_seq:
            if seq not in d.pending or len(d.pending[seq][0]) < len(payload):
                old = d.pending.get(seq)
                d.pending_bytes += len(payload) - (len(old[0]) if old else 0)
                d.pending[seq] = (payload, frame)
            if d.pending_bytes > MAX_PENDING_BYTES or len(d.pending) > MAX_PENDING_SEGMENTS:
                self._skip_hole(st, idx)
            return
        self._deliver(st, idx, payload, frame)
        self._drain(st, idx)

    def _deliver(self, st: TcpStream, idx: int, payload: bytes, frame: int) -> None:
        d = st.dirs[idx]
        d.next_seq = (d.next_seq + len(payload)) & 0xFFFFFFFF  # type: ignore[operator]
        d.bytes_seen += len(payload)
        if st.sink is not None:
            st.sink.data(idx == 0, payload, frame)

    def _drain(self, st: TcpStream, idx: int) -> None:
        d = st.dirs[idx]
        while d.pending:
            progressed = False
            for seq in sorted(d.pending, key=lambda s: (s - d.next_seq) & 0xFFFFFFFF):  # type: ignore[operator]
                if _seq_lt(seq, d.next_seq) or seq == d.next_seq:  # type: ignore[arg-type]
                    payload, frame = d.pending.pop(seq)
                    d.pending_bytes -= len(payload)
                    overlap = (d.next_seq - seq) & 0xFFFFFFFF  # type: ignore[operator]
                    if overlap < len(payload):
                        self._deliver(st, idx, payload[overlap:], frame)
                    progressed = True
                    break
            if not progressed:
                return

    def _skip_hole(self, st: TcpStream, idx: int) -> None:
        d = st.dirs[idx]
        if not d.pending:
            return
        nearest = min(d.pending, key=lambda s: (s - d.next_seq) & 0xFFFFFFFF)  # type: ignore[operator]
        st.partial = True
        if st.sink is not None:
            st.sink.gap(idx == 0, d.pending[nearest][1])
        d.next_seq = nearest
        self._drain(st, idx)

    def _finish(self, st: TcpStream) -> None:
        for idx in (0, 1):
            while st.dirs[idx].pending:
                self._skip_hole(st, idx)

    def finish(self) -> None:
        """The capture is over: every stream still open ends now, in stream order."""
        for st in list(self._open.values()):
            self._end(st)


# ---------------------------------------------------------------------------------------------
# The fast path for libpcap files: records cut from large reads, Ethernet/IPv4/TCP headers read
# in place, anything else handed to the general decoder above.

READ_CHUNK = 1 << 18  # small enough that two of them are no burden, large enough to amortise reads


def _scan_pcap(f: BinaryIO, magic: bytes, total: int, feed: Callable[..., None],
               r_clock: Callable[[float], None], progress: ProgressFn | None) -> None:
    endian, _nano, snaplen, linktype, limit = _pcap_header(f, magic)
    record = struct.Struct(endian + "I4xI4x").unpack_from  # seconds, caplen
    clock, last_sec = r_clock, -1
    ipv4, tcp = _IPV4.unpack_from, _TCP.unpack_from
    ethernet = linktype == LT_EN10MB
    buf, pos, base, frame = b"", 0, 24, 0
    next_report = 1 << 20
    while True:
        if len(buf) - pos < 16:
            more = f.read(READ_CHUNK)
            base += pos
            buf, pos = buf[pos:] + more, 0
            if len(buf) < 16:
                if not buf:
                    break
                raise CaptureError(f"capture is truncated inside the header of frame {frame + 1}")
        sec, caplen = record(buf, pos)
        frame += 1
        if sec != last_sec:
            last_sec = sec
            clock(sec)
        if caplen > limit:
            raise CaptureError(f"capture is corrupt: frame {frame} claims {caplen} bytes "
                               f"(snaplen {snaplen})")
        start = pos + 16
        end = start + caplen
        if end > len(buf):
            more = f.read(max(READ_CHUNK, end - len(buf)))
            base += pos
            buf, start, end = buf[pos:] + more, 16, 16 + caplen
            pos = 0
            if end > len(buf):
                raise CaptureError(f"capture is truncated: data of record {frame} is cut short "
                                   f"({len(buf) - start} of {caplen} bytes)")
        pos = end
        if progress is not None and base + pos >= next_report:
            progress(base + pos, total)
            next_report = base + pos + (1 << 20)
        if ethernet and caplen >= 54 and buf[start + 12] == 8 and buf[start + 13] == 0:
            ip = start + 14
            vihl, iplen, frag, proto, s_addr, d_addr = ipv4(buf, ip)
            if proto != 6 or vihl >> 4 != 4 or frag & 0x1FFF:
                continue
            ihl = (vihl & 0x0F) * 4
            if ihl < 20:
                continue
            ip_end = ip + iplen if ihl <= iplen <= end - ip else end
            t = ip + ihl
            if ip_end - t < 20:
                continue
            sport, dport, seq, _ack, off_flags = tcp(buf, t)
            hlen = (off_flags >> 12) * 4
            if hlen < 20 or hlen > ip_end - t:
                continue
            feed(frame, s_addr << 16 | sport, d_addr << 16 | dport, seq, off_flags & 0x1FF,
                 buf[t + hlen:ip_end] if t + hlen < ip_end else b"")
        else:
            fields = tcp_fields(linktype, buf[start:end])
            if fields is not None:
                src, dst, seq, _ack, flags, payload = fields
                feed(frame, src, dst, seq, flags, payload)
    if progress is not None:
        progress(total, total)


def _open_capture(path: str) -> tuple[BinaryIO, bytes, int]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CaptureError(f"cannot open capture {path}: {exc.strerror or exc}") from None
    total = os.fstat(f.fileno()).st_size
    magic = f.read(4)
    if len(magic) < 4:
        f.close()
        raise CaptureError(f"{path} is not a capture file (too short to be pcap or pcapng)")
    if magic not in PCAP_MAGICS and magic != PCAPNG_MAGIC:
        f.close()
        raise CaptureError(f"{path} is not a pcap or pcapng file (magic {magic.hex()})")
    return f, magic, total


# ---------------------------------------------------------------------------------------------
# Progress


def terminal_progress(stream=None) -> ProgressFn | None:
    """A progress bar on stderr when it is a terminal, otherwise None (silent)."""
    out = stream or sys.stderr
    if not hasattr(out, "isatty") or not out.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 40
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        out.write(f"\rreading [{bar:<{width}}] {done >> 10} / {total >> 10} KiB")
        if done >= total:
            out.write("\n")
        out.flush()

    return show


def read_into(path: str, r: Reassembler, progress: ProgressFn | None = None) -> None:
    """Read `path` and feed every TCP segment to `r`, then end every stream still open.
    Raises CaptureError for unreadable files and for captures without TCP."""
    f, magic, total = _open_capture(path)
    with f:
        if magic in PCAP_MAGICS:
            _scan_pcap(f, magic, total, r.feed_raw, r.clock, progress)
        else:
            f.seek(0)
            feed = r.feed_raw
            for pkt in _with_progress(f, total, _pcapng_records(f), progress):
                r.clock(pkt.time)
                fields = tcp_fields(pkt.linktype, pkt.data)
                if fields is not None:
                    src, dst, seq, _ack, flags, payload = fields
                    feed(pkt.frame, src, dst, seq, flags, payload)
    r.finish()
    if r.tcp_segments == 0:
        raise CaptureError(f"{path} contains no TCP segments; SMB and DCE/RPC run over TCP")


def reassemble(path: str, sink_factory: Callable[[TcpStream], StreamSink | None],
               progress: ProgressFn | None = None) -> Reassembler:
    """Read `path`, feed every TCP segment through reassembly into the sinks, and return the
    reassembler (its streams, with partial flags). Raises CaptureError for unreadable files
    and for captures without TCP."""
    r = Reassembler(sink_factory)
    read_into(path, r, progress)
    return r
