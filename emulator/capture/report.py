"""`rpcauth report DIR`: an HTML page that teaches a matrix run.

`write_report(directory, rows)` takes one dict per KB matrix row:

    {
      "row": "ncacn_np, Use Network Security off, bob's password typed",  # title (required)
      "expected": {"identity": "alice", "auth layer": "SMB session setup", "result": "ecLoginPerm"},
      "observed": {"identity": "alice", "auth layer": "SMB session setup", "result": "ecLoginPerm"},
      "ok": True,                    # optional; default: expected == observed
      "capture": "captures/row1.pcap",  # optional path, absolute or relative to `directory`
    }

Columns come from the keys of "expected" (then any extra "observed" keys), in order. Each
row's capture is analysed and its ladder, verdict and a link to the file are shown. The page is
self-contained: inline CSS and SVG, nothing fetched.
"""

from __future__ import annotations

import os
from html import escape
from typing import Any, Iterable

from .html import connection_section, page
from .fileformat import CaptureError
from .streams import analyse
from .unseal import Keyring

REPORT_NAME = "report.html"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r.get("expected", {})))
    for r in rows:
        cols.update(dict.fromkeys(r.get("observed", {})))
    return list(cols)


def _row_ok(r: dict[str, Any]) -> bool:
    if "ok" in r:
        return bool(r["ok"])
    return r.get("expected", {}) == r.get("observed", {})


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    out = [f"<table><tr><th>#</th><th>row</th>{head}<th>match</th></tr>"]
    for i, r in enumerate(rows, 1):
        exp, obs = r.get("expected", {}), r.get("observed", {})
        cells = []
        for c in cols:
            e, o = exp.get(c, ""), obs.get(c, "")
            if e == o:
                cells.append(f"<td>{escape(str(o))}</td>")
            else:
                cells.append(f'<td class="bad">expected {escape(str(e))}<br>observed {escape(str(o))}</td>')
        ok = _row_ok(r)
        out.append(f'<tr><td><a href="#row{i}">{i}</a></td><td>{escape(str(r.get("row", "")))}</td>'
                   f'{"".join(cells)}<td class="{"ok" if ok else "bad"}">{"yes" if ok else "NO"}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _row_detail(i: int, r: dict[str, Any], directory: str, keyring: Keyring | None = None) -> str:
    out = [f'<h2 id="row{i}">Row {i}: {escape(str(r.get("row", "")))}</h2>']
    cap = r.get("capture")
    if not cap:
        out.append("<p>No capture was recorded for this row.</p>")
        return "\n".join(out)
    path = cap if os.path.isabs(cap) else os.path.join(directory, cap)
    href = os.path.relpath(path, directory)
    out.append(f'<p>Capture: <a href="{escape(href)}">{escape(href)}</a></p>')
    try:
        conns = analyse(path, keyring=keyring).connections
    except CaptureError as exc:
        out.append(f'<p class="verdict partial">{escape(str(exc))}</p>')
        return "\n".join(out)
    # The teaching view: connections that bound an interface other than the endpoint mapper
    # come first; EPM lookups are shown only when nothing else is there.
    shown = [c for c in conns if any(b.interface_name != "epm" for b in c.binds)] or conns
    if not shown:
        out.append("<p>The capture holds no RPC connection.</p>")
    for j, c in enumerate(shown, 1):
        out.append(connection_section(j, c, anchor=f"row{i}-conn{j}"))
    return "\n".join(out)


def write_report(directory: str, rows: Iterable[dict[str, Any]], keyring: Keyring | None = None) -> str:
    """Write DIRECTORY/report.html and return its path. `keyring` (the lab users' keys) reads
    the rows' SMB3-encrypted and sealed traffic."""
    rows = list(rows)
    os.makedirs(directory, exist_ok=True)
    cols = _columns(rows)
    passed = sum(_row_ok(r) for r in rows)
    body = [
        "<h1>Microsoft KB Q146188 in the lab: who authenticated where</h1>",
        "<p>Over named pipes (ncacn_np) the Exchange client's RPC runs inside an SMB session that"
        " is already authenticated, so the server acts on that session's user and the typed"
        " credentials are ignored. Over TCP (ncacn_ip_tcp) there is no such session: the client"
        " authenticates in the RPC bind with NTLM, using the typed credentials.</p>",
        f"<p>{passed} of {len(rows)} rows behaved as expected.</p>",
        _table(rows, cols),
    ]
    body += [_row_detail(i, r, directory, keyring) for i, r in enumerate(rows, 1)]
    out = os.path.join(directory, REPORT_NAME)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page("KB Q146188 matrix report", "\n".join(body)))
    return out
