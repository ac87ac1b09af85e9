#!/usr/bin/env python3
"""Regenerates captures/: one seeded capture per KB matrix row, matrix.json, the HTML teaching
report, and captures/README.md (what each capture shows and which frames to look at).

    python3 scripts/make_reference_captures.py [--out captures]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from emulator.capture import analyse  # noqa: E402
from emulator.capture.ladder import verdicts  # noqa: E402
from emulator.matrix import _write_report, kb_scenarios, run_matrix  # noqa: E402

SEED = 1


def key_frames(conn) -> list[str]:
    out = []
    if conn.smb_session_frame:
        out.append(f"{conn.smb_session_frame} (SMB session setup as {conn.smb_domain}\\{conn.smb_user})")
    for b in conn.binds:
        out.append(f"{b.frame} ({b.kind} {b.interface_name}, auth {b.auth_type}/{b.auth_level})")
    if conn.identity_frame and conn.identity_source == "rpc_auth":
        out.append(f"{conn.identity_frame} (NTLM AUTHENTICATE as {conn.acting})")
    elif conn.offered_frame and conn.offered_user:
        out.append(f"{conn.offered_frame} (NTLM AUTHENTICATE as {conn.offered_domain}\\{conn.offered_user}, refused)")
    for c in conn.emsmdb:
        out.append(f"{c.frame} ({c.call}) / {c.response_frame} ({c.status_name})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "captures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):
        if name.endswith(".pcap"):
            os.remove(os.path.join(args.out, name))
    results = run_matrix(kb_scenarios(), capture_dir=args.out, seed=SEED)
    doc = {"rows": [r.to_dict() for r in results], "ok": all(r.ok for r in results)}
    with open(os.path.join(args.out, "matrix.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    _write_report(args.out, doc, args.out)

    lines = [
        "# Reference captures of the KB Q146188 matrix",
        "",
        "One capture per row of the KB matrix (DESIGN.md section 3), recorded by the emulator with",
        f"`--seed {SEED}`: the server's challenges, handles and timestamps, the listening ports, the",
        "client ports and impacket's client nonces are fixed, so every run writes the same byte",
        "streams. Regenerate them all (and `matrix.json`, `report.html` and this file) with:",
        "",
        "    python3 scripts/make_reference_captures.py",
        "",
        "Open `report.html` for the ladders. In Wireshark, SMB is on port 445 and the endpoint mapper",
        "on 135 (the recorder writes the well-known ports); EMSMDB is on 49601, decoded as DCE/RPC",
        "by Wireshark's heuristics and by the endpoint-mapper answer in the same file.",
        "These files contain NTLM exchanges of the lab's users, as any such capture does.",
        "",
    ]
    for r in results:
        s = r.scenario
        path = os.path.join(args.out, f"{s.id}.pcap")
        lines += [f"## {s.id}.pcap", "", f"{s.title}. ({s.cite})", ""]
        analysis = analyse(path, progress=None)
        for conn in analysis.connections:
            if not conn.emsmdb and not any(b.interface_name == "emsmdb" for b in conn.binds):
                continue
            for v in verdicts(conn):
                lines.append(f"- {v}")
            lines.append(f"- Frames to look at: {', '.join(key_frames(conn))}")
        lines.append("")
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {len(results)} captures to {args.out}; all rows as the KB says: {doc['ok']}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
