"""The event vocabulary shared by the live server, the capture reader, diagrams and tests.

Engines are sans-IO: they return `Event` values without a clock or a connection id. The edge
that owns the socket stamps both and hands the record to an `EventLog`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Mapping

# Field names that must never carry a value: a programming error, caught at emission time so a
# secret cannot reach a log by accident.
_FORBIDDEN_FIELDS = frozenset(
    {"password", "nt_hash", "lm_hash", "session_key", "key", "nt_response", "lm_response", "secret"}
)


@dataclass(frozen=True)
class Event:
    layer: str
    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = _FORBIDDEN_FIELDS.intersection(self.fields)
        if bad:
            raise ValueError(f"event {self.kind} may not carry fields {sorted(bad)}")

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def event(layer: str, kind: str, **fields: Any) -> Event:
    return Event(layer, kind, fields)


def malformed(layer: str, reason: str, **fields: Any) -> Event:
    return Event(layer, "malformed", {"reason": reason, **fields})


def limit(layer: str, which: str, **fields: Any) -> Event:
    return Event(layer, "limit", {"limit": which, **fields})


_stamp_second: tuple[float, str] = (-1.0, "")      # the last whole second formatted, and its text


def utc_stamp(epoch: float) -> str:
    # Every event is stamped, and strftime dominated emission in the server's profile; the
    # date-and-second part changes at most once a second, so it is formatted once per second.
    # Microseconds round half-even with a carry, exactly as datetime.fromtimestamp does.
    frac, whole = math.modf(epoch)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if micros < 0 or whole < 0:
        t = _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    global _stamp_second
    second, text = _stamp_second              # one tuple: threads never see half an update
    if second != whole:
        text = _dt.datetime.fromtimestamp(whole, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _stamp_second = (whole, text)
    return f"{text}.{micros:06d}Z"


def to_record(ev: Event, conn: str, epoch: float) -> dict[str, Any]:
    """The JSON object of DESIGN.md section 5: fields at top level beside the envelope."""
    record: dict[str, Any] = {"time": utc_stamp(epoch), "conn": conn, "layer": ev.layer, "kind": ev.kind}
    for k, v in ev.fields.items():
        record[k] = v
    return record


class EventLog:
    """Collects stamped event records: in memory (for Lab and tests), to a JSON Lines file, and
    to subscribers. Thread-safe, because Lab runs the server loop in a thread while a test
    reads."""

    def __init__(self, path: str | None = None, clock: Callable[[], float] | None = None,
                 keep: int = 200_000) -> None:
        import time

        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._keep = keep
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, conn: str, ev: Event) -> dict[str, Any]:
        record = to_record(ev, conn, self._clock())
        # serialise only when there is a file to write: the in-memory log keeps the dict
        line = json.dumps(record, default=str) if self._file is not None else ""
        with self._lock:
            if len(self._records) >= self._keep:
                del self._records[: self._keep // 10]
            self._records.append(record)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
            subs = list(self._subscribers)
        for sub in subs:
            sub(record)
        return record

    def emit_all(self, conn: str, events: list[Event]) -> None:
        for ev in events:
            self.emit(conn, ev)

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def records(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Snapshot of records, optionally filtered by kind (exact or prefix ending in '.')
        and by exact field values."""
        with self._lock:
            snap = list(self._records)
        out = []
        for r in snap:
            if kind is not None:
                if kind.endswith(".") and not r["kind"].startswith(kind):
                    continue
                if not kind.endswith(".") and r["kind"] != kind:
                    continue
            if all(r.get(k) == v for k, v in match.items()):
                out.append(r)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None
