"""Capture file formats: libpcap and pcapng (draft-ietf-opsawg-pcapng), read record by record.

Frame numbers are counted exactly as Wireshark counts them: 1-based, one per packet record,
whatever the record carries. Any problem with the file itself (not a capture, truncated,
corrupt) is a `CaptureError` with a message meant for a person.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

ProgressFn = Callable[[int, int], None]


class CaptureError(Exception):
    """The capture cannot be read or holds nothing this tool can analyse."""


@dataclass
class Packet:
    frame: int
    time: float
    linktype: int
    data: bytes


def read_exact(f: BinaryIO, n: int, what: str, frame: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CaptureError(f"capture is truncated: {what} of record {frame} is cut short "
                           f"({len(data)} of {n} bytes)")
    return data


def pcap_header(f: BinaryIO, magic: bytes) -> "PcapHeader":
    """The libpcap global header after its magic: (endian, nanosecond stamps, snaplen, linktype,
    the largest record length we accept). Records follow with 16-byte headers."""
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    header = read_exact(f, 20, "global header", 0)
    major, _minor, _tz, _sig, snaplen, linktype = struct.unpack(endian + "HHiIII", header)
    if major != 2:
        raise CaptureError(f"unsupported pcap version {major}")
    # A snaplen of 0 or below 256 KiB still allows 256 KiB records: some writers lie low.
    return endian, nano, snaplen, linktype & 0x0FFFFFFF, max(snaplen, 1 << 18)


READ_CHUNK = 1 << 18  # small enough that two of them are no burden, large enough to amortise reads


PcapHeader = tuple[str, bool, int, int, int]


def pcap_frames(f: BinaryIO, header: PcapHeader, total: int, progress: ProgressFn | None = None
                ) -> Iterator[tuple[int, int, int, bytes, int, int]]:
    """The libpcap records after the global header (`header`, read with pcap_header), cut from
    large reads: (frame, seconds, fraction, buffer, start, end), the record's data being
    buffer[start:end]. The buffer is only valid until the next record."""
    endian, _nano, snaplen, _linktype, limit = header
    record = struct.Struct(endian + "IIIxxxx").unpack_from  # seconds, fraction, caplen
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
        sec, frac, caplen = record(buf, pos)
        frame += 1
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
        yield frame, sec, frac, buf, start, end
    if progress is not None:
        progress(total, total)


def pcap_records(f: BinaryIO, magic: bytes, total: int = 0,
                 progress: ProgressFn | None = None) -> Iterator[Packet]:
    header = pcap_header(f, magic)
    linktype, scale = header[3], 1e9 if header[1] else 1e6
    for frame, sec, frac, buf, start, end in pcap_frames(f, header, total, progress):
        yield Packet(frame, sec + frac / scale, linktype, buf[start:end])


def pcapng_records(f: BinaryIO) -> Iterator[Packet]:
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
            bom = read_exact(f, 4, "section header", frame)
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError("capture is corrupt: bad pcapng byte-order magic")
            (length,) = struct.unpack(endian + "I", head[4:])
            if length < 28 or length % 4:
                raise CaptureError("capture is corrupt: bad pcapng section header length")
            read_exact(f, length - 12, "section header", frame)
            interfaces = []
            first = False
            continue
        if first:
            raise CaptureError("not a pcapng file")
        btype, length = struct.unpack(endian + "II", head)
        if length < 12 or length % 4 or length > (1 << 26):
            raise CaptureError(f"capture is corrupt: pcapng block of length {length} "
                               f"after frame {frame}")
        body = read_exact(f, length - 8, "pcapng block", frame + 1)
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


def with_progress(f: BinaryIO, total: int, records: Iterator[Packet],
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
    f, magic, total = open_capture(path)
    with f:
        if magic in PCAP_MAGICS:
            yield from pcap_records(f, magic, total, progress)
        else:
            f.seek(0)
            yield from with_progress(f, total, pcapng_records(f), progress)


def open_capture(path: str) -> tuple[BinaryIO, bytes, int]:
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


