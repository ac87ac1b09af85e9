"""The streaming reader against the three real reference captures (cross-checked with tshark at
run time), and against broken, one-sided, reordered and duplicated input."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, wrpcap

from emulator.capture import CaptureError, analyse
from emulator.capture.pcapread import parse_tcp, read_packets

from harness.cast import REFERENCE
from harness.recording import record_tcp_path

REF = os.path.normpath(REFERENCE)
TSHARK = shutil.which("tshark")

needs_ref = pytest.mark.skipif(not os.path.isdir(REF),
                               reason=f"reference captures not found at {REF} (../shared is absent)")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


def ref(name: str) -> str:
    return os.path.join(REF, name)


def tshark_fields(path: str, display_filter: str, *fields: str) -> list[list[str]]:
    cmd = [TSHARK, "-r", path, "-Y", display_filter, "-T", "fields"]
    cmd += [x for f in fields for x in ("-e", f)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------- reference captures


@needs_ref
def test_mapi_pcap_is_the_explicit_credentials_path():
    conns = analyse(ref("mapi.pcap")).connections
    [c] = [c for c in conns if c.emsmdb]
    assert (c.transport, c.identity_source, c.mechanism, c.auth_level) == ("ncacn_ip_tcp", "rpc_auth", "ntlm", "connect")
    assert (c.user, c.domain) == ("ALeonard", "CNAMIS")
    [call] = c.emsmdb
    assert call.call == "EcDoConnect"
    assert call.user_dn == "/o=SolutionsIQ/ou=CNAMIS/cn=Recipients/cn=ALEONARD"
    assert (call.status, call.status_name) == ("0x00000000", "ecSuccess")


@needs_ref
@needs_tshark
def test_mapi_pcap_agrees_with_tshark():
    path = ref("mapi.pcap")
    conns = analyse(path).connections
    auths = tshark_fields(path, "ntlmssp.messagetype == 3", "frame.number", "tcp.stream",
                          "ntlmssp.auth.username", "ntlmssp.auth.domain", "dcerpc.auth_level")
    ours = {(e["frame"], c.stream, e["user"], e["domain"]) for c in conns for e in c.events
            if e["kind"] == "ntlm.authenticate"}
    assert ours == {(int(f), int(s), u, d) for f, s, u, d, _ in auths}
    levels = {int(lv) for *_, lv in auths}
    assert {c.auth_level for c in conns if c.identity_source == "rpc_auth"} == \
        {["none", "none", "connect", "call", "packet", "integrity", "privacy"][lv] for lv in levels}
    names = tshark_fields(path, "mapi.EcDoConnect.name", "frame.number", "mapi.EcDoConnect.name")
    calls = [e for c in conns for e in c.emsmdb]
    assert [(e.frame, e.user_dn) for e in calls] == [(int(f), n) for f, n in names]
    statuses = tshark_fields(path, "mapi && dcerpc.opnum == 0 && dcerpc.pkt_type == 2", "frame.number",
                             "mapi.MAPISTATUS_status")
    assert [(e.response_frame, e.status) for e in calls] == [(int(f), s) for f, s in statuses]
    # Every SMB file tshark names in the \lsarpc stream is a pipe we followed.
    files = {row[0].lstrip("\\") for row in tshark_fields(path, "smb.cmd == 0xa2", "smb.file")}
    assert {p for c in conns for p in c.pipes} <= files


@needs_ref
def test_raw_ntlm_in_smb_is_the_inherited_identity_path():
    conns = analyse(ref("raw_ntlm_in_smb.pcap")).connections
    assert {c.pipes[0] for c in conns} == {"srvsvc", "lsarpc"}
    for c in conns:
        assert (c.transport, c.identity_source) == ("ncacn_np", "smb_session")
        assert c.user == c.smb_user == "test"
        assert c.binds and all(b.auth_type == "none" and b.auth_level == "none" for b in c.binds)
        assert c.smb_session_frame is not None


@needs_ref
@needs_tshark
def test_raw_ntlm_in_smb_agrees_with_tshark():
    path = ref("raw_ntlm_in_smb.pcap")
    conns = analyse(path).connections
    [[frame, user]] = tshark_fields(path, "ntlmssp.messagetype == 3", "frame.number", "ntlmssp.auth.username")
    for c in conns:
        [auth] = [e for e in c.events if e["kind"] == "ntlm.authenticate"]
        assert (auth["frame"], auth["user"]) == (int(frame), user)
    binds = tshark_fields(path, "dcerpc.pkt_type == 11", "frame.number", "smb.file", "dcerpc.auth_type")
    assert {(int(f), fname.split(",")[0].lstrip("\\")) for f, fname, *_ in binds} == \
        {(b.frame, c.pipes[0]) for c in conns for b in c.binds}
    assert all(len(row) < 3 or row[2] == "" for row in binds)  # no auth verifier on any bind


@needs_ref
def test_dce_rpc_ntlm_is_spnego_at_integrity():
    [c] = analyse(ref("dce_rpc_ntlm.pcapng")).connections
    assert (c.identity_source, c.mechanism, c.auth_level) == ("rpc_auth", "spnego-ntlm", "integrity")
    assert (c.user, c.domain) == ("Administrator", "BLACKCLOVER")
    assert any(e["kind"] == "kerberos.token" for e in c.events)  # tried first, then NTLM


@needs_ref
@needs_tshark
def test_dce_rpc_ntlm_agrees_with_tshark():
    path = ref("dce_rpc_ntlm.pcapng")
    [c] = analyse(path).connections
    [[frame, user, level]] = tshark_fields(path, "ntlmssp.messagetype == 3", "frame.number",
                                           "ntlmssp.auth.username", "dcerpc.auth_level")
    assert (c.identity_frame, c.user, c.auth_level) == (int(frame), user, "integrity")
    assert level == "5"


@needs_ref
@needs_tshark
def test_stream_and_frame_numbers_are_wiresharks():
    path = ref("mapi.pcap")
    frames = sum(1 for _ in read_packets(path))
    assert str(frames) == subprocess.run([TSHARK, "-r", path, "-T", "fields", "-e", "frame.number"],
                                         capture_output=True, text=True).stdout.split()[-1]
    binds = tshark_fields(path, "dcerpc.pkt_type == 11", "frame.number", "tcp.stream")
    ours = {(b.frame, c.stream) for c in analyse(path).connections for b in c.binds}
    assert ours == {(int(f), int(s)) for f, s in binds}


# ------------------------------------------------------------------------- built captures


def _segments(path: str):
    return [parse_tcp(p) for p in read_packets(path)]


def _rebuild(segs, out: str) -> None:
    frames = []
    for s in segs:
        frames.append(Ether() / IP(src=s.src[0], dst=s.dst[0]) /
                      TCP(sport=s.src[1], dport=s.dst[1], seq=s.seq, ack=s.ack, flags=s.flags) / s.payload)
    wrpcap(out, frames)


def _skeleton(path: str):
    return [(c.identity_source, c.user, c.auth_level, [(e.user_dn, e.status_name) for e in c.emsmdb])
            for c in analyse(path).connections]


@pytest.fixture(scope="module")
def tcp_capture(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cap") / "tcp.pcap")
    assert record_tcp_path(path) == 0
    return path


def test_reordered_and_duplicated_segments_give_the_same_events(tcp_capture, tmp_path):
    want = _skeleton(tcp_capture)
    assert want[0][0] == "rpc_auth"
    segs = _segments(tcp_capture)
    # Split every data segment in three, then shuffle neighbours and retransmit some pieces.
    pieces = []
    for s in segs:
        if len(s.payload) > 6:
            n = len(s.payload) // 3
            for lo, hi in ((0, n), (n, 2 * n), (2 * n, len(s.payload))):
                pieces.append(type(s)(s.frame, s.time, s.src, s.dst, s.seq + lo, s.ack, s.flags,
                                      s.payload[lo:hi]))
        else:
            pieces.append(s)
    rng = random.Random(7)
    messy = []
    i = 0
    while i < len(pieces):
        chunk = pieces[i:i + 3]
        if all(c.payload for c in chunk):
            rng.shuffle(chunk)
        messy.extend(chunk)
        if chunk[0].payload and rng.random() < 0.5:
            messy.append(chunk[0])  # a retransmission
        i += 3
    out = str(tmp_path / "messy.pcap")
    _rebuild(messy, out)
    assert _skeleton(out) == want


def test_capture_starting_mid_stream_is_partial_but_readable(tcp_capture, tmp_path):
    segs = _segments(tcp_capture)
    out = str(tmp_path / "late.pcap")
    _rebuild(segs[3:], out)  # no SYN, no SYN-ACK
    [c] = analyse(out).connections
    assert c.partial and c.identity_source == "rpc_auth"


def test_pcapng_and_other_link_types_read_the_same(tcp_capture, tmp_path):
    from scapy.layers.l2 import CookedLinux
    want = _skeleton(tcp_capture)
    segs = _segments(tcp_capture)
    ng = str(tmp_path / "x.pcapng")
    with PcapNgWriter(ng) as w:
        for s in segs:
            w.write(Ether() / IP(src=s.src[0], dst=s.dst[0]) /
                    TCP(sport=s.src[1], dport=s.dst[1], seq=s.seq, ack=s.ack, flags=s.flags) / s.payload)
    assert _skeleton(ng) == want
    sll = str(tmp_path / "sll.pcap")
    wrpcap(sll, [CookedLinux(proto=0x0800) / IP(src=s.src[0], dst=s.dst[0]) /
                 TCP(sport=s.src[1], dport=s.dst[1], seq=s.seq, ack=s.ack, flags=s.flags) / s.payload
                 for s in segs])
    assert _skeleton(sll) == want
    raw = str(tmp_path / "raw.pcap")
    wrpcap(raw, [IP(src=s.src[0], dst=s.dst[0]) /
                 TCP(sport=s.src[1], dport=s.dst[1], seq=s.seq, ack=s.ack, flags=s.flags) / s.payload
                 for s in segs], linktype=101)
    assert _skeleton(raw) == want


def _expect_capture_error(path: str, words: str) -> str:
    with pytest.raises(CaptureError) as info:
        analyse(path)
    assert words in str(info.value)
    return str(info.value)


def test_truncated_file(tcp_capture, tmp_path):
    data = open(tcp_capture, "rb").read()
    cut = str(tmp_path / "cut.pcap")
    open(cut, "wb").write(data[: len(data) - 7])
    _expect_capture_error(cut, "truncated")
    header_only = str(tmp_path / "h.pcap")
    open(header_only, "wb").write(data[:10])
    _expect_capture_error(header_only, "truncated")


def test_corrupted_record_length(tcp_capture, tmp_path):
    data = bytearray(open(tcp_capture, "rb").read())
    data[24 + 8:24 + 12] = (0x7FFFFFF0).to_bytes(4, "little")  # first record's caplen
    bad = str(tmp_path / "bad.pcap")
    open(bad, "wb").write(bytes(data))
    _expect_capture_error(bad, "corrupt")


def test_random_corruption_never_raises_anything_else(tcp_capture, tmp_path):
    data = open(tcp_capture, "rb").read()
    rng = random.Random(3)
    for n in range(40):
        mutated = bytearray(data)
        for _ in range(20):
            mutated[rng.randrange(24, len(mutated))] = rng.randrange(256)
        p = str(tmp_path / f"m{n}.pcap")
        open(p, "wb").write(bytes(mutated))
        try:
            analyse(p)
        except CaptureError:
            pass


def test_not_a_capture(tmp_path):
    p = str(tmp_path / "notes.txt")
    open(p, "w").write("hello, this is not a pcap file at all\n")
    _expect_capture_error(p, "not a pcap or pcapng")
    empty = str(tmp_path / "empty.pcap")
    open(empty, "wb").close()
    _expect_capture_error(empty, "not a capture")
    _expect_capture_error(str(tmp_path / "missing.pcap"), "cannot open")


def test_capture_without_tcp(tmp_path):
    p = str(tmp_path / "udp.pcap")
    wrpcap(p, [Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=137, dport=137) / b"x" * 40
               for _ in range(3)])
    _expect_capture_error(p, "no TCP")


def test_only_one_direction_of_the_stream(tcp_capture, tmp_path):
    segs = _segments(tcp_capture)
    client = segs[0].src
    out = str(tmp_path / "half.pcap")
    _rebuild([s for s in segs if s.src == client], out)
    msg = _expect_capture_error(out, "only one direction")
    assert "stream 0" in msg


def test_cli_prints_the_message_and_exits_nonzero(tmp_path):
    p = str(tmp_path / "notes.txt")
    open(p, "w").write("plain text")
    out = subprocess.run([sys.executable, "-m", "emulator.cli", "explain", p], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "not a pcap or pcapng" in out.stderr and "Traceback" not in out.stderr


def test_progress_reports_bytes_read(tcp_capture):
    seen = []
    analyse(tcp_capture, lambda done, total: seen.append((done, total)))
    size = os.path.getsize(tcp_capture)
    assert seen and seen[-1] == (size, size)
    assert all(d <= t for d, t in seen)


def _raw_frame(src, dst, seq, ack, flags, payload):
    import struct
    tcp = struct.pack(">HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      65535, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                     bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


def test_memory_stays_flat_on_a_long_capture(tcp_capture, tmp_path):
    """8 MB of EcDoRpc calls on one connection: peak memory must not follow the file size."""
    import struct
    import tracemalloc
    from emulator.rpc.pdu import FrameBuffer
    segs = _segments(tcp_capture)
    client, server = segs[0].src, segs[0].dst
    cpdus = FrameBuffer().feed(b"".join(s.payload for s in segs if s.src == client))
    spdus = FrameBuffer().feed(b"".join(s.payload for s in segs if s.src == server))
    bind, auth3, request = cpdus[0], cpdus[1], cpdus[2]
    bind_ack, response = spdus[0], spdus[1]
    path = str(tmp_path / "long.pcap")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        cseq, sseq = 1000, 5000

        def rec(frame):
            f.write(struct.pack("<IIII", 1_764_000_000, 0, len(frame), len(frame)) + frame)

        rec(_raw_frame(client, server, cseq - 1, 0, 0x02, b""))
        rec(_raw_frame(server, client, sseq - 1, cseq, 0x12, b""))
        for pdu, from_client in ((bind, True), (bind_ack, False), (auth3, True)):
            if from_client:
                rec(_raw_frame(client, server, cseq, sseq, 0x18, pdu))
                cseq += len(pdu)
            else:
                rec(_raw_frame(server, client, sseq, cseq, 0x18, pdu))
                sseq += len(pdu)
        req = bytearray(request)
        req[22] = 2  # EcDoRpc, which the reader follows without keeping anything
        size = 0
        call = 100
        while size < 8 << 20:
            call += 1
            struct.pack_into("<I", req, 12, call)
            rsp = bytearray(response)
            struct.pack_into("<I", rsp, 12, call)
            rec(_raw_frame(client, server, cseq, sseq, 0x18, bytes(req)))
            cseq += len(req)
            rec(_raw_frame(server, client, sseq, cseq, 0x18, bytes(rsp)))
            sseq += len(rsp)
            size += len(req) + len(rsp) + 140
    tracemalloc.start()
    try:
        conns = analyse(path).connections
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [c] = conns
    assert c.identity_source == "rpc_auth" and not c.partial
    assert peak < 2 << 20, f"peak {peak >> 10} KiB while reading a {size >> 20} MiB capture"


def test_terminal_progress_bar_only_on_a_tty(tcp_capture):
    import io
    from emulator.cli import terminal_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert terminal_progress(io.StringIO()) is None
    out = Tty()
    analyse(tcp_capture, terminal_progress(out))
    assert "reading [" in out.getvalue() and out.getvalue().endswith("\n")


@needs_ref
@pytest.mark.parametrize("name", ["raw_ntlm_in_smb.pcap", "dce_rpc_ntlm.pcapng"])
def test_mutated_real_captures_give_results_or_capture_errors(name, tmp_path):
    """Flip bytes inside SMB, DCE/RPC and NTLMSSP payloads of real traffic: the reader either
    reports what it could read or raises CaptureError - never another exception."""
    data = open(ref(name), "rb").read()
    rng = random.Random(11)
    for n in range(30):
        mutated = bytearray(data)
        for _ in range(8):
            pos = rng.randrange(len(data) // 8, len(data))
            mutated[pos] = rng.randrange(256)
        p = str(tmp_path / f"m{n}{os.path.splitext(name)[1]}")
        open(p, "wb").write(bytes(mutated))
        try:
            analyse(p)
        except CaptureError:
            pass


# ------------------------------------------------------------------------- tokens the live parsers read


def _authenticate(user: str, domain: str, nt: bytes, lm: bytes = b"\x00" * 24) -> bytes:
    """An AUTHENTICATE_MESSAGE laid out by impacket's structure (MS-NLMP 2.2.1.3)."""
    from impacket import ntlm as imp
    m = imp.NTLMAuthChallengeResponse()
    m["flags"] = imp.NTLMSSP_NEGOTIATE_UNICODE | imp.NTLMSSP_NEGOTIATE_NTLM
    m["domain_name"] = domain.encode("utf-16-le")
    m["user_name"] = user.encode("utf-16-le")
    m["host_name"] = "WS1".encode("utf-16-le")
    m["lanman"], m["ntlm"], m["session_key"] = lm, nt, b""
    return m.getData()


def _ntlmv2_response(av_pairs: bytes) -> bytes:
    # NTProofStr, then NTLMv2_CLIENT_CHALLENGE (MS-NLMP 2.2.2.7): RespType, HiRespType,
    # reserved, timestamp, client challenge, reserved, then the AV pairs as the client sent them.
    header = b"\x01\x01" + b"\x00" * 6 + b"\x11" * 8 + b"\x22" * 8 + b"\x00" * 4
    return b"\x33" * 16 + header + av_pairs


AV_LISTS = {
    "empty": b"",
    "unterminated": b"\x02\x00\x08\x00" + "CORP".encode("utf-16-le"),
    "odd": b"\x02\x00\x08\x00" + "CORP".encode("utf-16-le") + b"\x07\x00\x30\x00\x01",
    "terminated": b"\x02\x00\x08\x00" + "CORP".encode("utf-16-le") + b"\x00\x00\x00\x00",
}


@pytest.mark.parametrize("shape", sorted(AV_LISTS))
def test_ntlmv2_identity_is_read_whatever_the_av_pair_list(shape):
    from emulator.capture.authtokens import inspect_token
    from emulator.ntlm import messages
    from emulator.sansio import ProtocolError

    token = _authenticate("bob", "CORP", _ntlmv2_response(AV_LISTS[shape]))
    info = inspect_token(token)
    assert (info.mechanism, info.message, info.user, info.domain, info.ntlm_version) == \
        ("ntlm", "authenticate", "bob", "CORP", "v2")
    # The live acceptor's own AV-pair reader stays strict: what it refused, it still refuses.
    if shape in ("empty", "unterminated", "odd"):
        with pytest.raises(ProtocolError):
            messages.parse_av_pairs(AV_LISTS[shape])


def test_ntlmv1_and_anonymous_authenticate():
    from emulator.capture.authtokens import inspect_token

    v1 = inspect_token(_authenticate("carol", "CORP", b"\x44" * 24))
    assert (v1.user, v1.ntlm_version, v1.anonymous) == ("carol", "v1", False)
    anon = inspect_token(_authenticate("", "", b"", lm=b"\x00"))
    assert anon.anonymous and anon.message == "authenticate"


def test_schannel_negotiate_names_the_machine_account():
    from emulator.capture.authtokens import AUTH_TYPE_SCHANNEL, inspect_token

    # NL_AUTH_MESSAGE (MS-NRPC 2.2.1.3.1): negotiate, flags 0x17 (OEM domain, OEM computer,
    # DNS domain, UTF-8 computer), then the names in flag order.
    token = (b"\x00\x00\x00\x00\x17\x00\x00\x00" + b"THESHIRE\x00" + b"WORKSTATION6\x00"
             + b"\x08theshire\x05local\x00" + b"\x0cWORKSTATION6\x00")
    info = inspect_token(token, AUTH_TYPE_SCHANNEL)
    assert (info.mechanism, info.user, info.domain) == ("schannel", "WORKSTATION6$", "THESHIRE")
    assert inspect_token(token[:6], AUTH_TYPE_SCHANNEL).user is None  # cut short: no name, no error


# ------------------------------------------------------------------------- big-endian, multi-fragment


EMSMDB_UUID = "a4f1db00-ca47-1067-b31f-00dd010662da"
NDR32 = "8a885d04-1ceb-11c9-9fe8-08002b104860"


def _be_pdu(ptype: int, flags: int, call_id: int, body: bytes) -> bytes:
    """A DCE/RPC PDU from a big-endian sender (NDR drep 0x00, C706 14.1)."""
    import struct
    return struct.pack(">BBBB4sHHI", 5, 0, ptype, flags, b"\x00\x00\x00\x00", 16 + len(body), 0,
                       call_id) + body


def _be_syntax(u: str, major: int, minor: int) -> bytes:
    import struct
    import uuid
    return uuid.UUID(u).bytes + struct.pack(">I", major | minor << 16)


def _be_conversation(dn: str, status: int) -> list[tuple[bool, bytes]]:
    import struct
    bind = _be_pdu(11, 3, 1, struct.pack(">HHI", 4280, 4280, 0) + b"\x01\x00\x00\x00"
                   + struct.pack(">HBB", 0, 1, 0) + _be_syntax(EMSMDB_UUID, 0, 81) + _be_syntax(NDR32, 2, 0))
    ack = _be_pdu(12, 3, 1, struct.pack(">HHIH", 4280, 4280, 0x1234, 6) + b"49601\x00"
                  + b"\x01\x00\x00\x00" + struct.pack(">HH", 0, 0) + _be_syntax(NDR32, 2, 0))
    text = dn.encode("ascii") + b"\x00"
    stub = struct.pack(">III", len(text), 0, len(text)) + text
    stub += b"\x00" * (-len(stub) % 4) + struct.pack(">7I4HI", 0, 0, 0, 1252, 1033, 1033, 0, 1, 11, 0, 8206, 0)
    half = len(stub) // 2
    prefix = struct.pack(">IHH", len(stub), 0, 0)  # alloc_hint, context, opnum 0 (EcDoConnect)
    first = _be_pdu(0, 1, 2, prefix + stub[:half])
    last = _be_pdu(0, 2, 2, prefix + stub[half:])
    reply = _be_pdu(2, 3, 2, struct.pack(">IHBB", 24, 0, 0, 0) + b"\x00" * 20 + struct.pack(">I", status))
    return [(True, bind), (False, ack), (True, first), (True, last), (False, reply)]


def test_big_endian_multi_fragment_ecdoconnect_agrees_with_tshark(tmp_path):
    """A big-endian client's bind and a two-fragment EcDoConnect over TCP: explain reads the
    interface, the DN and the status, and tshark reads the same DN from the same bytes."""
    client, server = ("10.1.1.1", 50123), ("10.1.1.2", 49601)
    seq = {True: 1000, False: 5000}
    frames = [_raw_frame(client, server, 999, 0, 0x02, b""), _raw_frame(server, client, 4999, 1000, 0x12, b"")]
    for from_client, pdu in _be_conversation("/o=Corp/ou=Site/cn=Recipients/cn=bob", 0x3F2):
        src, dst = (client, server) if from_client else (server, client)
        frames.append(_raw_frame(src, dst, seq[from_client], seq[not from_client], 0x18, pdu))
        seq[from_client] += len(pdu)
    path = str(tmp_path / "be.pcap")
    wrpcap(path, [Ether(f) for f in frames])
    [c] = analyse(path).connections
    assert [(b.interface_name, b.result) for b in c.binds] == [("emsmdb", "ok")]
    assert (c.identity_source, c.mechanism) == ("anonymous", "none")
    [call] = c.emsmdb
    assert (call.user_dn, call.status) == ("/o=Corp/ou=Site/cn=Recipients/cn=bob", "0x000003f2")
    if TSHARK:
        names = tshark_fields(path, "dcerpc", "mapi.EcDoConnect.name", "dcerpc.drep.byteorder")
        assert ["/o=Corp/ou=Site/cn=Recipients/cn=bob"] in [[r[0]] for r in names if r and r[0]]


def test_undecodable_rpc_stream_is_reported_malformed_beside_a_good_one(tmp_path):
    """One stream of garbage that starts like DCE/RPC, one good stream: the good one is read,
    the bad one is listed as malformed, neither hides the other."""
    good = _be_conversation("/o=Corp/ou=Site/cn=Recipients/cn=alice", 0)
    bad = [(True, b"\x05\x00\x0b\x03\x10\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00"),
           (True, b"\x06\x09" + b"\xee" * 40), (False, b"\x05\x00\x0c\x03\x10\x00\x00\x00\xff\xff")]
    frames = []
    for conv, port in ((bad, 50200), (good, 50201)):
        client, server = ("10.1.1.1", port), ("10.1.1.2", 49601)
        seq = {True: 1000, False: 5000}
        frames += [_raw_frame(client, server, 999, 0, 0x02, b""), _raw_frame(server, client, 4999, 1000, 0x12, b"")]
        for from_client, pdu in conv:
            src, dst = (client, server) if from_client else (server, client)
            frames.append(_raw_frame(src, dst, seq[from_client], seq[not from_client], 0x18, pdu))
            seq[from_client] += len(pdu)
    path = str(tmp_path / "mixed.pcap")
    wrpcap(path, [Ether(f) for f in frames])
    analysis = analyse(path)
    assert [c.emsmdb[0].user_dn for c in analysis.connections if c.emsmdb] == \
        ["/o=Corp/ou=Site/cn=Recipients/cn=alice"]
    notes = {n.stream: n for n in analysis.stream_notes}
    assert notes[0].malformed and all(m["kind"] == "malformed" for m in notes[0].malformed)
    assert 1 not in notes or not notes[1].malformed


def test_bind_nak_after_an_authenticated_bind_acts_for_nobody(tmp_path):
    """A bind that offers NTLM and is refused with a bind_nak: the server acted on nobody,
    as tshark's reading of such a capture has it (the bind_nak is in the same stream)."""
    import struct

    from impacket import ntlm as imp

    from emulator.rpc import pdu as P

    negotiate = imp.getNTLMSSPType1("", "", signingRequired=True).getData()
    body = struct.pack("<HHI", 4280, 4280, 0) + b"\x01\x00\x00\x00" + struct.pack("<HBB", 0, 1, 0)
    body += P.syntax_bytes((EMSMDB_UUID, (0, 81))) + P.syntax_bytes(P.NDR32)
    bind = P.assemble(P.BIND, 3, 1, body, auth=(10, 2, 0, negotiate))
    nak = P.assemble(P.BIND_NAK, 3, 1, P.bind_nak_body(P.NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED))
    client, server = ("10.1.1.1", 50300), ("10.1.1.2", 49601)
    frames = [_raw_frame(client, server, 999, 0, 0x02, b""), _raw_frame(server, client, 4999, 1000, 0x12, b""),
              _raw_frame(client, server, 1000, 5000, 0x18, bind),
              _raw_frame(server, client, 5000, 1000 + len(bind), 0x18, nak)]
    path = str(tmp_path / "nak.pcap")
    wrpcap(path, [Ether(f) for f in frames])
    [c] = analyse(path).connections
    assert (c.identity_source, c.user, c.mechanism, c.auth_type) == ("none", None, "ntlm", "ntlm")
    assert [b.result for b in c.binds] == ["nak"]
    if TSHARK:
        assert tshark_fields(path, "dcerpc.pkt_type == 13", "tcp.stream") == [["0"]]
