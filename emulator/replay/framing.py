"""Message boundaries: NetBIOS session messages for SMB (RFC 1002 4.3, MS-SMB2 2.1), DCE/RPC
fragments for RPC (C706 12.6.3.1 frag_length). A conversation becomes a list of exchanges:
one client message and the server messages the capture shows before the next one.

The same cutters frame the emulator's answers during the replay, so the capture's side and
ours are cut alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rpc import pdu as P
from ..sansio import ProtocolError
from .source import CapturedStream

SMB, RPC = "smb", "rpc"
SMB_PORTS = (445, 139)
NB_SESSION_MESSAGE, NB_SESSION_REQUEST, NB_KEEPALIVE = 0x00, 0x81, 0x85
NB_TYPES = (0x00, 0x81, 0x82, 0x83, 0x84, 0x85)
MAX_NETBIOS = 1 << 24


@dataclass
class Message:
    from_client: bool
    data: bytes
    frame: int          # the frame that completed it, as Wireshark shows a reassembled PDU


@dataclass
class Exchange:
    """One client message and the original server's answers to it."""
    index: int
    sent: Message
    answers: list[Message] = field(default_factory=list)


def kind_of(stream: CapturedStream) -> str | None:
    """SMB, RPC, or None for anything else. Decided by the first client bytes: the server
    port alone would send SMB on an odd port, or RPC on 445, to the wrong cutter."""
    first = first_bytes(stream, True)
    if len(first) >= 8 and first[0] == NB_SESSION_MESSAGE and first[4:8] in (b"\xffSMB", b"\xfeSMB"):
        return SMB
    if first[:1] in (bytes([NB_SESSION_REQUEST]),) and stream.server[1] in SMB_PORTS:
        return SMB
    if len(first) >= P.HEADER_SIZE and first[0] == 5 and first[1] in (0, 1) and first[2] in P.PTYPE_NAMES:
        return RPC
    return None


def starts_conversation(kind: str, first: bytes) -> bool:
    """Whether a client's first message opens a conversation (so a capture that missed the
    TCP handshake still holds all of it): an RPC bind; an SMB NEGOTIATE (SMB1 or SMB2) or a
    NetBIOS session request."""
    if kind == RPC:
        return len(first) > 2 and first[0] == 5 and first[2] == P.BIND
    if first[:1] == bytes([NB_SESSION_REQUEST]):
        return True
    if len(first) >= 18 and first[0] == NB_SESSION_MESSAGE:
        if first[4:8] == b"\xffSMB":
            return first[8] == 0x72
        if first[4:8] == b"\xfeSMB":
            return first[16:18] == b"\x00\x00"
    return False


def first_bytes(stream: CapturedStream, from_client: bool) -> bytes:
    return next((c.data for c in stream.chunks if c.from_client == from_client and c.data), b"")


def flipped(stream: CapturedStream) -> CapturedStream:
    """The stream with its sides swapped: for captures that missed the handshake and saw the
    server speak first."""
    from .source import Chunk

    return CapturedStream(stream.number, stream.server, stream.client, stream.saw_syn, stream.partial,
                          stream.gap_frame, [Chunk(not c.from_client, c.data, c.frame) for c in stream.chunks],
                          stream.size)


class Cutter:
    """Cuts one direction's byte stream into messages of one kind, whatever the TCP split."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._buf = bytearray()
        self._rpc = P.FrameBuffer(max_fragment_size=0xFFFF) if kind == RPC else None

    @property
    def pending(self) -> int:
        return self._rpc.pending if self._rpc is not None else len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete messages; raises ProtocolError when the bytes are not this framing."""
        if self._rpc is not None:
            return self._rpc.feed(data)
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            kind = self._buf[0]
            if kind not in NB_TYPES:
                raise ProtocolError("netbios", f"not a NetBIOS session message (type 0x{kind:02x})")
            length = int.from_bytes(self._buf[1:4], "big")
            if len(self._buf) < 4 + length:
                break
            out.append(bytes(self._buf[:4 + length]))
            del self._buf[:4 + length]
        return out


@dataclass
class Conversation:
    stream: CapturedStream
    kind: str
    exchanges: list[Exchange]
    # Where the capture stops being replayable, and why (lost bytes, foreign framing).
    cut_short: str | None = None
    unsolicited: list[Message] = field(default_factory=list)


def conversation(stream: CapturedStream, kind: str) -> Conversation:
    """The exchanges of a conversation, in capture order. A direction whose framing breaks
    (lost segments, bytes of another protocol) ends the replayable part there."""
    cutters = {True: Cutter(kind), False: Cutter(kind)}
    broken: dict[bool, int] = {}
    messages: list[Message] = []
    for chunk in stream.chunks:
        side = chunk.from_client
        if side in broken:
            continue
        if stream.gap_frame is not None and chunk.frame >= stream.gap_frame:
            broken[side] = chunk.frame
            continue
        try:
            for data in cutters[side].feed(chunk.data):
                messages.append(Message(side, data, chunk.frame))
        except ProtocolError:
            broken[side] = chunk.frame
    exchanges: list[Exchange] = []
    unsolicited: list[Message] = []
    for m in messages:
        if m.from_client:
            exchanges.append(Exchange(len(exchanges), m))
        elif exchanges:
            exchanges[-1].answers.append(m)
        else:
            unsolicited.append(m)
    cut = None
    if broken:
        frame = min(broken.values())
        cut = (f"the capture lost bytes or the framing breaks at frame {frame}; "
               f"the replay stops there")
        exchanges = [e for e in exchanges if e.sent.frame < frame]
    return Conversation(stream, kind, exchanges, cut, unsolicited)
