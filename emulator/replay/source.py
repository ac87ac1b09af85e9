"""Where replay gets its bytes: the client and server side of every TCP stream of a capture.

This is the one place that touches the capture reader (`emulator.capture.pcapread`): a single
function, `read_streams`, hands out per-stream, per-direction reassembled payload chunks with
Wireshark's frame numbers. Everything else in `emulator.replay` works on `CapturedStream`, so
this adapter is all that changes when the reader's modules move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capture.pcapread import CaptureError, TcpStream, reassemble

# Replay holds the selected conversations in memory; beyond this it asks for --stream.
MAX_KEPT_BYTES = 256 << 20


@dataclass
class Chunk:
    from_client: bool
    data: bytes
    frame: int


@dataclass
class CapturedStream:
    """One TCP conversation as the capture holds it. `client` is the side that sent the SYN
    (when the capture saw it); `gap_frame` is the first frame after bytes the capture lost."""
    number: int
    client: tuple[str, int] = ("", 0)
    server: tuple[str, int] = ("", 0)
    saw_syn: bool = False
    partial: bool = False
    gap_frame: int | None = None
    chunks: list[Chunk] = field(default_factory=list)
    size: int = 0


def read_streams(path: str, wanted: set[int] | None = None) -> list[CapturedStream]:
    """Every TCP stream of `path` (only those numbered in `wanted`, if given), in tcp.stream
    order, with its payload chunks in the order reassembly delivered them. Raises CaptureError
    for unreadable captures, captures without TCP and selections too large to hold."""
    kept: dict[int, tuple[TcpStream, CapturedStream]] = {}
    total = [0]

    class Sink:
        def __init__(self, cs: CapturedStream) -> None:
            self.cs = cs

        def data(self, from_a: bool, payload: bytes, frame: int) -> None:
            total[0] += len(payload)
            if total[0] > MAX_KEPT_BYTES:
                raise CaptureError(f"the selected conversations hold more than {MAX_KEPT_BYTES >> 20} MiB; "
                                   f"choose fewer with --stream N")
            self.cs.chunks.append(Chunk(from_a, bytes(payload), frame))
            self.cs.size += len(payload)

        def gap(self, from_a: bool, frame: int) -> None:
            if self.cs.gap_frame is None:
                self.cs.gap_frame = frame

    def sink_for(st: TcpStream) -> Sink | None:
        if wanted is not None and st.number not in wanted:
            return None
        if st.number in kept:  # resumed after idleness: the same conversation, now partial
            kept[st.number][1].partial = True
            return Sink(kept[st.number][1])
        cs = CapturedStream(st.number)
        kept[st.number] = (st, cs)
        return Sink(cs)

    reassemble(path, sink_for)
    out = []
    for number in sorted(kept):
        st, cs = kept[number]
        cs.client, cs.server = st.a, st.b
        cs.saw_syn = st.saw_syn
        cs.partial = cs.partial or st.partial
        out.append(cs)
    return out
