"""`rpcauth matrix`: every row of the KB table, run end to end against an embedded lab, with
what was expected beside what the server's own events say happened."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Iterator

import yaml

from .client.profile import Endpoint, Profile, lab_credentials
from .client.runner import ClientReport, run_client
from .client.tickets import workstation_logon
from .config import KerberosConfig, LabConfig, coerce_config, default_config_with, load_config
from .lab import Lab

COLUMNS = ("prompt_shown", "acting_user", "auth_layer", "outcome", "status_name", "typed_on_wire")
HEADERS = {"prompt_shown": "prompt", "acting_user": "server acted as", "auth_layer": "auth layer",
           "outcome": "result", "status_name": "status", "typed_on_wire": "typed creds on wire"}
KB_DN = "/o=Corp/ou=Site/cn=Recipients/cn={}"
# A seeded run listens on fixed ports: the endpoint mapper's answers and bind_acks carry port
# numbers, and reference captures must come out the same every time.
SEEDED_PORTS = {"smb": 49445, "epm": 49135, "emsmdb": 49601}


@dataclass
class Scenario:
    id: str
    title: str
    cite: str
    binding_order: tuple[str, ...]
    use_network_security: bool
    logged_on: str = "alice"
    typed: str | None = None
    ipc_session: str | None = None
    mailbox: str = KB_DN.format("bob")
    disable: tuple[str, ...] = ()
    call: str = "EcDoConnect"
    expect: dict[str, Any] = field(default_factory=dict)
    # Beyond the KB (docs/kerberos.md): Outlook's logon network security, and whether the
    # logged-on user has a Kerberos ticket. Either makes the row's lab run a realm.
    logon_security: str = "password"
    ticket: bool = False
    beyond_kb: bool = False

    @property
    def needs_realm(self) -> bool:
        return self.ticket or self.logon_security != "password"


@dataclass
class RowResult:
    scenario: Scenario
    expected: dict[str, Any]
    observed: dict[str, Any]
    report: ClientReport
    capture: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checks(self) -> dict[str, bool]:
        return {c: self.expected.get(c) == self.observed.get(c) for c in COLUMNS if c in self.expected}

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        s = self.scenario
        return {"id": s.id, "title": s.title, "cite": s.cite, "binding_order": list(s.binding_order),
                "use_network_security": s.use_network_security, "typed": _typed_label(s.typed),
                "expected": self.expected, "observed": self.observed, "checks": self.checks, "ok": self.ok,
                "capture": os.path.basename(self.capture) if self.capture else None,
                "client": self.report.to_dict(),
                # The ciphers the server's SMB sessions of this row encrypted with (none: clear).
                "smb_encryption": sorted({e["cipher"] for e in self.events if e["kind"] == "smb.encryption"})}


def _typed_label(typed: str | None) -> str | None:
    if typed is None:
        return None
    user, sep, _ = typed.partition(":")
    return f"{user} (wrong password)" if sep else f"{user}'s password"


# ---------------------------------------------------------------------- loading rows
def load_scenarios(text: str, source: str) -> list[Scenario]:
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{source}: expected a mapping with a 'rows' list")
    out: list[Scenario] = []
    allowed = set(Scenario.__dataclass_fields__)
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: rows[{i}] must be a mapping")
        unknown = set(row) - allowed
        if unknown:
            raise ValueError(f"{source}: rows[{i}]: unknown keys {sorted(unknown)}")
        for key in ("id", "binding_order", "expect"):
            if key not in row:
                raise ValueError(f"{source}: rows[{i}]: {key} is required")
        uns = row.get("use_network_security", False)
        values = uns if isinstance(uns, list) else [uns]
        for v in values:
            label = "on" if v else "off"
            # YAML 1.1 reads the keys off/on as booleans; accept either spelling.
            expect = {k: (e[bool(v)] if isinstance(e, dict) and bool(v) in e else e[label] if isinstance(e, dict)
                          else e) for k, e in row["expect"].items()}
            sid = row["id"] if len(values) == 1 else f"{row['id']}-uns-{label}"
            out.append(Scenario(
                id=sid, title=row.get("title", sid), cite=row.get("cite", ""),
                binding_order=tuple(row["binding_order"]), use_network_security=bool(v),
                logged_on=row.get("logged_on", "alice"), typed=row.get("typed"),
                ipc_session=row.get("ipc_session"), mailbox=row.get("mailbox", KB_DN.format("bob")),
                disable=tuple(row.get("disable", ())), call=row.get("call", "EcDoConnect"), expect=expect,
                logon_security=row.get("logon_security", "password"), ticket=bool(row.get("ticket", False)),
                beyond_kb=bool(row.get("beyond_kb", False))))
    return out


def kb_scenarios() -> list[Scenario]:
    text = resources.files("emulator").joinpath("kb_matrix.yaml").read_text(encoding="utf-8")
    return load_scenarios(text, "<KB matrix>")


def kerberos_scenarios() -> list[Scenario]:
    """The rows beyond the KB: Kerberos at either layer (each lab runs a private MIT realm)."""
    text = resources.files("emulator").joinpath("kerberos_matrix.yaml").read_text(encoding="utf-8")
    return load_scenarios(text, "<Kerberos matrix>")


# ---------------------------------------------------------------------- running one row


# Samba's and impacket's clients name the server as its service principals do; Samba refuses
# Kerberos to "localhost", so the matrix's realm uses a dotted name reached at 127.0.0.1.
MATRIX_KERBEROS_HOST = "exch01.corp.test"


def _lab_config(base: LabConfig, disable: tuple[str, ...], realm: bool = False) -> LabConfig:
    t = base.transports
    if realm:
        base = replace(base, kerberos=KerberosConfig(enabled=True, realm=base.kerberos.realm,
                                                     hostname=MATRIX_KERBEROS_HOST, kdc_port=0))
    return replace(base, transports=replace(
        t, smb=replace(t.smb, enabled=t.smb.enabled and "smb" not in disable),
        epm=replace(t.epm, enabled=t.epm.enabled and "epm" not in disable),
        emsmdb=replace(t.emsmdb, enabled=t.emsmdb.enabled and "emsmdb" not in disable)))


def observe(report: ClientReport, records: list[dict[str, Any]], typed_user: str | None) -> dict[str, Any]:
    """The observed columns, from the server's events for this row's connections."""
    conns = set(report.server_conns)
    mine = [r for r in records if r.get("conn") in conns]
    connects = [r for r in mine if r["kind"] == "emsmdb.connect"]
    rpc_auth_binds = any(r["kind"] == "rpc.bind" and r.get("auth_type") not in (None, "none") for r in mine)
    layer = None
    if connects:
        layer = {"smb_session": "smb_session_setup", "rpc_auth": "rpc_bind"}.get(connects[-1].get("identity_source"))
    elif rpc_auth_binds:
        layer = "rpc_bind"
    elif any(r["kind"] == "smb.session_setup" for r in mine):
        layer = "smb_session_setup"
    # The typed credentials reached the wire only if an NTLM AUTHENTICATE for the typed user was
    # carried by an authenticated RPC bind. An SMB session setup as that user (the `net use`
    # workaround) is the workstation's own session, not the prompt's answer.
    typed_on_wire = bool(typed_user) and rpc_auth_binds and any(
        r["kind"] == "ntlm.authenticate" and (r.get("user") or "").lower() == typed_user.lower() for r in mine)
    return {
        "prompt_shown": report.prompt_shown,
        "acting_user": connects[-1].get("acting_user") if connects else None,
        "auth_layer": layer,
        "outcome": report.outcome,
        "status_name": connects[-1].get("status_name") if connects else None,
        "typed_on_wire": typed_on_wire,
    }


def run_row(s: Scenario, base: LabConfig, *, capture_dir: str | None = None, seed: int | None = None) -> RowResult:
    capture = os.path.join(capture_dir, f"{s.id}.pcap") if capture_dir else None
    lab = Lab(_lab_config(base, s.disable, s.needs_realm), capture_file=capture, seed=seed,
              ports=SEEDED_PORTS if seed is not None else None)
    with lab, _seeded_client(seed):
        logged_on = lab_credentials(base, s.logged_on)
        if logged_on is None:
            raise ValueError(f"{s.id}: no logged-on user")
        kerberos = None
        if s.ticket and lab.realm is not None:
            kerberos = workstation_logon(lab.realm.krb5_conf, lab.realm.name, lab.realm.hostname,
                                         logged_on.user, logged_on.password, lab.realm.directory)
        profile = Profile(
            mailbox_dn=s.mailbox, logged_on=logged_on,
            binding_order=s.binding_order, use_network_security=s.use_network_security,
            prompt_answer=lab_credentials(base, s.typed), ipc_session=lab_credentials(base, s.ipc_session),
            server=_endpoint(lab), connect_call=s.call, timeout=5.0,
            logon_security=s.logon_security, kerberos=kerberos)
        report = run_client(profile, events=lab.events)
        records = lab.records()
    typed_user = s.typed.partition(":")[0] if s.typed else None
    observed = observe(report, records, typed_user)
    return RowResult(s, dict(s.expect), observed, report, capture,
                     [r for r in records if r.get("conn") in set(report.server_conns)])


@contextlib.contextmanager
def _seeded_client(seed: int | None) -> Iterator[None]:
    """Make impacket's client nonces repeatable for a seeded run: it draws the NTLM client
    challenge and session key from `random`, and the SMB 3.1.1 preauth salt from its own
    module-level SystemRandom, which we swap for a seeded generator while the row runs."""
    if seed is None:
        yield
        return
    import impacket.smb3 as smb3

    saved_state, saved_rand = random.getstate(), smb3.rand
    random.seed(seed)
    smb3.rand = random.Random(seed)
    try:
        yield
    finally:
        smb3.rand = saved_rand
        random.setstate(saved_state)


def _endpoint(lab: Lab) -> Endpoint:
    # A disabled listener gets a port nothing listens on, so the client finds it unreachable.
    closed = _closed_port()
    return Endpoint(host=lab.host, smb_port=lab.ports.get("smb", closed), epm_port=lab.ports.get("epm", closed))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matrix_default_config() -> LabConfig:
    """The embedded lab with SMB3 encryption off: impacket (the matrix's client) encrypts
    whenever a server offers it, and the KB's rows and reference captures are the clear traffic
    of the KB's time. A config given to run_matrix decides for itself."""
    return default_config_with({"policy": {"smb_encryption": "off"}})


def requiring_encryption(config: LabConfig) -> LabConfig:
    """The same lab with `policy.smb_encryption: required`: every SMB3 session encrypts, and a
    client that cannot is refused (docs/security.md). The KB's outcome must not change: the pipe
    still inherits the SMB session's identity, whatever protects the SMB messages."""
    return replace(config, policy=replace(config.policy, smb_encryption="required"))


def run_matrix(scenarios: list[Scenario], config: LabConfig | None = None, *, capture_dir: str | None = None,
               seed: int | None = None, progress=None) -> list[RowResult]:
    base = coerce_config(config) if config is not None else matrix_default_config()
    results = []
    for i, s in enumerate(scenarios, 1):
        if progress:
            progress(i, len(scenarios), s)
        results.append(run_row(s, base, capture_dir=capture_dir, seed=seed))
    return results


# ---------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def render_table(results: list[RowResult]) -> str:
    head = ["row", "order", "UNS", "typed"] + [HEADERS[c] for c in COLUMNS]
    rows = []
    for r in results:
        s = r.scenario
        cells = [f"{s.id} (beyond the KB)" if s.beyond_kb else s.id,
                 ">".join(x.replace("ncacn_", "") for x in s.binding_order),
                 "on" if s.use_network_security else "off", _typed_label(s.typed) or "-"]
        for c in COLUMNS:
            exp, obs = r.expected.get(c), r.observed.get(c)
            mark = "✓" if exp == obs else "✗"
            cells.append(f"{mark} {_fmt(obs)}" if exp == obs else f"{mark} {_fmt(obs)} (want {_fmt(exp)})")
        rows.append(cells)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), "-+-".join("-" * w for w in widths)]
    out += [line(c) for c in rows]
    bad = [r.scenario.id for r in results if not r.ok]
    out.append("")
    beyond = sum(r.scenario.beyond_kb for r in results)
    # Rows beyond the KB are checked against their own cited sources (or lab policy), not the KB.
    scope = f" (the KB's {len(results) - beyond} and {beyond} beyond it, as their sources say)" if beyond else ""
    out.append(f"{len(results) - len(bad)}/{len(results)} rows as the KB says{scope}" +
               (f"; MISMATCH in {', '.join(bad)}" if bad else ""))
    return "\n".join(out)


def _progress(i: int, n: int, s: Scenario) -> None:
    bar = "#" * i + "." * (n - i)
    if sys.stderr.isatty():
        print(f"\r[{bar}] {i}/{n} {s.id:<28}", end="" if i < n else "\n", file=sys.stderr, flush=True)
    else:
        print(f"[{bar}] {i}/{n} {s.id}", file=sys.stderr, flush=True)


def rows_and_config(args: argparse.Namespace) -> tuple[list[Scenario], LabConfig | None]:
    """The rows and the lab config `rpcauth matrix` was asked for (with or without the live
    view). Raises OSError or ValueError (ConfigError is one) with a message for the user."""
    if args.scenarios:
        with open(args.scenarios, encoding="utf-8") as fh:
            scenarios = load_scenarios(fh.read(), args.scenarios)
    else:
        scenarios = kb_scenarios()
    if args.kerberos:
        scenarios += kerberos_scenarios()
    config = load_config(args.config) if args.config else None
    if args.encrypt:
        config = requiring_encryption(config or matrix_default_config())
    return scenarios, config


def run_matrix_command(args: argparse.Namespace) -> int:
    try:
        scenarios, config = rows_and_config(args)
    except (OSError, ValueError) as exc:
        print(f"rpcauth matrix: {exc}", file=sys.stderr)
        return 2
    results = run_matrix(scenarios, config, capture_dir=args.captures, seed=args.seed, progress=_progress)
    doc = {"rows": [r.to_dict() for r in results], "ok": all(r.ok for r in results)}
    if args.encrypt:
        doc["smb_encryption"] = "required"
    if args.captures:
        with open(os.path.join(args.captures, "matrix.json"), "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
    if args.report:
        _write_report(args.report, doc, args.captures, config)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_table(results))
        if args.captures:
            print(f"captures: {args.captures}/<row>.pcap (one per row); matrix.json beside them")
    return 0 if doc["ok"] else 1


def _write_report(directory: str, doc: dict[str, Any], capture_dir: str | None,
                  config: LabConfig | None = None) -> str:
    """The HTML teaching report: the KB table, and per row its ladder, verdict and capture.
    A run whose lab required SMB3 encryption is read with the lab users' keys (the report is
    the lab's own), so its ladders show the encryption and what ran inside it."""
    from .capture.report import write_report
    from .capture.unseal import Keyring

    keyring = None
    if doc.get("smb_encryption") == "required":
        keyring = Keyring.build(lab=config or matrix_default_config())

    rows = []
    for r in doc["rows"]:
        capture = r.get("capture")
        if capture and capture_dir and not os.path.isabs(capture):
            capture = os.path.relpath(os.path.join(capture_dir, capture), directory)
        pretty = lambda cols: {HEADERS.get(k, k): _fmt(v) for k, v in cols.items()}  # noqa: E731
        rows.append({"row": f"{r['id']}: {r['title']}", "expected": pretty(r["expected"]),
                     "observed": pretty(r["observed"]), "ok": r["ok"], "capture": capture})
    os.makedirs(directory, exist_ok=True)
    path = write_report(directory, rows, keyring=keyring)
    print(f"report: {path}", file=sys.stderr)
    return path


def report_command(args: argparse.Namespace) -> int:
    path = os.path.join(args.directory, "matrix.json")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"rpcauth report: {path}: {exc} (run `rpcauth matrix --captures {args.directory}` first)",
              file=sys.stderr)
        return 2
    _write_report(args.directory, doc, args.directory)
    return 0
