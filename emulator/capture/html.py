"""Self-contained HTML with an SVG ladder per connection: no scripts, fonts or links to fetch."""

from __future__ import annotations

from html import escape

from .ladder import AUTHENTICATED, IDENTITY, Step, kdc_steps, session_line, steps, verdicts
from .model import Connection

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#1b1f24;background:#fff}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}
.verdict{background:#f3f7ff;border-left:4px solid #3465a4;padding:.5em 1em;margin:.5em 0}
.partial{color:#a40000}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
.ok{background:#e6f4e6}.bad{background:#fbe3e3}
svg text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
"""

ROW = 26
WIDTH = 760
LEFT, RIGHT = 160, 640


HIGHLIGHT_WORDS = {AUTHENTICATED: "\u25c6 auth", IDENTITY: "\u25c6 identity"}


def ladder_svg(conn: Connection) -> str:
    """The ladder of a connection read from a capture."""
    return draw_ladder(steps(conn), f"client {conn.client}", f"server {conn.server}",
                       f"ladder of stream {conn.stream}")


def draw_ladder(st: list[Step], client: str, server: str, caption: str, number: str = "frame") -> str:
    """One SVG ladder: the drawing behind the static report, `explain --format html`, the replay
    report and the live view. `number` heads the left column (Wireshark frames, or the live
    view's message count). Highlighted steps get a thick outline and a word in the margin, so
    colour is never the only signal."""
    height = 60 + ROW * max(1, len(st))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(caption)}">',
             '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>',
             f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
             f'<text x="{LEFT}" y="18" text-anchor="middle" font-weight="bold">{escape(client)}</text>',
             f'<text x="{RIGHT}" y="18" text-anchor="middle" font-weight="bold">{escape(server)}</text>',
             f'<text x="10" y="18" fill="#666">{escape(number)}</text>',
             f'<line x1="{LEFT}" y1="26" x2="{LEFT}" y2="{height - 6}" stroke="#555" stroke-width="2"/>',
             f'<line x1="{RIGHT}" y1="26" x2="{RIGHT}" y2="{height - 6}" stroke="#555" stroke-width="2"/>']
    for i, s in enumerate(st):
        y = 48 + i * ROW
        parts.append(f'<text x="10" y="{y + 4}" fill="#666">{s.frame}</text>')
        mid = (LEFT + RIGHT) // 2
        weight = ' font-weight="bold"' if s.highlight else ""
        if s.highlight:
            parts.append(f'<rect x="{LEFT + 4}" y="{y - 13}" width="{RIGHT - LEFT - 8}" height="24" '
                         f'fill="none" stroke="#a40000" stroke-width="2.5" class="hl-{s.highlight}"/>')
            parts.append(f'<text x="{LEFT - 6}" y="{y + 4}" text-anchor="end" fill="#a40000" '
                         f'font-weight="bold">{HIGHLIGHT_WORDS.get(s.highlight, s.highlight)}</text>')
        if s.note:
            parts.append(f'<rect x="{LEFT + 10}" y="{y - 11}" width="{RIGHT - LEFT - 20}" height="18" '
                         f'fill="#fff6d5" stroke="#c4a000"/>')
            parts.append(f'<text x="{mid}" y="{y + 2}" text-anchor="middle"{weight}>{escape(s.label)}</text>')
            continue
        x1, x2 = (LEFT, RIGHT) if s.to_server else (RIGHT, LEFT)
        colour = "#3465a4" if s.to_server else "#4e9a06"
        parts.append(f'<line x1="{x1}" y1="{y + 6}" x2="{x2}" y2="{y + 6}" stroke="{colour}" '
                     f'stroke-width="1.5" marker-end="url(#arrow)"/>')
        parts.append(f'<text x="{mid}" y="{y + 1}" text-anchor="middle"{weight}>{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def connection_section(i: int, c: Connection, anchor: str | None = None) -> str:
    pipe = f", pipe \\{escape(c.pipes[0])}" if c.pipes else ""
    out = [f'<section id="{escape(anchor or f"conn{i}")}"><h2>Connection {i}: tcp.stream {c.stream}, '
           f'{escape(c.transport)}{pipe}</h2>',
           f"<p>identity source <b>{escape(c.identity_source)}</b> ({escape(c.mechanism)}), acting as "
           f"<b>{escape(c.acting)}</b>, auth level <b>{escape(c.auth_level)}</b></p>",
           ladder_svg(c)]
    for v in verdicts(c):
        cls = "verdict partial" if v.startswith("(") else "verdict"
        out.append(f'<p class="{cls}">{escape(v)}</p>')
    out.append("</section>")
    return "\n".join(out)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def to_html(analysis) -> str:
    head = [f"<h1>{escape(analysis.path)}</h1>",
            f"<p>{len(analysis.connections)} RPC connection(s) in {analysis.streams} TCP stream(s). "
            f"Frame numbers are Wireshark's.</p>"]
    if not analysis.connections:
        head.append("<p>No SMB named-pipe or DCE/RPC conversation was found.</p>")
    sections = [kdc_section(n) for n in analysis.stream_notes if n.kdc]
    sections += [connection_section(i, c) for i, c in enumerate(analysis.connections, 1)]
    return page(f"explain {analysis.path}", "\n".join(head + sections + [streams_section(analysis)]))


def kdc_section(note) -> str:
    """A stream to the KDC: the AS and TGS exchanges that fetched the tickets."""
    return (f"<section><h2>Kerberos KDC exchange: tcp.stream {note.stream}</h2>"
            + draw_ladder(kdc_steps(note.kdc), f"client {note.client}", f"KDC {note.server}",
                          f"ladder of KDC stream {note.stream}") + "</section>")


def streams_section(analysis) -> str:
    """SMB sessions that opened no pipe, and messages that could not be decoded, by stream (the
    text view's closing list)."""
    with_pipes = {c.stream for c in analysis.connections if c.transport == "ncacn_np"}
    items = []
    for n in analysis.stream_notes:
        if n.stream not in with_pipes:
            items += [f"<li>tcp.stream {n.stream}: {escape(session_line(s))}</li>" for s in n.smb_sessions]
        items += [f"<li>tcp.stream {n.stream}: frame {m['frame']} malformed {escape(str(m['layer']))}: "
                  f"{escape(str(m['reason']))}</li>" for m in n.malformed]
    if not items:
        return ""
    return ("<section><h2>SMB sessions that opened no pipe, and undecodable messages</h2><ul>"
            + "".join(items) + "</ul></section>")
