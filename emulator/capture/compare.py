"""`rpcauth compare A B`: do two captures describe the same authentication path?

Bytes, addresses, timings and user names differ between any two captures, so compare aligns
*auth skeletons*, one per RPC connection:

    transport, the layer that authenticated (SMB session setup or RPC bind), RPC auth type and
    level, the kind of acting identity, and the EcDoConnect status class.

Alignment rules:
- Connections without a bind in the capture (begun before it started) are ignored: their
  identity is unknown.
- Endpoint-mapper connections are ignored unless both captures have them (a client with a
  fixed port, or a pipe path, never asks the mapper).
- When both captures carry EMSMDB, only the EMSMDB connections are compared, and the
  EcDoConnect status class counts: "success" or the failure's name. When one of them has no
  EMSMDB, the identity path of all remaining binds is compared and status is left out.
- Users are compared only as a kind: "the SMB session's user" versus "typed credentials" (an
  RPC-level logon) versus "anonymous"; a real network's ALeonard and the lab's bob are both
  "typed credentials".
- Several connections with the same skeleton count once; the captures match when their sets of
  skeletons are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import EMSMDB_UUID, Connection
from .streams import analyse

FIELDS = ("transport", "auth_layer", "auth_type", "auth_level", "identity_kind", "emsmdb_status")


@dataclass(frozen=True)
class Skeleton:
    transport: str
    auth_layer: str
    auth_type: str
    auth_level: str
    identity_kind: str
    emsmdb_status: str | None

    def describe(self) -> str:
        text = (f"{self.transport}: authenticated at {self.auth_layer}, RPC auth {self.auth_type}"
                f" level {self.auth_level}, acting as {self.identity_kind}")
        if self.emsmdb_status is not None:
            text += f", EcDoConnect {self.emsmdb_status}"
        return text


@dataclass
class CompareResult:
    same: bool
    lines: list[str] = field(default_factory=list)


_LAYER = {"smb_session": "smb_session_setup", "rpc_auth": "rpc_bind", "anonymous": "none",
          "none": "unknown"}
_KIND = {"smb_session": "the SMB session's user", "rpc_auth": "typed credentials",
         "anonymous": "anonymous", "none": "unknown"}
# What an RPC-layer logon proves, when it is not a password typed for NTLM.
_KIND_OF_MECHANISM = {"kerberos": "a Kerberos ticket", "spnego-kerberos": "a Kerberos ticket",
                      "schannel": "a machine's secure channel"}


def _status_class(c: Connection) -> str | None:
    names = [e.status_name for e in c.emsmdb if e.status_name]
    if not names:
        return "sealed" if any(e.sealed for e in c.emsmdb) else "no status"
    return "success" if names[-1] == "ecSuccess" else names[-1]


def skeleton(c: Connection, with_status: bool) -> Skeleton:
    kind = _KIND.get(c.identity_source, c.identity_source)
    if c.identity_source == "rpc_auth":
        kind = _KIND_OF_MECHANISM.get(c.mechanism, kind)
    return Skeleton(c.transport, _LAYER.get(c.identity_source, c.identity_source),
                    c.auth_type, c.auth_level, kind, _status_class(c) if with_status else None)


def _is_epm(c: Connection) -> bool:
    return bool(c.binds) and all(b.interface_name == "epm" for b in c.binds)


def _has_emsmdb(c: Connection) -> bool:
    return any(b.interface == EMSMDB_UUID for b in c.binds) or bool(c.emsmdb)


def compare_connections(a: list[Connection], b: list[Connection], name_a: str = "A",
                        name_b: str = "B") -> CompareResult:
    a = [c for c in a if c.binds]
    b = [c for c in b if c.binds]
    lines: list[str] = []
    if not (any(map(_is_epm, a)) and any(map(_is_epm, b))):
        a = [c for c in a if not _is_epm(c)]
        b = [c for c in b if not _is_epm(c)]
    both_emsmdb = any(map(_has_emsmdb, a)) and any(map(_has_emsmdb, b))
    if both_emsmdb:
        a = [c for c in a if _has_emsmdb(c)]
        b = [c for c in b if _has_emsmdb(c)]
        lines.append("comparing the EMSMDB connections of both captures")
    else:
        lines.append("one capture has no EMSMDB: comparing the identity path of all binds")
    if not a or not b:
        empty = name_a if not a else name_b
        lines.append(f"{empty} has no RPC connection with a bind to compare")
        return CompareResult(False, lines)
    sa = list(dict.fromkeys(skeleton(c, both_emsmdb) for c in a))
    sb = list(dict.fromkeys(skeleton(c, both_emsmdb) for c in b))
    same = set(sa) == set(sb)
    if same:
        for s in sa:
            lines.append(f"same path: {s.describe()}")
        return CompareResult(True, lines)
    only_a = [s for s in sa if s not in sb]
    only_b = [s for s in sb if s not in sa]
    if len(only_a) == 1 and len(only_b) == 1:
        x, y = only_a[0], only_b[0]
        for f in FIELDS:
            vx, vy = getattr(x, f), getattr(y, f)
            if vx != vy:
                lines.append(f"{f.replace('_', ' ')} differs: {name_a} {vx} / {name_b} {vy}")
    for s in only_a:
        lines.append(f"only in {name_a}: {s.describe()}")
    for s in only_b:
        lines.append(f"only in {name_b}: {s.describe()}")
    for s in sa:
        if s in sb:
            lines.append(f"in both: {s.describe()}")
    return CompareResult(False, lines)


def compare(a: str, b: str, progress=None) -> CompareResult:
    """Compare two capture files. Raises CaptureError if either cannot be read."""
    ca = analyse(a, progress).connections
    cb = analyse(b, progress).connections
    result = compare_connections(ca, cb, "A", "B")
    result.lines[:0] = [f"A = {a}", f"B = {b}"]
    return result
