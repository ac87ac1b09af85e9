"""One conversation's replay without I/O: what to send for each captured client message, how
many answers to wait for, what each side answered, and where and why they parted.

    prepare(exchange) -> (Row, Outgoing)     the captured message, rewritten; the original answers read
    answer(row, bytes) -> finals             one of our server's answers read
    conclude(events)                         the server's own events attributed, the verdict made

The edge (`runner.py`) owns the socket and the clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..sansio import ProtocolError
from .framing import RPC, Conversation, Exchange
from .rpcside import Outgoing, RpcChannel, Said
from .smbside import SmbSide
from .state import Learned

# What decoding foreign bytes may raise; anything else is a bug and should surface.
BAD_INPUT = (ProtocolError, struct.error, IndexError, ValueError, KeyError, UnicodeError)


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__


# Server events that say a request was refused or broken, and the short text for each.
AUTH_KINDS = ("ntlm.authenticate", "spnego.accept", "smb.session_setup")
FAILURE_KINDS = AUTH_KINDS + ("rpc.bind", "rpc.alter_context", "rpc.auth3", "rpc.verify", "rpc.identity",
                              "smb.refused", "smb.signature", "smb.tree_connect", "smb.pipe_open",
                              "malformed", "limit")


def is_failure(ev: dict[str, Any]) -> bool:
    kind = ev.get("kind")
    if kind in ("malformed", "limit", "smb.refused", "smb.signature", "rpc.verify"):
        return True
    if kind in FAILURE_KINDS:
        result = ev.get("result")
        return result not in (None, "ok")
    return False


@dataclass
class Row:
    """One client message of the capture: what went out, and both servers' answers."""
    index: int
    frame: int
    sent: str
    auth: str | None = None
    reauthored: str | None = None
    notes: list[str] = field(default_factory=list)
    original: list[Said] = field(default_factory=list)
    ours: list[Said] = field(default_factory=list)
    outcome: str = "pending"       # answered | no answer due | timeout | closed | not sent
    events: list[dict[str, Any]] = field(default_factory=list)
    event_mark: int = 0            # how many of our connection's events preceded this message

    @staticmethod
    def keys(saids: list[Said]) -> list[tuple]:
        return [s.key for s in saids if s.final]

    @property
    def same(self) -> bool:
        if self.outcome in ("timeout", "closed", "not sent"):
            return not self.keys(self.original) and self.outcome != "not sent"
        return self.keys(self.original) == self.keys(self.ours)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if is_failure(e)]


class ConversationReplay:
    def __init__(self, conv: Conversation, learned: Learned) -> None:
        self.conv = conv
        self.learned = learned
        self.rpc = RpcChannel(learned, "ncacn_ip_tcp") if conv.kind == RPC else None
        self.smb = SmbSide(learned) if conv.kind != RPC else None
        self.rows: list[Row] = []
        self.parted_at: int | None = None
        self.first_difference: int | None = None
        self.why: list[str] = []                      # our server's refusals where they parted
        self.wire: tuple[str, str] | None = None      # (original, ours) at the first difference

    # ------------------------------------------------------------------ per message

    def prepare(self, ex: Exchange) -> tuple[Row, Outgoing]:
        try:
            out = self.rpc.client_pdu(ex.sent.data) if self.rpc is not None else \
                self._smb().client_message(ex.sent.data)
        except BAD_INPUT as exc:
            # Captures come from anywhere: a message replay cannot read goes out as captured,
            # and our server's answer (or silence) is the report.
            out = Outgoing(ex.sent.data, f"unreadable message ({_reason(exc)}), sent as captured",
                           expects_answer=True)
        original = [s for m in ex.answers for s in self._answers(m.data, ours=False)]
        row = Row(len(self.rows), ex.sent.frame, out.label, out.auth, out.reauthored, list(out.notes), original)
        self.rows.append(row)
        return row, out

    @staticmethod
    def expected(out: Outgoing) -> int:
        """How many final answers to wait for."""
        return out.answers if out.expects_answer else 0

    def answer(self, row: Row, raw: bytes) -> int:
        """Take one answer message of ours; returns how many final answers it held."""
        saids = self._answers(raw, ours=True)
        row.ours.extend(saids)
        return sum(1 for s in saids if s.final)

    def _smb(self) -> SmbSide:
        if self.smb is None:
            raise ValueError("not an SMB conversation")
        return self.smb

    def _answers(self, raw: bytes, ours: bool) -> list[Said]:
        try:
            if self.rpc is not None:
                return [self.rpc.our_answer(raw) if ours else self.rpc.original_answer(raw)]
            return self._smb().our_answer(raw) if ours else self._smb().original_answer(raw)
        except BAD_INPUT as exc:
            return [Said(f"unreadable answer ({_reason(exc)})", ("unreadable",))]

    # ------------------------------------------------------------------ verdict

    def conclude(self, events: list[dict[str, Any]]) -> None:
        """Attribute our server's events to the messages that caused them and find where the
        two servers parted."""
        marks = [r.event_mark for r in self.rows] + [len(events)]
        for i, row in enumerate(self.rows):
            if row.outcome == "not sent":
                continue
            end = next((m for m in marks[i + 1:] if m >= row.event_mark), len(events))
            row.events = events[row.event_mark:end]
        self._move_auth_events()
        first = next((r.index for r in self.rows if not r.same), None)
        self.first_difference = first
        if first is None:
            return
        # The cause is the first refusal our server wrote that the original server's answers do
        # not show: on a message whose answers already differ, or on a leg neither server
        # answers (AUTH3), whose verdict only shows in what follows.
        cause = next((r.index for r in self.rows[:first + 1]
                      if r.failures and (not r.same or r.outcome == "no answer due")), first)
        self.parted_at = cause
        self.why = self._why(self.rows[cause], self.rows[first])

    def _move_auth_events(self) -> None:
        """A security leg that needs no answer (AUTH3) may be read by the server together with
        the next request; its verdict belongs to the leg, not to that request."""
        last_auth: Row | None = None
        for row in self.rows:
            keep = []
            for ev in row.events:
                if ev.get("kind") in AUTH_KINDS and row.auth != "authenticate" and last_auth is not None \
                        and last_auth is not row:
                    last_auth.events.append(ev)
                else:
                    keep.append(ev)
            row.events = keep
            if row.auth == "authenticate":
                last_auth = row

    def challenges(self) -> list[tuple[bytes | None, bytes | None]]:
        """(captured, ours) server challenges of every NTLM exchange replayed."""
        pairs = self.smb.challenges() if self.smb is not None else []
        return pairs + [ch.challenges for ch in self.channels]

    @property
    def channels(self) -> list[RpcChannel]:
        if self.rpc is not None:
            return [self.rpc]
        return list(self._smb().channels.values())

    @property
    def deterministic(self) -> bool:
        if any(ch.deterministic for ch in self.channels):
            return True
        return bool(self.smb is not None and self.smb.deterministic)

    @property
    def notes(self) -> list[str]:
        return list(self.smb.notes) if self.smb is not None else []

    def _why(self, cause: Row, first: Row) -> list[str]:
        """Our server's refusals at the parting message, in words; the first difference on
        the wire goes to `self.wire`."""
        original = "; ".join(s.label for s in first.original if s.final) or "no answer"
        if first.outcome in ("timeout", "closed"):
            ours = {"timeout": "no answer in time", "closed": "our server closed the connection"}[first.outcome]
        elif first.outcome == "not sent":
            ours = "not sent (our server had closed the connection)"
        else:
            ours = "; ".join(s.label for s in first.ours if s.final) or "no answer"
        self.wire = (original, ours)
        return [explain_event(ev, cause) for ev in cause.failures]


def explain_event(ev: dict[str, Any], row: Row) -> str:
    kind = ev.get("kind")
    result = ev.get("result")
    if kind == "ntlm.authenticate":
        who = f"{ev.get('domain')}\\{ev.get('user')}" if ev.get("domain") else str(ev.get("user"))
        text = f"our server refused the NTLM AUTHENTICATE as {who} ({result})"
        if row.reauthored:
            return text + "; it was re-authored with the supplied password, so password or account do not match this lab"
        captured = next((n for n in row.notes if n.startswith("captured AUTHENTICATE")), None)
        if captured is not None:
            return (text + "; and it was computed for another challenge (" + captured.split(": ", 1)[1]
                    + "), so no server with a fresh challenge accepts it")
        return text
    if kind == "spnego.accept":
        return f"SPNEGO exchange refused ({result})"
    if kind == "smb.session_setup":
        return f"SMB session setup refused ({result})"
    if kind in ("rpc.bind", "rpc.alter_context", "rpc.auth3"):
        return f"{kind.split('.')[1]} refused ({result})"
    if kind == "smb.refused":
        return f"SMB {ev.get('command')} refused ({ev.get('reason')}, {ev.get('status')})"
    if kind in ("smb.signature", "rpc.verify"):
        return f"signature rejected ({result}): the capture's signatures use the capture's session key"
    if kind == "malformed":
        return f"malformed {ev.get('layer')} input ({ev.get('reason')})"
    if kind == "limit":
        return f"limit {ev.get('limit')} reached"
    return f"{kind}: {result}"
