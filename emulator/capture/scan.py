"""Reading a capture into the reassembler: file records to TCP segments to per-stream sinks.

libpcap files take a fast path: records are cut from large reads and Ethernet/IPv4/TCP headers
are read in place; anything else goes through the general link/IP/TCP decoder in `packets`.
pcapng files go record by record through `fileformat`.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Callable

from .fileformat import (PCAP_MAGICS, CaptureError, ProgressFn, open_capture, pcap_header,
                         pcapng_records, with_progress)
from .packets import IPV4, LT_EN10MB, TCP, tcp_fields
from .reassembly import Reassembler, StreamSink, TcpStream

READ_CHUNK = 1 << 18  # small enough that two of them are no burden, large enough to amortise reads


def _scan_pcap(f: BinaryIO, magic: bytes, total: int, feed: Callable[..., None],
               r_clock: Callable[[float], None], progress: ProgressFn | None) -> None:
    endian, _nano, snaplen, linktype, limit = pcap_header(f, magic)
    record = struct.Struct(endian + "I4xI4x").unpack_from  # seconds, caplen
    clock, last_sec = r_clock, -1
    ipv4, tcp = IPV4.unpack_from, TCP.unpack_from
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



def read_into(path: str, r: Reassembler, progress: ProgressFn | None = None) -> None:
    """Read `path` and feed every TCP segment to `r`, then end every stream still open.
    Raises CaptureError for unreadable files and for captures without TCP."""
    f, magic, total = open_capture(path)
    with f:
        if magic in PCAP_MAGICS:
            _scan_pcap(f, magic, total, r.feed_raw, r.clock, progress)
        else:
            f.seek(0)
            feed = r.feed_raw
            for pkt in with_progress(f, total, pcapng_records(f), progress):
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
