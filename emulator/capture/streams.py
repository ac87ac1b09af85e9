"""Per TCP stream: decide what it carries (NetBIOS/SMB or raw DCE/RPC) and walk it.

Captures may start in the middle of a conversation, so detection looks at the start of every
delivered segment until one begins like a known message; after that, lengths frame the stream.
When framing breaks (a lost segment, foreign bytes) the walker drops its buffer and looks for
the next plausible message start again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from ..sansio import ProtocolError
from .model import Connection, SmbSession, add_event
from .fileformat import CaptureError, ProgressFn
from .reassembly import Reassembler, TcpStream
from .scan import read_into as _read_into
from .rpcconn import ObservedRpcConnection
from .smbwalk import SmbWalker
from .kdc import KdcWalker, looks_like_kdc
from .unseal import Keyring

MAX_STREAM_NOTES = 16  # malformed messages kept per stream for its summary
MAX_MESSAGE = 1 << 24  # NetBIOS/SMB2 direct TCP allows 24-bit lengths
MAX_BUFFER = 1 << 20  # a message larger than this is skipped, not buffered
DETECT_TRIES = 64


def _looks_like_rpc(chunk: bytes) -> bool:
    return (len(chunk) >= 16 and chunk[0] == 5 and chunk[1] in (0, 1) and chunk[2] <= 20
            and chunk[4] & 0xEE == 0)


def _looks_like_smb(chunk: bytes) -> bool:
    return len(chunk) >= 8 and chunk[0] == 0 and chunk[4:8] in (b"\xffSMB", b"\xfeSMB", b"\xfdSMB")


@dataclass
class StreamSummary:
    """What one SMB or DCE/RPC stream showed besides its RPC connections: every SMB session
    setup (with or without a pipe) and the first messages it could not decode."""
    stream: int
    kind: str  # smb | rpc | kdc
    client: str
    server: str
    smb_sessions: list[SmbSession]
    malformed: list[dict[str, Any]]
    # AS and TGS messages of a stream to a KDC (capture/kdc.py), as ladder events.
    kdc: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {"stream": self.stream, "kind": self.kind, "client": self.client,
             "server": self.server, "smb_sessions": [s.to_json() for s in self.smb_sessions],
             "malformed": [dict(m) for m in self.malformed]}
        if self.kdc:
            d["kdc"] = [dict(e) for e in self.kdc]
        return d


@dataclass
class _Dir:
    buf: bytearray = field(default_factory=bytearray)
    skip: int = 0  # bytes of an oversized message still to discard
    tries: int = 0


class StreamWalker:
    """The reassembler's sink for one TCP stream."""

    def __init__(self, st: TcpStream, emit: Callable[[TcpStream, list[ObservedRpcConnection]], None],
                 keyring: Keyring | None = None,
                 on_stream: Callable[[StreamSummary], None] | None = None) -> None:
        self.st = st
        self._keyring = keyring
        self._emit = emit
        self._on_stream = on_stream
        self._malformed: list[dict[str, Any]] = []
        self.found: list[ObservedRpcConnection] = []
        self._found = self.found.append
        self.kind: str | None = None  # "smb" | "rpc" | "other"
        self._dirs = {True: _Dir(), False: _Dir()}
        self._rpc: ObservedRpcConnection | None = None
        self._smb: SmbWalker | None = None
        self._kdc: KdcWalker | None = None
        self._synced = {True: False, False: False}
        self._oriented = False
        self._a_is_client: bool | None = None

    def _a_is_server(self) -> bool:
        """No handshake seen and side A is on a service port: A is the server."""
        cp, sp = self.st.client[1], self.st.server[1]
        return not self.st.saw_syn and (cp in (445, 139, 135) or (cp < 1024 <= sp))

    def _endpoints(self) -> tuple[str, str]:
        (ca, cp), (sa, sp) = self.st.client, self.st.server
        if self._a_is_server():
            # No handshake seen and side A is on a service port: A is the server.
            (ca, cp), (sa, sp) = (sa, sp), (ca, cp)
        return f"{ca}:{cp}", f"{sa}:{sp}"

    # -- sink interface ----------------------------------------------------------------------

    def data(self, from_a: bool, payload: bytes, frame: int) -> None:
        try:
            self._data(from_a, payload, frame)
        except (ProtocolError, ValueError, LookupError, TypeError, struct.error) as exc:
            # Captures come from anywhere; one undecodable message must not end the analysis.
            # Note it and look for the next message boundary.
            self._note_malformed(from_a, frame, exc)
            self._desync(from_a)

    def _note_malformed(self, from_a: bool, frame: int, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__
        ev = {"frame": frame, "kind": "malformed", "dir": "c2s" if from_a else "s2c",
              "layer": self.kind or "tcp", "reason": reason}
        if len(self._malformed) < MAX_STREAM_NOTES:
            self._malformed.append(ev)
        if self._rpc is not None:
            add_event(self._rpc.conn, ev)
        elif self._smb is not None:
            self._smb.note(ev)

    def _data(self, from_a: bool, payload: bytes, frame: int) -> None:
        if self.kind == "other":
            return
        d = self._dirs[from_a]
        if not self._synced[from_a]:
            if d.tries >= DETECT_TRIES:
                return
            d.tries += 1
            if _looks_like_smb(payload) and self.kind in (None, "smb"):
                self._start("smb")
            elif _looks_like_rpc(payload) and self.kind in (None, "rpc"):
                self._start("rpc")
            elif payload[:1] in (b"\x81", b"\x82", b"\x85") and self.kind in (None, "smb"):
                self._start("smb")  # NetBIOS session request/response/keep-alive on port 139
            elif looks_like_kdc(payload) and self.kind in (None, "kdc"):
                self._start("kdc")
            else:
                if self.kind is None and d.tries >= DETECT_TRIES and self._dirs[not from_a].tries >= DETECT_TRIES:
                    # Neither SMB nor DCE/RPC: stop reassembling this stream at all.
                    self.kind = "other"
                    self.st.ignore()
                return
            self._synced[from_a] = True
        if self.kind == "rpc":
            # Which side is the client is read from the PDU types, so a capture that missed
            # the SYN still attributes requests correctly.
            self._rpc_data(from_a, payload, frame)
        elif self.kind == "kdc" and self._kdc is not None:
            self._kdc.feed(from_a, payload, frame)
        else:
            self._smb_data(from_a, payload, frame)

    def close(self) -> None:
        """The TCP connection ended: settle its RPC connections, hand them on, keep nothing."""
        kind, self.kind = self.kind, "other"
        self._dirs = {True: _Dir(), False: _Dir()}
        sessions: list[SmbSession] = []
        if self._rpc is not None:
            self._rpc.release()
        if self._smb is not None:
            sessions = self._smb.sessions
            self._smb.release()
        kdc = self._kdc.events if self._kdc is not None else []
        a_is_server = self._kdc is not None and self._kdc.a_is_client is False
        found, self.found = self.found, []
        self._rpc = self._smb = None
        st = self.st
        partial = st.partial or st.one_sided()
        settled = []
        for rpc in found:
            if not rpc.rpc_seen:
                # Nothing decoded as DCE/RPC: what could not be read is the stream's to report.
                room = MAX_STREAM_NOTES - len(self._malformed)
                self._malformed += [e for e in rpc.conn.events if e["kind"] == "malformed"][:max(room, 0)]
                continue
            rpc.finish()
            c = rpc.conn
            c.partial = c.partial or partial
            settled.append(rpc)
        if settled:
            self._emit(st, settled)
        if self._on_stream is not None and kind in ("smb", "rpc", "kdc"):
            client, server = self._endpoints()
            if kind == "kdc":
                (ca, cp), (sa, sp) = (self.st.b, self.st.a) if a_is_server else (self.st.a, self.st.b)
                client, server = f"{ca}:{cp}", f"{sa}:{sp}"
            self._on_stream(StreamSummary(st.number, kind, client, server, sessions, self._malformed,
                                          kdc))

    def gap(self, from_a: bool, frame: int) -> None:
        self._dirs[from_a] = _Dir()
        self._synced[from_a] = False
        if self._rpc is not None:
            self._rpc.gap(True)
            self._rpc.gap(False)
        if self._smb is not None:
            self._smb.gap()

    # -- DCE/RPC over TCP (ncacn_ip_tcp) -----------------------------------------------------

    def _start(self, kind: str) -> None:
        if self.kind == kind:
            return
        self.kind = kind
        client, server = self._endpoints()
        if kind == "rpc":
            conn = Connection(self.st.number, "ncacn_ip_tcp", client, server, partial=self.st.partial)
            self._rpc = ObservedRpcConnection(conn, keyring=self._keyring)
            self._found(self._rpc)
        elif kind == "kdc":
            self._kdc = KdcWalker()
        else:
            self._smb = SmbWalker(self.st.number, client, server, self._found, self._keyring)

    def _rpc_data(self, from_a: bool, payload: bytes, frame: int) -> None:
        rpc = self._rpc
        if rpc is None:
            raise RuntimeError("DCE/RPC bytes before the stream was classified")
        if self._a_is_client is None:
            # Which side is the client is read from the first PDU type seen, so a capture
            # that missed the SYN still attributes requests correctly.
            d = self._dirs[from_a]
            d.buf += payload
            if len(d.buf) < 3:
                return
            self._a_is_client = (d.buf[2] in (0, 11, 14, 16, 18, 19)) == from_a
            payload, d.buf = bytes(d.buf), bytearray()
        from_client = from_a == self._a_is_client
        if not self._oriented:
            self._oriented = True
            a, b = self.st.a, self.st.b
            client, server = (a, b) if self._a_is_client else (b, a)
            rpc.conn.client, rpc.conn.server = f"{client[0]}:{client[1]}", f"{server[0]}:{server[1]}"
        before = rpc.malformed
        rpc.feed(from_client, payload, frame)
        if rpc.malformed != before:
            self._synced[from_a] = False

    # -- NetBIOS session service (RFC 1002 4.3) and SMB --------------------------------------

    def _smb_data(self, from_a: bool, payload: bytes, frame: int) -> None:
        d = self._dirs[from_a]
        if d.skip:
            n = min(d.skip, len(payload))
            d.skip -= n
            payload = payload[n:]
        d.buf += payload
        while len(d.buf) >= 4:
            mtype = d.buf[0]
            length = struct.unpack(">I", b"\x00" + bytes(d.buf[1:4]))[0]
            if mtype not in (0x00, 0x81, 0x82, 0x83, 0x84, 0x85):
                self._desync(from_a)
                return
            if length > MAX_BUFFER:
                d.skip = 4 + length - len(d.buf)
                d.buf.clear()
                if d.skip < 0:
                    d.skip = 0
                return
            if len(d.buf) < 4 + length:
                return
            msg = bytes(d.buf[4:4 + length])
            del d.buf[:4 + length]
            if mtype != 0x00:
                continue
            smb = self._smb
            if smb is None:
                raise RuntimeError("SMB bytes before the stream was classified")
            try:
                if msg[:4] == b"\xffSMB":
                    smb.smb1(msg, frame)
                elif msg[:4] == b"\xfeSMB":
                    smb.smb2(msg, frame)
                elif msg[:4] == b"\xfdSMB":
                    smb.encrypted(msg, frame, from_a != self._a_is_server())
                else:
                    self._desync(from_a)
                    return
            except (ProtocolError, struct.error, IndexError, UnicodeDecodeError) as exc:
                # One bad message does not end the stream: its length framed it, so note it
                # and carry on.
                self._note_malformed(from_a, frame, exc)
                continue

    def _desync(self, from_a: bool) -> None:
        self._dirs[from_a] = _Dir()
        self._synced[from_a] = False
        if self._smb is not None:
            self._smb.gap()
        if self._rpc is not None:
            self._rpc.gap(True)
            self._rpc.gap(False)
        if self._kdc is not None:
            self._kdc.gap()


@dataclass
class Analysis:
    path: str
    connections: list[Connection]
    streams: int
    partial_streams: list[int]
    # Streams with SMB session setups or undecodable messages, in the order they ended.
    stream_notes: list[StreamSummary] = field(default_factory=list)


class CaptureScan:
    """One pass over a capture that hands out each RPC connection as soon as its TCP stream
    ends (FIN both ways, RST, its 4-tuple reused, or the end of the file), in that order, and
    then forgets it. Memory holds only the streams still open.

        scan = CaptureScan(path, keyring)
        scan.run(lambda conn: ..., progress)

    `two_sided` says whether some stream so far carried payload both ways: until it does, a
    consumer that streams its output should hold connections back, because a capture of only
    one direction of every stream ends in CaptureError (see run)."""

    def __init__(self, path: str, keyring: Keyring | None = None) -> None:
        self.path = path
        self._keyring = keyring
        self.streams = 0
        self.partial_streams: list[int] = []
        self._reassembler: Reassembler | None = None

    @property
    def two_sided(self) -> bool:
        return self._reassembler is not None and self._reassembler.two_sided

    def run(self, on_connection: Callable[[Connection], None],
            progress: ProgressFn | None = None,
            on_stream: Callable[[StreamSummary], None] | None = None) -> None:
        """`on_connection` gets each RPC connection, `on_stream` each stream summary that holds
        an SMB session setup or a malformed message."""
        def emit(st: TcpStream, rpcs: list[ObservedRpcConnection]) -> None:
            for rpc in sorted(rpcs, key=lambda r: r.conn.first_frame):
                on_connection(rpc.conn)

        def noted(summary: StreamSummary) -> None:
            if on_stream is not None and (summary.smb_sessions or summary.malformed or summary.kdc):
                on_stream(summary)

        def sink(st: TcpStream) -> StreamWalker:
            return StreamWalker(st, emit, self._keyring, noted)

        r = self._reassembler = Reassembler(sink, keep_streams=False)
        try:
            _read_into(self.path, r, progress)
        finally:
            self.streams = r.stream_count
            self.partial_streams = sorted(set(r.partial_streams))
        if r.first_one_sided is not None and not r.two_sided:
            st = r.first_one_sided
            raise CaptureError(
                f"{self.path}: only one direction of each TCP stream was captured (stream {st.number}, "
                f"{st.a[0]}:{st.a[1]} <-> {st.b[0]}:{st.b[1]}); requests cannot be paired with "
                f"responses. Capture on a host or port that sees both directions.")


def analyse(path: str, progress: ProgressFn | None = None, keyring: Keyring | None = None) -> Analysis:
    """Read a capture and return every RPC connection in it, ordered by first frame. With a
    keyring (NT hashes of known users) signed and sealed stubs are verified and read."""
    conns: list[Connection] = []
    notes: list[StreamSummary] = []
    scan = CaptureScan(path, keyring)
    scan.run(conns.append, progress, notes.append)
    conns.sort(key=lambda c: (c.first_frame, c.stream))
    notes.sort(key=lambda n: n.stream)
    return Analysis(path, conns, scan.streams, scan.partial_streams, notes)
