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


def ip_payload(linktype: int, data: bytes) -> tuple[int, bytes] | None:
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


IPV4 = struct.Struct(">BxHxxHxBxxII")  # version/ihl, total length, flags/fragment, protocol, src, dst
TCP = struct.Struct(">HHIIH")          # ports, sequence, acknowledgement, offset/flags
_U16 = struct.Struct(">H")


def tcp_fields(linktype: int, data: bytes) -> tuple[int, int, int, int, int, bytes] | None:
    """(src, dst, seq, ack, flags, payload) of the TCP segment in a frame, endpoints as
    integers; None for anything else (ARP, UDP, non-first fragments, broken headers)."""
    inner = ip_payload(linktype, data)
    if inner is None:
        return None
    etype, ip = inner
    if etype == 0x0800:
        if len(ip) < 20:
            return None
        vihl, total, frag, proto, s_addr, d_addr = IPV4.unpack_from(ip, 0)
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
    sport, dport, seq, ack, off_flags = TCP.unpack_from(ip, pos)
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


