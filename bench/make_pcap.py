"""Build a large pcap for the capture-analysis bench by repeating real conversations.

Sources: the reference captures from real networks (../shared/captures/reference/) and, when
given, captures recorded by our own server. Each copy moves every host to its own addresses
(10.<copy>.<host>) so copies never merge into one TCP stream, and shifts client ports into a
per-copy range. Server ports stay as they were (135, 139, 445 and the dynamic RPC ports the
endpoint mapper handed out) so tshark and our reader decode each conversation exactly as they
decode the original; the shifted client ports are >= 20000 and skip ports tshark assigns to
other protocols.

  python bench/make_pcap.py OUT.pcap --mb 100 [--own OWN.pcap ...]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "captures",
                         "reference")
ETHER_HEADER = b"\x00\x00\x00\x00\x00\x02" + b"\x00\x00\x00\x00\x00\x01" + b"\x08\x00"
# client-port range per copy: tshark's well-known TCP ports inside 20000-60000 are avoided
AVOID = {20000, 20005, 22000, 24007, 25565, 26000, 27017, 28000, 30000, 31337, 32764, 33434, 37008, 40000,
         41794, 44818, 47808, 48898, 50000, 50002, 54321, 55555, 5001, 6001}


def reference_sources() -> list[str]:
    names = ["mapi.pcap", "raw_ntlm_in_smb.pcap", "dce_rpc_ntlm.pcapng"]
    return [p for p in (os.path.abspath(os.path.join(REFERENCE, n)) for n in names) if os.path.exists(p)]


def load_conversations(paths: list[str]) -> list[tuple[float, bytes, set[int]]]:
    """(time, IPv4 packet bytes, server ports of its file) for every IPv4/TCP packet of the sources."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapNgReader, PcapReader
    out = []
    for path in paths:
        reader = PcapNgReader(path) if path.endswith(".pcapng") else PcapReader(path)
        pkts = []
        with reader:
            for n, pkt in enumerate(reader):
                if n > 1_000_000:
                    break
                if IP in pkt and TCP in pkt:
                    pkts.append((float(pkt.time), bytes(pkt[IP]), pkt[TCP]))
        servers = {t.dport for _, _, t in pkts if t.flags & 0x12 == 0x02}     # SYN only: who was called
        servers |= {p for _, _, t in pkts for p in (t.sport, t.dport) if p in (135, 139, 445)}
        out += [(ts, raw, servers) for ts, raw, _ in pkts]
    return out


def _client_port(port: int, copy: int) -> int:
    p = 20000 + (port * 131 + copy * 977) % 40000
    while p in AVOID:
        p += 1
    return p


def build(out_path: str, megabytes: float, sources: list[str]) -> dict[str, int]:
    packets = load_conversations(sources)
    if not packets:
        raise SystemExit("no IPv4/TCP packets in the sources")
    hosts: dict[bytes, int] = {}
    for _, raw, _ in packets:
        for addr in (raw[12:16], raw[16:20]):
            hosts.setdefault(addr, len(hosts) + 1)
    target = int(megabytes * 1024 * 1024)
    written, copies, frames = 24, 0, 0
    with open(out_path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))      # pcap, Ethernet
        base = packets[0][0]
        while written < target and copies < 100_000:
            copies += 1
            net = bytes([10, (copies >> 8) & 0xFF, copies & 0xFF])
            offset = copies * 3600.0                 # each copy an hour later: readers see fresh streams
            for ts, raw, servers in packets:
                ihl = (raw[0] & 0x0F) * 4
                sport, dport = struct.unpack_from("!HH", raw, ihl)
                if sport not in servers:
                    sport = _client_port(sport, copies)
                if dport not in servers:
                    dport = _client_port(dport, copies)
                pkt = bytearray(raw)
                pkt[12:16] = net + bytes([hosts[raw[12:16]]])
                pkt[16:20] = net + bytes([hosts[raw[16:20]]])
                struct.pack_into("!HH", pkt, ihl, sport, dport)
                _fix_checksums(pkt, ihl)
                frame = ETHER_HEADER + bytes(pkt)
                t = ts - base + offset + 1_700_000_000
                sec = int(t)
                f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
                f.write(frame)
                written += 16 + len(frame)
                frames += 1
    return {"bytes": written, "copies": copies, "frames": frames}


def _sum16(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _fix_checksums(pkt: bytearray, ihl: int) -> None:
    """Recompute the IPv4 header and TCP checksums after rewriting addresses and ports."""
    pkt[10:12] = b"\x00\x00"
    struct.pack_into("!H", pkt, 10, ~_sum16(pkt[:ihl]) & 0xFFFF)
    total_len = struct.unpack_from("!H", pkt, 2)[0]
    seg = pkt[ihl:total_len]
    if len(seg) < 20:
        return
    seg[16:18] = b"\x00\x00"
    pseudo = bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, len(seg))
    struct.pack_into("!H", pkt, ihl + 16, ~_sum16(pseudo + bytes(seg)) & 0xFFFF)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--own", action="append", default=[], help="also repeat a capture our server recorded")
    a = p.parse_args(argv)
    info = build(a.out, a.mb, reference_sources() + a.own)
    print(f"{a.out}: {info['bytes'] / 1e6:.1f} MB, {info['copies']} copies, {info['frames']} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
