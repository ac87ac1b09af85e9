"""Reading a capture into the reassembler: file records to TCP segments to per-stream sinks.

libpcap records are cut from large reads and their headers read in place (the fast path);
pcapng files go block by block. Both feed the same link/IP/TCP decoder in `packets`.
"""

from __future__ import annotations

from typing import BinaryIO, Callable

from .fileformat import (PCAP_MAGICS, CaptureError, ProgressFn, open_capture, pcap_frames,
                         pcap_header, pcapng_records, with_progress)
from .packets import tcp_fields
from .reassembly import Reassembler, StreamSink, TcpStream


def _scan_pcap(f: BinaryIO, magic: bytes, total: int, feed: Callable[..., None],
               clock: Callable[[float], None], progress: ProgressFn | None) -> None:
    header = pcap_header(f, magic)
    linktype, last_sec = header[3], -1
    for frame, sec, _frac, buf, start, end in pcap_frames(f, header, total, progress):
        if sec != last_sec:  # the reassembler's clock needs no finer grain than a second
            last_sec = sec
            clock(sec)
        fields = tcp_fields(linktype, buf, start, end)
        if fields is not None:
            src, dst, seq, _ack, flags, payload = fields
            feed(frame, src, dst, seq, flags, payload)


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
