"""`rpcauth explain CAPTURE`: what happened, at which layer, as whom, in four formats."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from typing import Any, Iterable, TextIO

from .ladder import Step, kdc_steps, session_line, steps, verdicts
from .model import Connection
from .fileformat import CaptureError, ProgressFn
from .streams import Analysis, CaptureScan, StreamSummary, analyse
from .unseal import Keyring

FORMATS = ("text", "json", "mermaid", "html")


def _progress(progress: ProgressFn | bool | None) -> ProgressFn | None:
    # A progress bar is the command line's business (emulator/cli.py); the library only
    # reports bytes read to a callable it is given. False is accepted as "none".
    return progress or None


def explain(path: str, fmt: str = "text", *, passwords: Iterable[str] | None = None,
            lab: Any = None, keytab: str | None = None,
            progress: ProgressFn | bool | None = None) -> str:
    """Explain a pcap/pcapng. `progress`: a callable receiving (bytes read, file size), or
    None/False for none. Raises CaptureError for unreadable
    captures. `passwords` ({user: password} or "user:password" strings) and `lab` (a LabConfig
    or its path) give NT hashes to verify signatures and read PKT_PRIVACY stubs of NTLMv2
    contexts; without them sealed stubs are reported as sealed. `keytab` (a keytab file with
    the service keys) decrypts Kerberos tickets, names their client principal and reads
    Kerberos-sealed stubs (capture/kerberos_keys.py)."""
    out = io.StringIO()
    explain_to(out, path, fmt, passwords=passwords, lab=lab, keytab=keytab, progress=progress)
    return out.getvalue()


def explain_to(out: TextIO, path: str, fmt: str = "text", *, passwords: Iterable[str] | None = None,
               lab: Any = None, keytab: str | None = None,
               progress: ProgressFn | bool | None = None) -> None:
    """Write the explanation to `out`, ending with a newline.

    JSON streams: each connection's object is written as soon as its TCP stream ends, so memory
    holds only the streams still open, whatever the size of the capture. Text, Mermaid and HTML
    are for people and are written once the whole capture has been read (text numbers and
    orders connections by their first frame)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    keyring = (Keyring.build(passwords, lab, keytab)
               if (passwords or lab is not None or keytab is not None) else None)
    if fmt == "json":
        JsonWriter(out, path).run(CaptureScan(path, keyring), _progress(progress))
        return
    text = render(analyse(path, _progress(progress), keyring), fmt)
    out.write(text if text.endswith("\n") else text + "\n")


def render(analysis: Analysis, fmt: str) -> str:
    if fmt == "json":
        return to_json(analysis)
    if fmt == "mermaid":
        return to_mermaid(analysis.connections)
    if fmt == "html":
        from .html import to_html
        return to_html(analysis)
    return to_text(analysis)


def connection_json(c: Connection) -> dict[str, Any]:
    d = c.to_json()
    d["verdict"] = verdicts(c)
    return d


def to_json(analysis: Analysis) -> str:
    doc = {"capture": analysis.path,
           "connections": [connection_json(c) for c in analysis.connections],
           "streams": [n.to_json() for n in analysis.stream_notes]}
    return json.dumps(doc, indent=2)


class JsonWriter:
    """Writes {"capture": ..., "connections": [...], "streams": [...]} (DESIGN.md section 5)
    one connection per line, in the order the connections end. "streams" follows, in the
    order the streams end: one summary per TCP stream that set up an SMB session (with or
    without a pipe) or carried a message the reader could not decode. Nothing is written until
    a stream with traffic both ways has been seen, so a capture that is rejected as one-sided prints nothing. If the
    capture turns out to be broken after connections were written, the document is still
    closed, with an "error" member, and the CaptureError is raised."""

    def __init__(self, out: TextIO, path: str) -> None:
        self.out, self.path = out, path
        self._held: list[Connection] = []
        # Stream summaries follow the connections in the document; they wait in a spool that
        # moves to disk past 1 MiB, so a capture of many streams does not grow memory.
        self._notes = tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+", encoding="utf-8")
        self._note_count = 0
        self._started = False
        self._count = 0

    def run(self, scan: CaptureScan, progress: ProgressFn | None) -> None:
        self._scan = scan
        try:
            scan.run(self._connection, progress, self._note)
        except CaptureError as exc:
            if self._started:
                self._end(str(exc))
            raise
        for c in self._held:
            self._write(c)
        self._held.clear()
        self._end(None)

    def _note(self, n: StreamSummary) -> None:
        self._notes.write(("," if self._note_count else "") + "\n" + json.dumps(n.to_json()))
        self._note_count += 1

    def _connection(self, c: Connection) -> None:
        if not self._started and not self._scan.two_sided:
            self._held.append(c)
            return
        for held in self._held:
            self._write(held)
        self._held.clear()
        self._write(c)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self.out.write('{"capture": %s, "connections": [' % json.dumps(self.path))

    def _write(self, c: Connection) -> None:
        self._start()
        self.out.write(",\n" if self._count else "\n")
        self.out.write(json.dumps(connection_json(c)))
        self._count += 1

    def _end(self, error: str | None) -> None:
        self._start()
        tail = "\n]" if self._count else "]"
        self.out.write(tail + ', "streams": [')
        self._notes.seek(0)
        shutil.copyfileobj(self._notes, self.out)
        self._notes.close()
        tail = "\n]" if self._note_count else "]"
        if error is not None:
            tail += ', "error": %s' % json.dumps(error)
        self.out.write(tail + "}\n")


def _title(i: int, c: Connection) -> str:
    pipe = f" pipe \\{c.pipes[0]}" if c.pipes else ""
    return f"Connection {i}: tcp.stream {c.stream}, {c.transport}{pipe}, {c.client} -> {c.server}"


def text_ladder(c: Connection, width: int = 46) -> list[str]:
    return text_steps(steps(c), width)


def text_steps(st: list[Step], width: int = 46) -> list[str]:
    lines = [f"  {'frame':>6}  {'client':<{width}}  server"]
    for s in st:
        if s.note:
            lines.append(f"  {s.frame:>6}  {'':<{width // 2 - 4}}[{s.label}]")
        elif s.to_server:
            lines.append(f"  {s.frame:>6}  {s.label + ' ':-<{width}}> |")
        else:
            lines.append(f"  {s.frame:>6}  {'<':-<{max(2, width - len(s.label) - 1)}} {s.label}")
    return lines


def to_text(analysis: Analysis) -> str:
    out = [f"Capture {analysis.path}: {len(analysis.connections)} RPC connection(s) in "
           f"{analysis.streams} TCP stream(s)"]
    if not analysis.connections:
        out.append("No SMB named-pipe or DCE/RPC conversation was found.")
    for i, c in enumerate(analysis.connections, 1):
        out.append("")
        out.append(_title(i, c))
        out.extend(text_ladder(c))
        for v in verdicts(c):
            out.append(f"  Verdict: {v}")
    for n in (n for n in analysis.stream_notes if n.kdc):
        out.append("")
        out.append(f"Kerberos KDC exchange: tcp.stream {n.stream}, {n.client} -> {n.server}")
        out.extend(text_steps(kdc_steps(n.kdc)))
    # Sessions whose stream opened a pipe are in that connection's ladder already.
    with_pipes = {c.stream for c in analysis.connections if c.transport == "ncacn_np"}
    notes = [n for n in analysis.stream_notes
             if n.malformed or (n.smb_sessions and n.stream not in with_pipes)]
    if notes:
        out.append("")
        out.append("SMB sessions that opened no pipe, and undecodable messages, by TCP stream:")
    for n in notes:
        for sess in n.smb_sessions if n.stream not in with_pipes else ():
            out.append(f"  tcp.stream {n.stream}: {session_line(sess)}")
        for m in n.malformed:
            out.append(f"  tcp.stream {n.stream}: frame {m['frame']} malformed {m['layer']}: {m['reason']}")
    return "\n".join(out) + "\n"


def _mermaid_text(s: str) -> str:
    # ';' ends a statement and '#' starts an entity code in Mermaid; keep labels literal.
    return s.replace(";", ",").replace("#", "no.").replace("\n", " ")


def to_mermaid(conns: list[Connection]) -> str:
    out = ["sequenceDiagram"]
    for i, c in enumerate(conns, 1):
        cl, sv = f"C{i}", f"S{i}"
        out.append(f"  participant {cl} as client {c.client} (stream {c.stream})")
        out.append(f"  participant {sv} as server {c.server} {c.transport}")
        for s in steps(c):
            text = _mermaid_text(f"[{s.frame}] {s.label}")
            if s.note:
                out.append(f"  Note over {cl},{sv}: {text}")
            elif s.to_server:
                out.append(f"  {cl}->>{sv}: {text}")
            else:
                out.append(f"  {sv}-->>{cl}: {text}")
        for v in verdicts(c):
            out.append(f"  Note over {cl},{sv}: {_mermaid_text(v)}")
    return "\n".join(out) + "\n"
