"""Link, network and transport layers: from a captured frame to its TCP segment.

Endpoints travel through the hot path as integers: the address shifted left 16 bits, or'ed
with the port (an IPv6 endpoint also carries bit 144, so the families never collide). Text
("10.0.0.1", 445) is made once per stream, not once per packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .fileformat import Packet

Endpoint = tuple[str, int]

# libpcap LINKTYPE_* values we can strip down to IP.
LT_NULL, LT_EN10MB, LT_RAW, LT_LOOP, LT_LINUX_SLL, LT_LINUX_SLL2 = 0, 1, 101, 108, 113, 276
LT_RAW_ALIASES = {12, 14, 101, 228, 229}



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


def ip_start(linktype: int, data: bytes, start: int, end: int) -> tuple[int, int]:
    """(ethertype-like version, offset of the IP header) for the link layers we know, or
    (0, 0) for anything else. Offsets are into `data`, whose frame is [start, end)."""
    n = end - start
    if linktype == LT_EN10MB:
        if n < 14:
            return 0, 0
        etype, pos = data[start + 12] << 8 | data[start + 13], start + 14
        while etype in (0x8100, 0x88A8, 0x9100) and end >= pos + 4:  # 802.1Q / QinQ
            etype, pos = data[pos + 2] << 8 | data[pos + 3], pos + 4
        return etype, pos
    if linktype == LT_LINUX_SLL:
        return (data[start + 14] << 8 | data[start + 15], start + 16) if n >= 16 else (0, 0)
    if linktype == LT_LINUX_SLL2:
        return (data[start] << 8 | data[start + 1], start + 20) if n >= 20 else (0, 0)
    if linktype in (LT_NULL, LT_LOOP):
        if n < 4:
            return 0, 0
        fam = data[start] or data[start + 3]  # host byte order on NULL, network order on LOOP
        return (0x0800 if fam == 2 else 0x86DD), start + 4
    if linktype in LT_RAW_ALIASES:
        if not n:
            return 0, 0
        return (0x0800 if data[start] >> 4 == 4 else 0x86DD), start
    return 0, 0


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


IPV4 = struct.Struct(">BxHxxHxBxxII")  # version/ihl, total length, flags/fragment, protocol, src, dst
TCP = struct.Struct(">HHIIH")          # ports, sequence, acknowledgement, offset/flags
_U16 = struct.Struct(">H")
_ipv4, _tcp = IPV4.unpack_from, TCP.unpack_from


def tcp_fields(linktype: int, data: bytes, start: int = 0,
               end: int | None = None) -> tuple[int, int, int, int, int, bytes] | None:
    """(src, dst, seq, ack, flags, payload) of the TCP segment in the frame data[start:end],
    endpoints as integers; None for anything else (ARP, UDP, non-first fragments, broken
    headers). Headers are read in place: only the payload is copied."""
    if end is None:
        end = len(data)
    if linktype == LT_EN10MB and end - start >= 54 and data[start + 12] == 8 and data[start + 13] == 0:
        etype, ip = 0x0800, start + 14  # the common case: untagged Ethernet, IPv4
    else:
        etype, ip = ip_start(linktype, data, start, end)
    if etype == 0x0800:
        if end - ip < 20:
            return None
        vihl, total, frag, proto, s_addr, d_addr = _ipv4(data, ip)
        ihl = (vihl & 0x0F) * 4
        if proto != 6 or vihl >> 4 != 4 or frag & 0x1FFF or ihl < 20:
            return None  # not TCP, or a non-first fragment
        # Ethernet pads short frames; the IP total length says where the packet ends. Some
        # offloaded captures write 0 there; then trust the frame.
        ip_end = ip + total if ihl <= total <= end - ip else end
        src_base, dst_base, t = s_addr << 16, d_addr << 16, ip + ihl
    elif etype == 0x86DD:
        if end - ip < 40:
            return None
        nxt, plen = data[ip + 6], _U16.unpack_from(data, ip + 4)[0]
        src_base = (int.from_bytes(data[ip + 8:ip + 24], "big") << 16) | IPV6_MARK
        dst_base = (int.from_bytes(data[ip + 24:ip + 40], "big") << 16) | IPV6_MARK
        t = ip + 40
        while nxt in (0, 43, 60) and end >= t + 8:  # hop-by-hop, routing, destination
            nxt, t = data[t], t + (data[t + 1] + 1) * 8
        if nxt != 6:
            return None
        ip_end = ip + 40 + plen if plen and 40 + plen <= end - ip else end
    else:
        return None
    if ip_end - t < 20:
        return None
    sport, dport, seq, ack, off_flags = _tcp(data, t)
    hlen = (off_flags >> 12) * 4
    if hlen < 20 or hlen > ip_end - t:
        return None
    payload = bytes(data[t + hlen:ip_end]) if t + hlen < ip_end else b""
    return src_base | sport, dst_base | dport, seq, ack, off_flags & 0x1FF, payload


def parse_tcp(pkt: Packet) -> Segment | None:
    """The TCP segment inside a frame, or None for anything else (ARP, UDP, fragments...)."""
    f = tcp_fields(pkt.linktype, pkt.data)
    if f is None:
        return None
    src, dst, seq, ack, flags, payload = f
    return Segment(pkt.frame, pkt.time, endpoint_text(src), endpoint_text(dst), seq, ack, flags, payload)


