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
from dataclasses import dataclass, field
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


def _pcap_records(f: BinaryIO, magic: bytes) -> Iterator[Packet]:
    # libpcap format: 24-byte global header, then 16-byte record headers.
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    header = _read_exact(f, 20, "global header", 0)
    major, _minor, _tz, _sig, snaplen, linktype = struct.unpack(endian + "HHiIII", header)
    if major != 2:
        raise CaptureError(f"unsupported pcap version {major}")
    linktype &= 0x0FFFFFFF
    limit = max(snaplen, 262144) if snaplen else 262144
    frame = 0
    while True:
        rec = f.read(16)
        if not rec:
            return
        frame += 1
        if len(rec) < 16:
            raise CaptureError(f"capture is truncated inside the header of frame {frame}")
        sec, frac, caplen, _wirelen = struct.unpack(endian + "IIII", rec)
        if caplen > max(limit, 1 << 18):
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


def read_packets(path: str, progress: ProgressFn | None = None) -> Iterator[Packet]:
    """Yield every record of a pcap or pcapng file, in file order."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CaptureError(f"cannot open capture {path}: {exc.strerror or exc}") from None
    with f:
        total = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if len(magic) < 4:
            raise CaptureError(f"{path} is not a capture file (too short to be pcap or pcapng)")
        if magic in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
            records = _pcap_records(f, magic)
        elif magic == b"\x0a\x0d\x0d\x0a":
            f.seek(0)
            records = _pcapng_records(f)
        else:
            raise CaptureError(f"{path} is not a pcap or pcapng file (magic {magic.hex()})")
        last_report = 0
        for pkt in records:
            if progress is not None:
                pos = f.tell()
                if pos - last_report >= (1 << 20) or pos == total:
                    progress(pos, total)
                    last_report = pos
            yield pkt
        if progress is not None:
            progress(total, total)


# ---------------------------------------------------------------------------------------------
# Link, network and transport layers


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


def parse_tcp(pkt: Packet) -> Segment | None:
    """The TCP segment inside a frame, or None for anything else (ARP, UDP, fragments...)."""
    inner = _ip_payload(pkt.linktype, pkt.data)
    if inner is None:
        return None
    etype, ip = inner
    if etype == 0x0800:
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return None
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        frag = struct.unpack(">H", ip[6:8])[0]
        if ip[9] != 6 or frag & 0x1FFF or ihl < 20:
            return None  # not TCP, or a non-first fragment
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        # Ethernet pads short frames; the IP total length says where the packet ends. Some
        # offloaded captures write 0 there; then trust the frame.
        end = total if ihl <= total <= len(ip) else len(ip)
        tcp = ip[ihl:end]
    elif etype == 0x86DD:
        if len(ip) < 40:
            return None
        nxt, plen = ip[6], struct.unpack(">H", ip[4:6])[0]
        src, dst = _ipv6_text(ip[8:24]), _ipv6_text(ip[24:40])
        pos = 40
        while nxt in (0, 43, 60) and len(ip) >= pos + 8:  # hop-by-hop, routing, destination
            nxt, pos = ip[pos], pos + (ip[pos + 1] + 1) * 8
        if nxt != 6:
            return None
        end = 40 + plen if plen and 40 + plen <= len(ip) else len(ip)
        tcp = ip[pos:end]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack(">HHIIH", tcp[:14])
    hlen = (off_flags >> 12) * 4
    if hlen < 20 or hlen > len(tcp):
        return None
    return Segment(pkt.frame, pkt.time, (src, sport), (dst, dport), seq, ack, off_flags & 0x1FF,
                   bytes(tcp[hlen:]))


# ---------------------------------------------------------------------------------------------
# Reassembly

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


class StreamSink(Protocol):
    def data(self, from_a: bool, payload: bytes, frame: int) -> None: ...
    def gap(self, from_a: bool, frame: int) -> None: ...
    # Optional: `close()` is called once the connection has ended (RST, or FIN both ways), so
    # the sink can drop its buffers; a long capture then holds state only for open streams.


@dataclass
class _Direction:
    next_seq: int | None = None
    pending: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    pending_bytes: int = 0
    bytes_seen: int = 0
    fin: bool = False


@dataclass
class TcpStream:
    """One TCP conversation. Side A is the side that sent the first segment we saw (the
    client when the SYN was captured)."""
    number: int
    a: Endpoint
    b: Endpoint
    first_frame: int
    saw_syn: bool = False
    partial: bool = False
    closed: bool = False
    sink: StreamSink | None = None
    dirs: tuple[_Direction, _Direction] = field(default_factory=lambda: (_Direction(), _Direction()))

    @property
    def client(self) -> Endpoint:
        return self.a

    @property
    def server(self) -> Endpoint:
        return self.b

    def one_sided(self) -> bool:
        return (self.dirs[0].bytes_seen > 0) != (self.dirs[1].bytes_seen > 0)


def _seq_lt(x: int, y: int) -> bool:
    return ((x - y) & 0xFFFFFFFF) > 0x7FFFFFFF


class Reassembler:
    """Turns segments into ordered byte runs per stream and direction.

    Retransmitted bytes (already delivered) are dropped; segments ahead of the expected
    sequence number wait (bounded) for the hole to fill. A capture that starts mid-stream
    starts each direction at its first segment; a hole that never fills is skipped and the
    stream marked partial, and the sink is told so that it can resynchronise.
    """

    def __init__(self, sink_factory: Callable[[TcpStream], StreamSink | None]) -> None:
        self._by_key: dict[tuple[Endpoint, Endpoint], TcpStream] = {}
        self._sink_factory = sink_factory
        self.streams: list[TcpStream] = []
        self.tcp_segments = 0

    def _stream_for(self, seg: Segment) -> tuple[TcpStream, int]:
        key = (seg.src, seg.dst) if seg.src <= seg.dst else (seg.dst, seg.src)
        st = self._by_key.get(key)
        new_connection = seg.flags & SYN and not seg.flags & ACK
        if st is not None and new_connection and (st.closed or st.dirs[0].bytes_seen or st.dirs[1].bytes_seen):
            # The 4-tuple is reused by a new connection: tshark starts a new stream too.
            self._finish(st)
            st = None
        if st is None:
            st = TcpStream(len(self.streams), seg.src, seg.dst, seg.frame)
            if seg.flags & SYN and seg.flags & ACK:
                # We only saw the server's SYN-ACK: the receiver is the client.
                st.a, st.b = seg.dst, seg.src
            self._by_key[key] = st
            self.streams.append(st)
            st.sink = self._sink_factory(st)
        return st, 0 if seg.src == st.a else 1

    def feed(self, seg: Segment) -> None:
        self.tcp_segments += 1
        st, idx = self._stream_for(seg)
        d = st.dirs[idx]
        seq = seg.seq
        if seg.flags & SYN:
            st.saw_syn = True
            d.next_seq = (seq + 1) & 0xFFFFFFFF
            seq = (seq + 1) & 0xFFFFFFFF
        payload = seg.payload
        if payload and st.sink is not None:
            if d.next_seq is None:
                if not st.saw_syn:
                    st.partial = True
                d.next_seq = seq
            self._accept(st, idx, seq, payload, seg.frame)
        elif payload:
            d.bytes_seen += len(payload)
        if seg.flags & (FIN | RST):
            st.closed = True
            d.fin = True
            if seg.flags & RST or (st.dirs[0].fin and st.dirs[1].fin):
                self._retire(st)

    def _retire(self, st: TcpStream) -> None:
        if st.sink is None:
            return
        self._finish(st)
        close = getattr(st.sink, "close", None)
        if close is not None:
            close()
        st.sink = None
        for d in st.dirs:
            d.pending.clear()
            d.pending_bytes = 0

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
        for st in self.streams:
            self._finish(st)


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


def reassemble(path: str, sink_factory: Callable[[TcpStream], StreamSink | None],
               progress: ProgressFn | None = None) -> Reassembler:
    """Read `path`, feed every TCP segment through reassembly into the sinks, and return the
    reassembler (its streams, with partial flags). Raises CaptureError for unreadable files
    and for captures without TCP."""
    r = Reassembler(sink_factory)
    for pkt in read_packets(path, progress):
        seg = parse_tcp(pkt)
        if seg is not None:
            r.feed(seg)
    r.finish()
    if r.tcp_segments == 0:
        raise CaptureError(f"{path} contains no TCP segments; SMB and DCE/RPC run over TCP")
    return r
