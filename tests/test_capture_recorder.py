"""The recorder writes real DCE/RPC exchanges (impacket clients against the sans-IO engines on
loopback) as pcap that tshark decodes cleanly, and is deterministic with an injected clock."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from emulator.capture import CaptureWriter, analyse

from harness.recording import (BOB_DN, EMSMDB, fake_clock, record_pipe_path, record_tcp_path,
                               tshark_fields, tshark_problems)

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


def assert_clean_for_tshark(path: str) -> None:
    bad = tshark_problems(path)
    assert bad == "", f"tshark reports malformed or error-level packets:\n{bad}"


# ---------------------------------------------------------------------------------------------


def test_handshake_segments_and_fin(tmp_path):
    path = str(tmp_path / "s.pcap")
    w = CaptureWriter(path, clock=fake_clock(), mss=100)
    s = w.stream(("10.0.0.1", 50000), ("10.0.0.2", 135))
    s.client_data(b"\x05" * 250)
    s.server_data(b"\x06" * 30)
    s.close()
    w.close()
    from emulator.capture.pcapread import parse_tcp, read_packets
    segs = [parse_tcp(p) for p in read_packets(path)]
    flags = [seg.flags for seg in segs]
    assert flags[:3] == [0x02, 0x12, 0x10]  # SYN, SYN-ACK, ACK
    data = [seg for seg in segs if seg.payload]
    assert [len(seg.payload) for seg in data] == [100, 100, 50, 30]
    assert all(len(seg.payload) <= 100 for seg in data)
    assert data[2].flags & 0x08 and not data[0].flags & 0x08  # PSH only on the last segment
    assert data[1].seq == data[0].seq + 100
    assert data[3].ack == data[2].seq + 50  # the server acknowledges everything it got
    assert flags[-3:] == [0x11, 0x11, 0x10]  # FIN/ACK, FIN/ACK, ACK


def test_same_input_and_clock_give_identical_bytes(tmp_path):
    def write(p):
        w = CaptureWriter(p, clock=fake_clock())
        s1 = w.stream(("127.0.0.1", 40000), ("127.0.0.1", 445))
        s2 = w.stream(("127.0.0.1", 40001), ("127.0.0.1", 6001))
        s1.client_data(os.urandom(0) + b"A" * 3000)
        s2.client_data(b"B" * 10)
        s1.server_data(b"C" * 5)
        s2.close()
        s1.close(by="server")
        w.close()
        with open(p, "rb") as f:
            return f.read()

    a, b = write(str(tmp_path / "a.pcap")), write(str(tmp_path / "b.pcap"))
    assert a == b and len(a) > 24


def test_empty_capture_is_a_valid_file(tmp_path):
    path = str(tmp_path / "empty.pcap")
    w = CaptureWriter(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"\xd4\xc3\xb2\xa1"  # flushed global header before any frame
    w.close()


def test_threads_writing_one_file(tmp_path):
    path = str(tmp_path / "t.pcap")
    w = CaptureWriter(path, clock=fake_clock())
    streams = [w.stream(("10.1.0.1", 41000 + i), ("10.1.0.2", 6001)) for i in range(4)]

    def talk(s, n):
        for _ in range(20):
            s.client_data(bytes([n]) * 50)
            s.server_data(bytes([n]) * 20)
        s.close()

    threads = [threading.Thread(target=talk, args=(s, i)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    from emulator.capture.pcapread import Reassembler, parse_tcp, read_packets
    got: dict[int, bytearray] = {}

    class Sink:
        def __init__(self, st):
            self.st = st

        def data(self, from_a, payload, frame):
            if from_a:
                got.setdefault(self.st.number, bytearray()).extend(payload)

        def gap(self, from_a, frame):
            raise AssertionError("no hole expected")

    r = Reassembler(Sink)
    for p in read_packets(path):
        r.feed(parse_tcp(p))
    assert sorted(bytes(v) for v in got.values()) == sorted(bytes([i]) * 1000 for i in range(4))


@needs_tshark
def test_tcp_path_capture_decodes_cleanly_and_agrees_with_tshark(tmp_path):
    path = str(tmp_path / "tcp.pcap")
    status = record_tcp_path(path)
    assert status == 0
    assert_clean_for_tshark(path)
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username", "dcerpc.auth_level")
    assert users == [["bob", "2"]]
    rows = tshark_fields(path, "dcerpc.pkt_type == 11", "dcerpc.cn_bind_to_uuid")
    assert rows and rows[0][0] == EMSMDB[0]
    conns = analyse(path).connections
    [c] = conns
    assert (c.identity_source, c.mechanism, c.user, c.domain, c.auth_level) == (
        "rpc_auth", "ntlm", "bob", "CORP", "connect")
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecSuccess")]


@needs_tshark
def test_pipe_path_capture_decodes_cleanly_and_agrees_with_tshark(tmp_path):
    path = str(tmp_path / "np.pcap")
    status = record_pipe_path(path)
    assert status == 0x3F2  # ecLoginPerm: alice may not open bob's mailbox
    assert_clean_for_tshark(path)
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username")
    names = tshark_fields(path, "smb2.filename", "smb2.filename")
    [c] = analyse(path).connections
    assert [u[0] for u in users] == [c.smb_user] == ["alice"]
    assert c.pipes[0] in {n[0] for n in names}
    assert (c.transport, c.identity_source, c.user) == ("ncacn_np", "smb_session", "alice")
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecLoginPerm")]
    assert c.binds and all(b.auth_type == "none" for b in c.binds)


@needs_tshark
def test_smb1_pipe_path_capture_agrees_with_tshark(tmp_path):
    from impacket.smb import SMB_DIALECT
    path = str(tmp_path / "np1.pcap")
    assert record_pipe_path(path, SMB_DIALECT) == 0x3F2
    assert_clean_for_tshark(path)
    files = {row[0].lstrip("\\") for row in tshark_fields(path, "smb.cmd == 0xa2", "smb.file")}
    users = tshark_fields(path, "ntlmssp.messagetype == 3", "ntlmssp.auth.username")
    [c] = analyse(path).connections
    assert c.pipes[0] in files and [u[0] for u in users] == ["alice"]
    assert (c.identity_source, c.user, c.smb_user) == ("smb_session", "alice", "alice")
    assert any(e["kind"] == "smb.negotiate" and e["dialect"] == "NT LM 0.12" for e in c.events)
    assert [(e.user_dn, e.status_name) for e in c.emsmdb] == [(BOB_DN, "ecLoginPerm")]


def test_frames_are_the_bytes_scapy_builds(tmp_path):
    """The recorder packs headers itself for speed; scapy, an independent implementation of
    Ethernet, IPv4 and TCP, must build the very same bytes (checksums included) for every frame,
    and read the file back as the same records."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import RawPcapReader

    path = str(tmp_path / "frames.pcap")
    client, server = ("127.0.0.1", 50123), ("127.0.0.1", 445)
    with CaptureWriter(path, clock=fake_clock(), mss=100) as w:
        s = w.stream(client, server)
        for size in (1, 2, 99, 100, 101, 333):          # odd and even lengths, one and many segments
            s.client_data(bytes(range(256))[:size] * 1)
            s.server_data(b"\xff" * size)
        s.close(by="server")
    records = list(RawPcapReader(path))
    assert len(records) > 20
    for n, (raw, _meta) in enumerate(records, 1):
        got = Ether(raw)
        rebuilt = (Ether(src=got.src, dst=got.dst)
                   / IP(src=got[IP].src, dst=got[IP].dst, id=got[IP].id, flags="DF", ttl=128)
                   / TCP(sport=got[TCP].sport, dport=got[TCP].dport, seq=got[TCP].seq, ack=got[TCP].ack,
                         flags=int(got[TCP].flags), window=65535)
                   / bytes(got[TCP].payload))
        assert bytes(rebuilt) == raw, f"frame {n} differs from scapy's"
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head.hex() == "d4c3b2a1020004000000000000000000ffff000001000000"
