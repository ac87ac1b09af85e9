"""The replay report: per conversation, the original server's answers beside ours, message by
message, where they parted and why (from our server's own events). Text, JSON and HTML; the
HTML reuses the capture report's page, styles and SVG ladders (`emulator.capture.html`)."""

from __future__ import annotations

import json
import os
import tempfile
from html import escape
from typing import Any

from ..capture.model import INTERFACE_NAMES
from .engine import Row, is_failure
from .runner import ConversationResult, ReplayRun

FORMATS = ("text", "json", "html")

SEED_WARNING = (
    "WARNING: DETERMINISTIC LAB. Our server's NTLM challenge is the very one in the capture, so the "
    "captured AUTHENTICATE can verify: it does when the lab also repeats the CHALLENGE's timestamp, "
    "that is when it was started with the same --seed N (challenges and clock drawn from a seeded "
    "stream, emulator/determinism.py) and sees the same conversations in the same order as the lab "
    "that recorded the capture. A lab without a seed draws a fresh challenge for every exchange and "
    "refuses every replayed logon. Never serve real users from a seeded lab.")
LOOPBACK_NOTE = "Every conversation went to loopback, whatever addresses the capture holds."
SIGNING_NOTE = ("SMB signing and RPC verifiers in replayed messages are the capture's: computed with "
                "the capture's session key, they cannot be valid for our server. Replay re-signs only "
                "where it re-authored the logon.")
SHOWN_EVENTS = ("ntlm.authenticate", "spnego.accept", "smb.session_setup", "rpc.bind", "rpc.identity",
                "emsmdb.connect", "rpc.fault", "smb.refused", "smb.signature", "rpc.verify", "malformed",
                "limit", "epm.map")


# ---------------------------------------------------------------------- shared wording

def _who(ev: dict[str, Any], user_key: str = "user") -> str:
    user, domain = ev.get(user_key), ev.get("domain")
    if not user:
        return "anonymous"
    return f"{domain}\\{user}" if domain else str(user)


def event_text(ev: dict[str, Any]) -> str | None:
    """One of our server's events in a few words, or None for those the report leaves out."""
    k = ev.get("kind")
    if k not in SHOWN_EVENTS:
        return None
    if k == "ntlm.authenticate":
        return f"ntlm.authenticate {_who(ev)} {ev.get('ntlm_version') or ''}: {ev.get('result')}".replace(" :", ":")
    if k == "spnego.accept":
        return f"spnego.accept: {ev.get('result')}"
    if k == "smb.session_setup":
        return f"smb.session_setup {_who(ev)}: {ev.get('result')}"
    if k == "rpc.bind":
        return f"rpc.bind {ev.get('interface_name')} ({ev.get('auth_type')}, {ev.get('auth_level')}): {ev.get('result')}"
    if k == "rpc.identity":
        source = ev.get("source")
        return "rpc.identity: anonymous" if source == "anonymous" else f"rpc.identity: {_who(ev)} from {source}"
    if k == "emsmdb.connect":
        return f"emsmdb.connect {ev.get('user_dn')} as {ev.get('acting_user')}: {ev.get('status_name')}"
    if k == "rpc.fault":
        return f"rpc.fault: {ev.get('reason') or ev.get('status')}"
    if k == "smb.refused":
        return f"smb.refused {ev.get('command')}: {ev.get('reason')} ({ev.get('status')})"
    if k in ("smb.signature", "rpc.verify"):
        return f"{k}: {ev.get('result')}"
    if k == "malformed":
        return f"malformed {ev.get('layer')}: {ev.get('reason')}"
    if k == "limit":
        return f"limit {ev.get('limit')}"
    if k == "epm.map":
        iface = str(ev.get("interface"))
        return f"epm.map {INTERFACE_NAMES.get(iface, iface)}: {ev.get('result')}"
    return None


def _answers(saids: list, outcome: str) -> str:
    text = "; ".join(s.label for s in saids if s.final)
    if text:
        return text
    return {"no answer due": "(no answer due)", "timeout": "(no answer in time)",
            "closed": "(connection closed)", "not sent": "(not sent)"}.get(outcome, "(no answer)")


def transport(c: ConversationResult) -> str:
    return "SMB" if c.kind == "smb" else "DCE/RPC over TCP"


def short_verdict(c: ConversationResult) -> str:
    e = c.replay
    if e.first_difference is None:
        if not e.rows:
            return "nothing was sent"
        return f"identical to the end ({len(e.rows)} client message(s))"
    cause = e.rows[e.parted_at if e.parted_at is not None else e.first_difference]
    head = f"identical up to frame {e.rows[cause.index - 1].frame}, " if cause.index else ""
    return f"{head}parted ways at frame {cause.frame} ({cause.sent})"


def verdict(c: ConversationResult) -> list[str]:
    """The conversation's outcome in sentences: where the servers parted and why."""
    e = c.replay
    rows = e.rows
    text = short_verdict(c)
    text = text[0].upper() + text[1:]
    if e.first_difference is None:
        out = [text + ("." if text.endswith(")") else ": the same answers to every client message.")]
    else:
        cause = rows[e.parted_at if e.parted_at is not None else e.first_difference]
        if e.why:
            text += ": " + "; ".join(e.why)
        else:
            said = [t for t in (event_text(ev) for ev in cause.events) if t]
            if said:
                text += ". Our server's events there: " + "; ".join(said)
        out = [text + "."]
        if c.conn is None:
            out.append("Our server's reasons are not known here: give --events with the served lab's "
                       "events file (rpcauth serve --events FILE).")
        original, ours = e.wire or ("?", "?")
        first = rows[e.first_difference]
        where = "" if first is cause else f"First difference on the wire at frame {first.frame} ({first.sent}): "
        out.append(f"{where or 'On the wire: '}original: {original}; emulator: {ours}.")
    reauthored = [r for r in rows if r.reauthored]
    if reauthored:
        out.append(f"Replay re-authored {len(reauthored)} message(s) (marked R): "
                   + "; ".join(f"frame {r.frame}: {r.reauthored}" for r in reauthored) + ".")
    if e.deterministic:
        out.append(SEED_WARNING)
    if c.partial_note:
        out.append(f"({c.partial_note})")
    return out


def status(c: ConversationResult) -> str:
    return "identical" if c.replay.first_difference is None else "parted"


def _signing_caveat(run: ReplayRun) -> bool:
    return any(c.replay.notes for c in run.conversations) or any(
        "capture's session keys" in n for c in run.conversations for r in c.replay.rows for n in r.notes)


# ---------------------------------------------------------------------- text

def _margin(e, r: Row) -> str:
    mark = "R" if r.reauthored else " "
    if r.index == e.parted_at:
        return mark + ">>"
    return mark + ("  " if r.same else " *")


def to_text(run: ReplayRun) -> str:
    lines = [f"Replay of {run.capture} against {run.target}", LOOPBACK_NOTE]
    if run.deterministic:
        lines += ["", SEED_WARNING]
    for i, c in enumerate(run.conversations, 1):
        e = c.replay
        lines += ["", f"Conversation {i}: tcp.stream {c.stream}, {transport(c)}, {c.client} -> {c.server}",
                  (f"  replayed to our {c.listener} listener at 127.0.0.1:{c.port} from {c.local or '-'}"
                   f" (server connection {c.conn or 'unknown'}); {c.route}"),
                  "   mark  frame  message"]
        not_sent = [r for r in e.rows if r.outcome == "not sent"]
        for r in e.rows:
            if r.outcome == "not sent":
                continue
            lines.append(f"   {_margin(e, r)} {r.frame:6}  > {r.sent}")
            if r.reauthored:
                lines.append(f"                re-authored: {r.reauthored}")
            orig, ours = _answers(r.original, "no answer due" if not r.original else "answered"), \
                _answers(r.ours, r.outcome)
            if r.same and r.outcome != "timeout" and orig == ours:
                lines.append(f"                both servers: {orig}")
            elif r.same and r.outcome != "timeout":
                lines.append(f"                original: {orig}")
                lines.append(f"                emulator: {ours} (the same answer)")
            else:
                lines.append(f"                original: {orig}")
                lines.append(f"                emulator: {ours}")
            said = [t for t in (event_text(ev) for ev in r.events) if t]
            if said:
                lines.append("                server events: " + "; ".join(said))
        if not_sent:
            lines.append(f"          ... {len(not_sent)} more client message(s) not sent: our server had closed the connection")
        for note in e.notes:
            lines.append(f"  Note: {note}")
        for v in verdict(c):
            lines.append(f"  Verdict: {v}")
    lines += ["", (f"Summary: {len(run.conversations)} conversation(s) replayed, "
                   f"{len(run.skipped)} TCP stream(s) not replayed.")]
    for c in run.conversations:
        lines.append(f"  tcp.stream {c.stream}: {short_verdict(c)}")
    if run.skipped:
        lines.append("Not replayed:")
        for s in sorted(run.skipped, key=lambda s: s.stream):
            lines.append(f"  tcp.stream {s.stream} ({s.endpoints}): {s.reason}")
    if _signing_caveat(run):
        lines += ["", SIGNING_NOTE]
    if run.deterministic:
        lines += ["", SEED_WARNING]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- JSON

def _frame_of(e, index: int | None) -> dict[str, Any] | None:
    if index is None:
        return None
    r = e.rows[index]
    return {"index": index, "frame": r.frame, "message": r.sent}


def conversation_json(c: ConversationResult) -> dict[str, Any]:
    e = c.replay
    return {
        "stream": c.stream, "protocol": c.kind, "client": c.client, "server": c.server,
        "replayed_to": f"127.0.0.1:{c.port}", "listener": c.listener, "local": c.local,
        "server_conn": c.conn, "route": c.route, "status": status(c),
        "parted_at": _frame_of(e, e.parted_at), "first_difference": _frame_of(e, e.first_difference),
        "why": list(e.why),
        "wire": {"original": e.wire[0], "emulator": e.wire[1]} if e.wire else None,
        "verdict": verdict(c), "deterministic": e.deterministic,
        "challenges": [{"captured": a.hex() if a else None, "ours": b.hex() if b else None}
                       for a, b in e.challenges() if a or b],
        "reauthored": [{"frame": r.frame, "what": r.reauthored} for r in e.rows if r.reauthored],
        "notes": e.notes,
        "messages": [{
            "frame": r.frame, "sent": r.sent, "reauthored": r.reauthored, "notes": r.notes,
            "original": [s.label for s in r.original if s.final],
            "emulator": [s.label for s in r.ours if s.final],
            "outcome": r.outcome, "same": r.same,
            "server_events": r.events,
            "refusals": [ev for ev in r.events if is_failure(ev)],
        } for r in e.rows],
        "server_events": c.events,
    }


def to_json(run: ReplayRun) -> str:
    doc = {"capture": run.capture, "target": run.target, "seed": run.seed,
           "deterministic": run.deterministic,
           "warnings": [SEED_WARNING] if run.deterministic else [],
           "conversations": [conversation_json(c) for c in run.conversations],
           "skipped": [{"stream": s.stream, "endpoints": s.endpoints, "reason": s.reason}
                       for s in sorted(run.skipped, key=lambda s: s.stream)]}
    return json.dumps(doc, indent=2, default=str)


# ---------------------------------------------------------------------- the replay's own capture

def write_capture(run: ReplayRun, path: str) -> list[int]:
    """Write what crossed our sockets as a pcap, one TCP stream per conversation (in order), so
    that `rpcauth explain` and `compare` read the replay like any capture. Returns, per
    conversation, its tcp.stream number in that file."""
    from ..capture.recorder import CaptureWriter
    from ..server.captures import capture_server

    numbers = []
    clock = iter(range(1 << 30))
    with CaptureWriter(path, clock=lambda: 1767225600.0 + next(clock) / 1000) as writer:
        for i, c in enumerate(run.conversations):
            server_port = {"smb": 445, "epm": 135}.get(c.listener, c.port)
            local_port = int(c.local.rsplit(":", 1)[1]) if c.local else 50000 + i
            rec = writer.stream(("127.0.0.1", local_port), capture_server(("127.0.0.1", server_port)))
            for from_client, data in c.wire:
                (rec.client_data if from_client else rec.server_data)(data)
            rec.close()
            numbers.append(i)
    return numbers


# ---------------------------------------------------------------------- HTML

def _ladders(run: ReplayRun) -> tuple[dict[int, list], dict[int, list]]:
    """The capture's connections and the replay's, per conversation, for the SVG ladders."""
    from ..capture.pcapread import CaptureError
    from ..capture.streams import analyse

    original: dict[int, list] = {}
    ours: dict[int, list] = {}
    try:
        for conn in analyse(run.capture).connections:
            original.setdefault(conn.stream, []).append(conn)
    except CaptureError:
        pass
    fd, path = tempfile.mkstemp(suffix=".pcap", prefix="rpcauth-replay-")
    os.close(fd)
    try:
        write_capture(run, path)
        for conn in analyse(path).connections:
            ours.setdefault(conn.stream, []).append(conn)
    except CaptureError:
        pass
    finally:
        os.unlink(path)
    return original, ours


def to_html(run: ReplayRun) -> str:
    from ..capture.html import ladder_svg, page
    from ..capture.ladder import verdicts

    original, ours = _ladders(run)
    body = [f"<h1>Replay of {escape(run.capture)}</h1>",
            f"<p>Against {escape(run.target)}. {escape(LOOPBACK_NOTE)}</p>"]
    if run.deterministic:
        body.append(f'<p class="verdict partial"><b>{escape(SEED_WARNING)}</b></p>')
    body.append("<table><tr><th>#</th><th>tcp.stream</th><th>conversation</th><th>result</th></tr>")
    for i, c in enumerate(run.conversations, 1):
        cls = "ok" if status(c) == "identical" else "bad"
        body.append(f'<tr><td><a href="#conv{i}">{i}</a></td><td>{c.stream}</td>'
                    f"<td>{escape(transport(c))} {escape(c.client)} &rarr; {escape(c.server)}</td>"
                    f'<td class="{cls}">{escape(short_verdict(c))}</td></tr>')
    body.append("</table>")
    for i, c in enumerate(run.conversations, 1):
        e = c.replay
        body.append(f'<section id="conv{i}"><h2>Conversation {i}: tcp.stream {c.stream}, {escape(transport(c))}, '
                    f"{escape(c.client)} &rarr; {escape(c.server)}</h2>")
        body.append(f"<p>Replayed to our {escape(c.listener)} listener at 127.0.0.1:{c.port} from "
                    f"{escape(c.local or '-')} (server connection {escape(c.conn or 'unknown')}); "
                    f"{escape(c.route)}.</p>")
        for v in verdict(c):
            cls = "verdict partial" if v.startswith("WARNING") else "verdict"
            body.append(f'<p class="{cls}">{escape(v)}</p>')
        body.append("<table><tr><th>frame</th><th>client message</th><th>original server</th>"
                    "<th>emulator</th><th>our server's events</th></tr>")
        for r in e.rows:
            same = r.same and r.outcome != "not sent"
            cls = "ok" if same else "bad"
            mark = " <b>[R]</b>" if r.reauthored else ""
            parted = " <b>&larr; parted here</b>" if r.index == e.parted_at else ""
            sent = escape(r.sent) + mark + (f"<br><i>re-authored: {escape(r.reauthored)}</i>" if r.reauthored else "")
            events = "<br>".join(escape(t) for t in (event_text(ev) for ev in r.events) if t)
            body.append(f'<tr><td>{r.frame}{parted}</td><td>{sent}</td>'
                        f"<td>{escape(_answers(r.original, 'no answer due' if not r.original else 'answered'))}</td>"
                        f'<td class="{cls}">{escape(_answers(r.ours, r.outcome))}</td><td>{events}</td></tr>')
        body.append("</table>")
        for title, conns in (("The capture", original.get(c.stream, [])),
                             ("The replay (frames of the replay's own capture)", ours.get(i - 1, []))):
            for conn in conns:
                pipe = f", pipe \\{escape(conn.pipes[0])}" if conn.pipes else ""
                body.append(f"<h3>{title}: {escape(conn.transport)}{pipe}</h3>")
                body.append(ladder_svg(conn))
                for v in verdicts(conn):
                    body.append(f'<p class="verdict">{escape(v)}</p>')
        body.append("</section>")
    if run.skipped:
        body.append("<h2>Not replayed</h2><ul>")
        for s in sorted(run.skipped, key=lambda s: s.stream):
            body.append(f"<li>tcp.stream {s.stream} ({escape(s.endpoints)}): {escape(s.reason)}</li>")
        body.append("</ul>")
    if _signing_caveat(run):
        body.append(f"<p>{escape(SIGNING_NOTE)}</p>")
    return page(f"replay {run.capture}", "\n".join(body))


def render(run: ReplayRun, fmt: str) -> str:
    if fmt == "json":
        return to_json(run) + "\n"
    if fmt == "html":
        return to_html(run)
    return to_text(run)
