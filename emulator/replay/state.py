"""What replay learns while it runs and carries from one conversation to the next: the
original server's answers mapped to ours.

The capture's server handed out ports (endpoint mapper), association groups and context
handles; ours hands out different ones. A later client message that quotes an original value
must quote ours instead, so every pair seen in an answer is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capture.unseal import Keyring

# A context handle (C706 / MS-RPCE 2.2.4.1): 4 bytes of attributes, then a 16-byte UUID.
HANDLE_LEN = 20


def looks_like_handle(b: bytes) -> bool:
    return len(b) == HANDLE_LEN and b[:4] == b"\x00" * 4 and b[4:] != b"\x00" * 16


@dataclass
class Learned:
    """Mappings shared by every conversation of one replay."""
    keyring: Keyring | None = None
    # RPC context handles: original 20 bytes -> ours.
    handles: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    # RPC association groups: original id -> ours.
    assoc_groups: dict[int, int] = field(default_factory=dict)
    # Endpoint mapper answers: the captured server's port -> interface uuid, and the port our
    # endpoint mapper gave for an interface.
    captured_ports: dict[int, str] = field(default_factory=dict)
    our_ports: dict[str, int] = field(default_factory=dict)

    def learn_handle(self, original: bytes, ours: bytes) -> None:
        if looks_like_handle(original) and looks_like_handle(ours) and original != ours:
            self.handles[bytes(original)] = bytes(ours)

    def swap_handles(self, stub: bytes) -> bytes:
        for old, new in self.handles.items():
            if old in stub:
                stub = stub.replace(old, new)
        return stub
