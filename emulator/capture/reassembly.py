"""TCP reassembly: ordered byte runs per stream and direction, handed to one sink per stream.

Stream numbers follow tshark's tcp.stream: the order in which a conversation's first segment
appears. Only small per-stream state is kept, so memory does not grow with the capture.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

from .packets import MASK32, Endpoint, Segment, endpoint_int, endpoint_text

# Bytes we hold for one direction while waiting for a missing segment before we give up on it
# Bytes we hold for one direction while waiting for a missing segment before we give up on it
# and skip the hole (the stream is then marked partial).
MAX_PENDING_BYTES = 1 << 20
MAX_PENDING_SEGMENTS = 512


FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

# Ended streams are remembered (by 4-tuple, as a bare stream number) so that their late ACKs
# and retransmissions are not counted as new streams, exactly as tshark numbers them. The
# memory of ended streams is bounded: past this many, the oldest are forgotten.
MAX_ENDED_STREAMS = 1 << 16

# A stream that carries no segment for this long (capture time, the latest timestamp seen so
# far) is ended, so captures full of connections that never close (the capture started or
# stopped while they were open) do not hold them all. Should it carry data again later, it
# resumes under the same stream number as a partial stream: its output is then split in two,
# never lost.
IDLE_TIMEOUT = 900
SWEEP_EVERY = 60


class StreamSink(Protocol):
    def data(self, from_a: bool, payload: bytes, frame: int) -> None: ...
    def gap(self, from_a: bool, frame: int) -> None: ...
    # Optional: `close()` is called once the connection has ended (RST, or FIN both ways, or
    # the end of the capture), so the sink can settle and drop its buffers; a long capture
    # then holds state only for open streams.


class _Direction:
    __slots__ = ("next_seq", "pending", "pending_bytes", "bytes_seen", "fin")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.pending: dict[int, tuple[bytes, int]] = {}
        self.pending_bytes = 0
        self.bytes_seen = 0
        self.fin = False


class TcpStream:
    """One TCP conversation. Side A is the side that sent the first segment we saw (the
    client when the SYN was captured)."""
    __slots__ = ("number", "a_ep", "b_ep", "first_frame", "saw_syn", "partial", "closed", "sink",
                 "dirs", "key", "last_seen", "_a", "_b")

    def __init__(self, number: int, a_ep: int, b_ep: int, first_frame: int) -> None:
        self.number, self.a_ep, self.b_ep, self.first_frame = number, a_ep, b_ep, first_frame
        self.saw_syn = self.partial = self.closed = False
        self.sink: StreamSink | None = None
        self.dirs = (_Direction(), _Direction())
        self.key = 0
        self.last_seen = 0.0
        self._a: Endpoint | None = None
        self._b: Endpoint | None = None

    @property
    def a(self) -> Endpoint:
        if self._a is None:
            self._a = endpoint_text(self.a_ep)
        return self._a

    @property
    def b(self) -> Endpoint:
        if self._b is None:
            self._b = endpoint_text(self.b_ep)
        return self._b

    @property
    def client(self) -> Endpoint:
        return self.a

    @property
    def server(self) -> Endpoint:
        return self.b

    def one_sided(self) -> bool:
        return (self.dirs[0].bytes_seen > 0) != (self.dirs[1].bytes_seen > 0)

    def has_payload(self) -> bool:
        return self.dirs[0].bytes_seen > 0 or self.dirs[1].bytes_seen > 0

    def ignore(self) -> None:
        """The sink has seen enough to know the stream carries nothing it reads: from now on
        only byte counts are kept, with no reassembly."""
        self.sink = None
        for d in self.dirs:
            d.pending.clear()
            d.pending_bytes = 0


def _seq_lt(x: int, y: int) -> bool:
    return ((x - y) & 0xFFFFFFFF) > 0x7FFFFFFF


class Reassembler:
    """Turns segments into ordered byte runs per stream and direction.

    Retransmitted bytes (already delivered) are dropped; segments ahead of the expected
    sequence number wait (bounded) for the hole to fill. A capture that starts mid-stream
    starts each direction at its first segment; a hole that never fills is skipped and the
    stream marked partial, and the sink is told so that it can resynchronise.

    With `keep_streams=False` only open streams are held: an ended stream is handed to
    `on_end` and then forgotten but for its number, so memory does not grow with the capture.
    """

    def __init__(self, sink_factory: Callable[[TcpStream], StreamSink | None],
                 keep_streams: bool = True, on_end: Callable[[TcpStream], None] | None = None) -> None:
        self._by_key: dict[int, TcpStream | int] = {}
        self._open: dict[int, TcpStream] = {}
        self._ended: deque[int] = deque()
        self._sink_factory = sink_factory
        self._keep = keep_streams
        self._on_end = on_end
        self.streams: list[TcpStream] = []
        self.stream_count = 0
        self.tcp_segments = 0
        self.partial_streams: list[int] = []
        self.two_sided = False  # some stream carried payload both ways
        self.first_one_sided: TcpStream | None = None
        self.now = 0.0  # the latest packet time seen (see clock)
        self._next_sweep = 0.0

    def clock(self, t: float) -> None:
        """The capture time of the packets about to be fed. Streams idle for IDLE_TIMEOUT are
        ended (only when ended streams are not kept, i.e. when streaming)."""
        if t <= self.now:
            return
        self.now = t
        if t >= self._next_sweep and not self._keep:
            self._next_sweep = t + SWEEP_EVERY
            idle_before = t - IDLE_TIMEOUT
            for st in [st for st in self._open.values() if st.last_seen < idle_before]:
                self._end(st, idle=True)

    def feed(self, seg: Segment) -> None:
        self.feed_raw(seg.frame, endpoint_int(seg.src), endpoint_int(seg.dst), seg.seq, seg.flags,
                      seg.payload)

    def feed_raw(self, frame: int, src: int, dst: int, seq: int, flags: int, payload: bytes) -> None:
        self.tcp_segments += 1
        key = (src << 176 | dst) if src <= dst else (dst << 176 | src)
        st = self._by_key.get(key)
        if st is None or flags & SYN:
            st = self._stream_for(st, key, frame, src, dst, flags, payload)
            if st is None:
                return
        elif st.__class__ is int:
            if st >= 0 or not payload:
                return  # a late segment of a stream that has ended
            st = self._resume(-st - 1, key, frame, src, dst)
        st.last_seen = self.now  # type: ignore[union-attr]
        idx = 0 if src == st.a_ep else 1  # type: ignore[union-attr]
        d = st.dirs[idx]  # type: ignore[union-attr]
        if flags & SYN:
            st.saw_syn = True  # type: ignore[union-attr]
            seq = (seq + 1) & MASK32
            d.next_seq = seq
        if payload:
            if st.sink is not None:  # type: ignore[union-attr]
                nxt = d.next_seq
                if nxt is None:
                    if not st.saw_syn:  # type: ignore[union-attr]
                        st.partial = True  # type: ignore[union-attr]
                    nxt = d.next_seq = seq
                if seq == nxt and not d.pending:
                    # The common case: the next bytes in order, nothing waiting.
                    n = len(payload)
                    d.next_seq = (seq + n) & MASK32
                    d.bytes_seen += n
                    st.sink.data(idx == 0, payload, frame)  # type: ignore[union-attr]
                else:
                    self._accept(st, idx, seq, payload, frame)  # type: ignore[arg-type]
            else:
                d.bytes_seen += len(payload)
        if flags & (FIN | RST):
            st.closed = True  # type: ignore[union-attr]
            d.fin = True
            if flags & RST or (st.dirs[0].fin and st.dirs[1].fin):  # type: ignore[union-attr]
                self._end(st)  # type: ignore[arg-type]

    def _stream_for(self, st: TcpStream | int | None, key: int, frame: int, src: int, dst: int,
                    flags: int, payload: bytes) -> TcpStream | None:
        new_connection = flags & SYN and not flags & ACK
        if st.__class__ is int:
            if new_connection:
                st = None
            elif st < 0 and payload:  # type: ignore[operator]
                return self._resume(-st - 1, key, frame, src, dst)  # type: ignore[operator]
            else:
                return None
        elif st is not None:
            if new_connection and (st.closed or st.has_payload()):  # type: ignore[union-attr]
                # The 4-tuple is reused by a new connection: tshark starts a new stream too.
                self._end(st)  # type: ignore[arg-type]
                st = None
            else:
                return st  # type: ignore[return-value]
        st = self._new_stream(self.stream_count, key, frame, src, dst)
        self.stream_count += 1
        if flags & SYN and flags & ACK:
            # We only saw the server's SYN-ACK: the receiver is the client.
            st.a_ep, st.b_ep = dst, src
        st.sink = self._sink_factory(st)
        return st

    def _new_stream(self, number: int, key: int, frame: int, src: int, dst: int) -> TcpStream:
        st = TcpStream(number, src, dst, frame)
        st.key = key
        self._by_key[key] = st
        self._open[number] = st
        if self._keep:
            self.streams.append(st)
        return st

    def _resume(self, number: int, key: int, frame: int, src: int, dst: int) -> TcpStream:
        """Data again on a stream ended for idleness: carry on under its number, as a stream
        picked up in the middle."""
        st = self._new_stream(number, key, frame, src, dst)
        st.partial = True
        st.sink = self._sink_factory(st)
        return st

    def _end(self, st: TcpStream, idle: bool = False) -> None:
        """The connection is over (RST, FIN both ways, its 4-tuple reused, or the capture
        ends): flush what waits behind holes, let the sink settle, and forget the stream."""
        if self._open.pop(st.number, None) is None:
            return
        self._finish(st)
        if st.has_payload():
            if st.one_sided():
                if self.first_one_sided is None:
                    self.first_one_sided = st
            else:
                self.two_sided = True
        if st.sink is not None:
            close = getattr(st.sink, "close", None)
            if close is not None:
                close()
            st.sink = None
        for d in st.dirs:
            d.pending.clear()
            d.pending_bytes = 0
        if st.partial:
            self.partial_streams.append(st.number)
        if self._on_end is not None:
            self._on_end(st)
        if not self._keep and self._by_key.get(st.key) is st:
            self._by_key[st.key] = -st.number - 1 if idle else st.number
            self._ended.append(st.key)
            if len(self._ended) > MAX_ENDED_STREAMS:
                old = self._ended.popleft()
                if self._by_key.get(old).__class__ is int:
                    del self._by_key[old]

    def _accept(self, st: TcpStream, idx: int, seq: int, payload: bytes, frame: int) -> None:
        d = st.dirs[idx]
        if d.next_seq is None:  # callers set it before handing over out-of-order bytes
            raise RuntimeError("reassembly: no sequence number for this direction yet")
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
        """The capture is over: every stream still open ends now, in stream order."""
        for st in list(self._open.values()):
            self._end(st)


