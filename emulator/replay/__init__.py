"""`rpcauth replay`: the client side of captured SMB and DCE/RPC conversations, sent message by
message to a running or embedded emulator, and the original server's answers beside ours.

    from emulator.replay import replay, EmbeddedTarget
    run = replay("mapi.pcap", EmbeddedTarget())

Modules: `source` (the one adapter to the capture reader), `framing` (message boundaries),
`rpcside` / `smbside` (what each message is and what must change), `standin` (re-authoring an
NTLM leg for our challenge), `engine` (one conversation, no I/O), `runner` (sockets, loopback
only), `target` (where to connect and whose events to read), `report` (text, JSON, HTML).
"""

from .runner import ReplayRun, replay
from .target import EmbeddedTarget, ServedTarget, TargetError

__all__ = ["EmbeddedTarget", "ReplayRun", "ServedTarget", "TargetError", "replay"]
