"""Hostile inputs over real loopback sockets to a running Lab, and the checks that must hold
after each batch: every input was answered or closed, a connection opened before the batch is
still served, and a good NTLM logon still opens the right mailbox.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import mutators
from seeds import Conversation

READ_WINDOW = 1.0          # seconds a whole batch gets to answer, all sockets at once
BOB_DN = "/o=Corp/ou=Site/cn=Recipients/cn=bob"
EMSMDB = ("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81")


@dataclass
class LiveReport:
    outcomes: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


def _live_prefix(conv: Conversation) -> int:
    """How many recorded messages a live replay may send unchanged before the mutated one: SMB
    ids come from the live server's random stream, so only the messages before the first id
    (NEGOTIATE and the first SESSION_SETUP) replay; RPC over TCP carries no server-chosen id
    before EcDoConnect's handle."""
    return min(2, len(conv.messages) - 1) if conv.service == "smb" else len(conv.messages) - 1


def hostile_inputs(conv: Conversation, rng: random.Random) -> bytes:
    k = rng.randint(0, _live_prefix(conv))
    msg = conv.messages[k]
    if conv.service == "smb" and len(msg) > 4 and rng.random() < 0.8:
        body = mutators.mutate(rng, msg[4:], [m[4:] for m in conv.messages])
        mutated = b"\x00" + len(body).to_bytes(3, "big") + body
    else:
        mutated = mutators.mutate(rng, msg, conv.messages)
    return b"".join(conv.messages[:k]) + mutated


def send_batch(payloads: list[tuple[int, bytes]]) -> Counter:
    """One connection per payload, all open at once; each must get bytes back or a close
    (or still be waiting for the rest of a message it was promised, which is not an error)."""
    socks = []
    outcomes: Counter = Counter()
    for port, data in payloads:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        try:
            s.sendall(data)
        except (BlockingIOError, ConnectionError, OSError):
            pass
        socks.append(s)
    pending = {s: "waiting" for s in socks}
    deadline = time.monotonic() + READ_WINDOW
    while time.monotonic() < deadline:
        live = [s for s, state in pending.items() if state in ("waiting", "answered")]
        if not live:
            break
        ready, _, _ = select.select(live, [], [], max(0.0, deadline - time.monotonic()))
        for s in ready:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except (ConnectionError, OSError):
                chunk = b""
            if chunk:
                pending[s] = "answered"
            else:
                pending[s] = "closed" if pending[s] == "waiting" else "answered_then_closed"
    for s, state in pending.items():
        outcomes[state] += 1
        s.close()
    return outcomes


def bystander(lab):
    """An authenticated EMSMDB connection opened before a batch, to be used after it."""
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, RPC_C_AUTHN_WINNT
    from impacket.uuid import uuidtup_to_bin
    t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
    t.set_credentials("alice", lab.password("alice"), "CORP")
    dce = t.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_INTEGRITY)
    dce.connect()
    dce.bind(uuidtup_to_bin(EMSMDB))
    return dce


def good_logon(lab) -> int:
    """A fresh impacket client logs on as bob with NTLM over TCP and opens bob's mailbox;
    returns the EcDoConnect status (0 is ecSuccess)."""
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_AUTHN_WINNT
    from impacket.uuid import uuidtup_to_bin
    from emulator.interfaces.emsmdb import hEcDoConnect, hEcDoDisconnect
    t = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{lab.ports['emsmdb']}]")
    t.set_credentials("bob", lab.password("bob"), "CORP")
    dce = t.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
    dce.connect()
    try:
        dce.bind(uuidtup_to_bin(EMSMDB))
        status, handle, _ = hEcDoConnect(dce, BOB_DN)
        if status == 0:
            hEcDoDisconnect(dce, handle)
        return status
    finally:
        dce.disconnect()


def run_live(lab, conversations: list[Conversation], count: int, *, seed: int = 5,
             batch_size: int = 100) -> LiveReport:
    """`count` hostile connections spread over the lab's listeners, in concurrent batches; after
    each batch the bystander must still answer and a good logon must still succeed."""
    from emulator.interfaces.emsmdb import hEcDummyRpc
    rng = random.Random(seed)
    usable = [c for c in conversations if c.service in lab.ports and c.messages]
    report = LiveReport()
    sent = 0
    while sent < count:
        keeper = bystander(lab)
        n = min(batch_size, count - sent)
        payloads = []
        for _ in range(n):
            conv = rng.choice(usable)
            payloads.append((lab.ports[conv.service], hostile_inputs(conv, rng)))
        report.outcomes.update(send_batch(payloads))
        sent += n
        if hEcDummyRpc(keeper) != 0:
            raise AssertionError("a connection opened before the batch is no longer served")
        keeper.disconnect()
        status = good_logon(lab)
        if status != 0:
            raise AssertionError(f"good logon after a hostile batch failed with status 0x{status:08x}")
    return report
