"""Matrix rows and what-if cases, run once by the synthetic client against the served lab.

A row that switches a listener off (`disable`) points the client at a port nothing listens
on, as `rpcauth matrix` does for its per-row labs, so the client finds that transport
unreachable. The observed columns come from emulator.matrix.observe, read from the server's
own events: the page shows exactly what `rpcauth matrix` prints.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ..client.profile import Endpoint, Profile, lab_credentials
from ..client.runner import run_client
from ..matrix import COLUMNS, HEADERS, RowResult, Scenario, _fmt, _typed_label, observe

if TYPE_CHECKING:
    from ..lab import Lab


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_host(host: str) -> str:
    # A lab listening on every address is reached over loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def run_scenario(lab: "Lab", s: Scenario) -> RowResult:
    """Blocking (impacket's client): call from a worker thread, never on the event loop."""
    config = lab.config
    closed = _closed_port()

    def port(name: str) -> int:
        return closed if name in s.disable or name not in lab.ports else lab.ports[name]

    profile = Profile(
        mailbox_dn=s.mailbox, logged_on=lab_credentials(config, s.logged_on),
        binding_order=s.binding_order, use_network_security=s.use_network_security,
        prompt_answer=lab_credentials(config, s.typed), ipc_session=lab_credentials(config, s.ipc_session),
        server=Endpoint(host=_client_host(lab.host), smb_port=port("smb"), epm_port=port("epm"),
                        emsmdb_port=closed if "emsmdb" in s.disable else None),
        connect_call=s.call, timeout=5.0)
    report = run_client(profile, events=lab.events)
    records = lab.records()
    conns = set(report.server_conns)
    typed_user = s.typed.partition(":")[0] if s.typed else None
    return RowResult(s, dict(s.expect), observe(report, records, typed_user), report, None,
                     [r for r in records if r.get("conn") in conns])


def cell(expected: Any, observed: Any, checked: bool) -> dict[str, Any]:
    """A table cell as `rpcauth matrix` prints it: ✓ or ✗, the observed value, what was wanted."""
    if not checked:
        return {"mark": "", "text": _fmt(observed), "ok": None}
    ok = expected == observed
    text = f"✓ {_fmt(observed)}" if ok else f"✗ {_fmt(observed)} (want {_fmt(expected)})"
    return {"mark": "✓" if ok else "✗", "text": text, "ok": ok}


def scenario_row(s: Scenario) -> dict[str, Any]:
    return {"id": s.id, "title": s.title, "cite": s.cite,
            "order": ">".join(x.replace("ncacn_", "") for x in s.binding_order),
            "uns": "on" if s.use_network_security else "off", "typed": _typed_label(s.typed) or "-",
            "expected": {c: _fmt(s.expect.get(c)) for c in COLUMNS if c in s.expect}}


def result_message(r: RowResult) -> dict[str, Any]:
    s, rep = r.scenario, r.report
    checked = bool(r.expected)
    return {
        **scenario_row(s),
        "cells": {c: cell(r.expected.get(c), r.observed.get(c), checked and c in r.expected) for c in COLUMNS},
        "ok": r.ok if checked else None, "conns": list(rep.server_conns),
        "client": {"prompt_shown": rep.prompt_shown, "transport": rep.transport_used,
                   "wire_user": rep.wire_user, "acting_user": rep.acting_user, "outcome": rep.outcome,
                   "status": rep.status_name, "dialog": rep.dialog,
                   "tried": [f"{t['protseq']} ({t['outcome']})" for t in rep.transports_tried]},
    }


HEADINGS = {c: HEADERS[c] for c in COLUMNS}
