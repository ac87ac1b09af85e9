"""The lab config (YAML, DESIGN.md section 4) parsed into frozen dataclasses.

Every error names the file, the line and the key, because a lab author edits YAML by hand.
Secrets (passwords, NT hashes) are kept out of every repr.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

AUTH_LEVELS = {"none": 1, "connect": 2, "call": 3, "packet": 4, "integrity": 5, "privacy": 6}
AUTH_LEVEL_NAMES = {v: k for k, v in AUTH_LEVELS.items()}
TRANSPORT_NAMES = ("ncacn_ip_tcp", "ncacn_np")


class ConfigError(ValueError):
    def __init__(self, source: str, line: int | None, key: str, reason: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {key}: {reason}")
        self.source, self.line, self.key, self.reason = source, line, key, reason


@dataclass(frozen=True)
class ServerConfig:
    name: str = "EXCH01"
    domain: str = "CORP"
    netbios_name: str = "EXCH01"
    dns_domain: str = "corp.example"


@dataclass(frozen=True)
class User:
    name: str
    nt_hash: bytes = field(repr=False)
    enabled: bool = True
    # Kept only so the synthetic client can play the logged-on user; never logged.
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Mailbox:
    dn: str
    owner: str
    grants: tuple[str, ...] = ()


@dataclass(frozen=True)
class SmbTransport:
    enabled: bool = True
    port: int = 445
    pipes: Mapping[str, str] = field(default_factory=lambda: {"emsmdb": "emsmdb"})


@dataclass(frozen=True)
class TcpTransport:
    enabled: bool = True
    port: int = 0


@dataclass(frozen=True)
class Transports:
    smb: SmbTransport = SmbTransport()
    epm: TcpTransport = TcpTransport(port=135)
    emsmdb: TcpTransport = TcpTransport(port=6001)


SMB_ENCRYPTION = ("off", "desired", "required")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1024          # per listener; x max_pdu_size bounds reassembly memory
    max_connections_per_peer: int = 512
    max_pdu_size: int = 1 << 20            # one reassembled RPC request or SMB message
    max_fragment_size: int = 65536 + 1024
    max_pipes_per_connection: int = 64
    max_sessions_per_connection: int = 16
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0        # NTLM: NEGOTIATE to AUTHENTICATE
    slow_client_timeout: float = 60.0      # a started message must complete within this


@dataclass(frozen=True)
class Policy:
    min_auth_level: Mapping[str, int] = field(
        default_factory=lambda: {"ncacn_ip_tcp": AUTH_LEVELS["connect"], "ncacn_np": AUTH_LEVELS["none"]})
    ntlmv1_allowed: bool = False
    anonymous_allowed: bool = False
    guest_allowed: bool = False
    encryption_required: bool = False
    smb_signing_required: bool = False
    # SPNEGO must settle on Kerberos: NTLM through SPNEGO is refused as a downgrade.
    require_kerberos: bool = False
    # SMB 3.x encryption (docs/security.md, "SMB3 encryption"): off (not offered), desired
    # (offered; a client that encrypts is answered encrypted), required (every session must).
    smb_encryption: str = "desired"
    limits: Limits = Limits()


@dataclass(frozen=True)
class KerberosConfig:
    """The lab's private MIT realm (docs/kerberos.md). Off unless a config turns it on."""
    enabled: bool = False
    realm: str = ""              # empty: the server domain, upper case, + ".TEST"
    hostname: str = "localhost"  # the host name in the service principals
    kdc_port: int = 88           # 0 = ephemeral

    def realm_for(self, server: ServerConfig) -> str:
        return (self.realm or f"{server.domain}.TEST").upper()


@dataclass(frozen=True)
class LabConfig:
    server: ServerConfig = ServerConfig()
    users: tuple[User, ...] = ()
    mailboxes: tuple[Mailbox, ...] = ()
    transports: Transports = Transports()
    policy: Policy = Policy()
    kerberos: KerberosConfig = KerberosConfig()
    source: str = "<default>"

    def user(self, name: str) -> User | None:
        lname = name.lower()
        for u in self.users:
            if u.name.lower() == lname:
                return u
        return None

    def with_ports(self, **ports: int | None) -> "LabConfig":
        """A copy with listener ports overridden (None leaves one as it is)."""
        from dataclasses import replace

        t = self.transports
        smb, epm, emsmdb = t.smb, t.epm, t.emsmdb
        if ports.get("smb") is not None:
            smb = replace(smb, port=ports["smb"])
        if ports.get("epm") is not None:
            epm = replace(epm, port=ports["epm"])
        if ports.get("emsmdb") is not None:
            emsmdb = replace(emsmdb, port=ports["emsmdb"])
        out = replace(self, transports=Transports(smb=smb, epm=epm, emsmdb=emsmdb))
        if ports.get("kdc") is not None:
            out = replace(out, kerberos=replace(out.kerberos, kdc_port=ports["kdc"]))
        return out


# ---------------------------------------------------------------- parsing with line numbers

class _Node:
    """A YAML value with the line it started on (1-based)."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value, self.line = value, line


def _wrap(node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        for k, v in node.value:
            out[str(yaml.safe_load(yaml.serialize(k)))] = _wrap(v)
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_wrap(v) for v in node.value], line)
    return _Node(yaml.safe_load(yaml.serialize(node)), line)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: _Node | None, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, node.line if node else None, key, reason)

    def mapping(self, node: _Node, key: str, allowed: set[str]) -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            raise self.fail(node, key, "must be a mapping")
        for k, v in node.value.items():
            if k not in allowed:
                raise self.fail(v, f"{key}.{k}" if key else k,
                                f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return node.value

    def scalar(self, m: dict[str, _Node], name: str, key: str, kind: type, default: Any,
               parent: _Node) -> Any:
        if name not in m:
            if default is _REQUIRED:
                raise self.fail(parent, f"{key}.{name}", "is required")
            return default
        node = m[name]
        v = node.value
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise self.fail(node, f"{key}.{name}", f"must be an integer, not {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise self.fail(node, f"{key}.{name}", f"must be a number, not {v!r}")
        if kind is bool and not isinstance(v, bool):
            raise self.fail(node, f"{key}.{name}", f"must be true or false, not {v!r}")
        if kind is str and not isinstance(v, str):
            raise self.fail(node, f"{key}.{name}", f"must be a string, not {v!r}")
        return float(v) if kind is float else v

    def port(self, m: dict[str, _Node], key: str, default: int, parent: _Node) -> int:
        p = self.scalar(m, "port", key, int, default, parent)
        if not 0 <= p <= 65535:
            raise self.fail(m["port"], f"{key}.port", f"{p} is not a TCP port (0-65535; 0 = ephemeral)")
        return p


_REQUIRED = object()


def _nt_hash(password: str) -> bytes:
    """MD4 of the UTF-16LE password (MS-NLMP 3.3.1), via impacket, imported on first use."""
    from impacket.ntlm import compute_nthash

    return compute_nthash(password)


def _parse(root: _Node, source: str) -> LabConfig:
    r = _Reader(source)
    top = r.mapping(root, "", {"server", "users", "mailboxes", "transports", "policy", "kerberos"})

    server = ServerConfig()
    if "server" in top:
        s = r.mapping(top["server"], "server", {"name", "domain", "netbios_name", "dns_domain"})
        server = ServerConfig(
            name=r.scalar(s, "name", "server", str, "EXCH01", top["server"]),
            domain=r.scalar(s, "domain", "server", str, "CORP", top["server"]),
            netbios_name=r.scalar(s, "netbios_name", "server", str, "EXCH01", top["server"]),
            dns_domain=r.scalar(s, "dns_domain", "server", str, "corp.example", top["server"]),
        )

    users: list[User] = []
    if "users" in top:
        if not isinstance(top["users"].value, list):
            raise r.fail(top["users"], "users", "must be a list")
        for i, un in enumerate(top["users"].value):
            key = f"users[{i}]"
            u = r.mapping(un, key, {"name", "password", "nt_hash", "enabled"})
            name = r.scalar(u, "name", key, str, _REQUIRED, un)
            if not name or "\\" in name:
                raise r.fail(u["name"], f"{key}.name", "must be a plain, non-empty user name")
            if any(x.name.lower() == name.lower() for x in users):
                raise r.fail(u["name"], f"{key}.name", f"duplicate user {name!r}")
            password = r.scalar(u, "password", key, str, None, un)
            nt_hex = r.scalar(u, "nt_hash", key, str, None, un)
            if (password is None) == (nt_hex is None):
                raise r.fail(un, key, "give exactly one of password or nt_hash")
            if nt_hex is not None:
                try:
                    nt = binascii.unhexlify(nt_hex)
                except (binascii.Error, ValueError):
                    nt = b""
                if len(nt) != 16:
                    # Do not echo the value: it is a secret.
                    raise r.fail(u["nt_hash"], f"{key}.nt_hash", "must be 32 hex digits")
            else:
                nt = _nt_hash(password)
            users.append(User(name=name, nt_hash=nt, password=password,
                              enabled=r.scalar(u, "enabled", key, bool, True, un)))

    known = {u.name.lower() for u in users}
    mailboxes: list[Mailbox] = []
    if "mailboxes" in top:
        if not isinstance(top["mailboxes"].value, list):
            raise r.fail(top["mailboxes"], "mailboxes", "must be a list")
        for i, mn in enumerate(top["mailboxes"].value):
            key = f"mailboxes[{i}]"
            m = r.mapping(mn, key, {"dn", "owner", "grants"})
            dn = r.scalar(m, "dn", key, str, _REQUIRED, mn)
            if not dn.startswith("/"):
                raise r.fail(m["dn"], f"{key}.dn", "must be an X.500 DN such as /o=Corp/ou=Site/cn=Recipients/cn=bob")
            owner = r.scalar(m, "owner", key, str, _REQUIRED, mn)
            if owner.lower() not in known:
                raise r.fail(m["owner"], f"{key}.owner", f"unknown user {owner!r}")
            grants: list[str] = []
            if "grants" in m:
                if not isinstance(m["grants"].value, list):
                    raise r.fail(m["grants"], f"{key}.grants", "must be a list of user names")
                for g in m["grants"].value:
                    if not isinstance(g.value, str) or g.value.lower() not in known:
                        raise r.fail(g, f"{key}.grants", f"unknown user {g.value!r}")
                    grants.append(g.value)
            mailboxes.append(Mailbox(dn=dn, owner=owner, grants=tuple(grants)))

    transports = Transports()
    if "transports" in top:
        t = r.mapping(top["transports"], "transports", {"smb", "epm", "emsmdb"})
        smb = SmbTransport()
        if "smb" in t:
            s = r.mapping(t["smb"], "transports.smb", {"enabled", "port", "pipes"})
            pipes = {"emsmdb": "emsmdb"}
            if "pipes" in s:
                p = r.mapping(s["pipes"], "transports.smb.pipes", {"emsmdb"})
                name = r.scalar(p, "emsmdb", "transports.smb.pipes", str, "emsmdb", s["pipes"])
                if not name or "\\" in name or "/" in name:
                    raise r.fail(p["emsmdb"], "transports.smb.pipes.emsmdb", "a pipe name without \\pipe\\")
                pipes = {"emsmdb": name}
            smb = SmbTransport(enabled=r.scalar(s, "enabled", "transports.smb", bool, True, t["smb"]),
                               port=r.port(s, "transports.smb", 445, t["smb"]), pipes=pipes)
        tcp = {}
        for name, default in (("epm", 135), ("emsmdb", 6001)):
            tcp[name] = TcpTransport(port=default)
            if name in t:
                s = r.mapping(t[name], f"transports.{name}", {"enabled", "port"})
                tcp[name] = TcpTransport(
                    enabled=r.scalar(s, "enabled", f"transports.{name}", bool, True, t[name]),
                    port=r.port(s, f"transports.{name}", default, t[name]))
        transports = Transports(smb=smb, epm=tcp["epm"], emsmdb=tcp["emsmdb"])

    policy = Policy()
    if "policy" in top:
        p = r.mapping(top["policy"], "policy", {
            "min_auth_level", "ntlmv1_allowed", "anonymous_allowed", "guest_allowed",
            "encryption_required", "smb_signing_required", "require_kerberos", "smb_encryption",
            "limits"})
        levels = dict(Policy().min_auth_level)
        if "min_auth_level" in p:
            lv = r.mapping(p["min_auth_level"], "policy.min_auth_level", set(TRANSPORT_NAMES))
            for tname, node in lv.items():
                if node.value not in AUTH_LEVELS:
                    raise r.fail(node, f"policy.min_auth_level.{tname}",
                                 f"{node.value!r} is not one of {'|'.join(AUTH_LEVELS)}")
                levels[tname] = AUTH_LEVELS[node.value]
        limits = Limits()
        if "limits" in p:
            fields_ = Limits.__dataclass_fields__
            lm = r.mapping(p["limits"], "policy.limits", set(fields_))
            values = {}
            for k in lm:
                kind = float if fields_[k].type == "float" else int
                v = r.scalar(lm, k, "policy.limits", kind, None, p["limits"])
                if v <= 0:
                    raise r.fail(lm[k], f"policy.limits.{k}", "must be positive")
                values[k] = v
            limits = Limits(**values)
        pn = top["policy"]
        # YAML 1.1 reads a bare `off` as false: take it as the word the user wrote.
        if "smb_encryption" in p and p["smb_encryption"].value is False:
            smb_encryption = "off"
        else:
            smb_encryption = r.scalar(p, "smb_encryption", "policy", str, "desired", pn)
        if smb_encryption not in SMB_ENCRYPTION:
            raise r.fail(p["smb_encryption"], "policy.smb_encryption",
                         f"{smb_encryption!r} is not one of {'|'.join(SMB_ENCRYPTION)}")
        policy = Policy(
            min_auth_level=levels,
            ntlmv1_allowed=r.scalar(p, "ntlmv1_allowed", "policy", bool, False, pn),
            anonymous_allowed=r.scalar(p, "anonymous_allowed", "policy", bool, False, pn),
            guest_allowed=r.scalar(p, "guest_allowed", "policy", bool, False, pn),
            encryption_required=r.scalar(p, "encryption_required", "policy", bool, False, pn),
            smb_signing_required=r.scalar(p, "smb_signing_required", "policy", bool, False, pn),
            require_kerberos=r.scalar(p, "require_kerberos", "policy", bool, False, pn),
            smb_encryption=smb_encryption,
            limits=limits,
        )

    kerberos = KerberosConfig()
    if "kerberos" in top:
        kn = top["kerberos"]
        k = r.mapping(kn, "kerberos", {"enabled", "realm", "hostname", "kdc_port"})
        realm = r.scalar(k, "realm", "kerberos", str, "", kn)
        if realm and (not all(c.isalnum() or c in ".-" for c in realm)):
            raise r.fail(k["realm"], "kerberos.realm", "letters, digits, dots and hyphens only")
        hostname = r.scalar(k, "hostname", "kerberos", str, "localhost", kn)
        if not hostname or not all(c.isalnum() or c in ".-" for c in hostname):
            raise r.fail(k["hostname"], "kerberos.hostname", "a host name (letters, digits, dots, hyphens)")
        kdc_port = r.scalar(k, "kdc_port", "kerberos", int, 88, kn)
        if not 0 <= kdc_port <= 65535:
            raise r.fail(k["kdc_port"], "kerberos.kdc_port", f"{kdc_port} is not a port (0-65535; 0 = ephemeral)")
        kerberos = KerberosConfig(enabled=r.scalar(k, "enabled", "kerberos", bool, False, kn),
                                  realm=realm.upper(), hostname=hostname, kdc_port=kdc_port)

    if policy.require_kerberos and not kerberos.enabled:
        raise r.fail(top["policy"], "policy.require_kerberos",
                     "needs kerberos.enabled: true (no realm, no Kerberos to require)")

    return LabConfig(server=server, users=tuple(users), mailboxes=tuple(mailboxes),
                     transports=transports, policy=policy, kerberos=kerberos, source=source)


def parse_config(text: str, source: str = "<string>") -> LabConfig:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(source, mark.line + 1 if mark else None, "(yaml)",
                          str(getattr(exc, "problem", exc))) from None
    if node is None:
        raise ConfigError(source, None, "(file)", "is empty")
    return _parse(_wrap(node), source)


def load_config(path: str) -> LabConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(path, None, "(file)", exc.strerror or str(exc)) from None
    return parse_config(text, path)


def _default_lab_text() -> str:
    return resources.files("emulator").joinpath("default_lab.yaml").read_text(encoding="utf-8")


def default_config() -> LabConfig:
    return parse_config(_default_lab_text(), "<embedded default lab>")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def default_config_with(overrides: Mapping[str, Any]) -> LabConfig:
    """The embedded KB lab with `overrides` merged over it key by key, e.g.
    {"policy": {"encryption_required": True}} keeps the cast and every other policy key."""
    merged = _merge(yaml.safe_load(_default_lab_text()), overrides)
    return parse_config(yaml.safe_dump(merged), "<embedded default lab, overridden>")


def coerce_config(value: Any) -> LabConfig:
    """Accept a LabConfig, a path, a YAML string or a plain dict (as from a pytest marker)."""
    if value is None:
        return default_config()
    if isinstance(value, LabConfig):
        return value
    if isinstance(value, dict):
        return parse_config(yaml.safe_dump(value), "<dict>")
    if isinstance(value, str) and "\n" not in value:
        return load_config(value)
    if isinstance(value, str):
        return parse_config(value)
    if hasattr(value, "__fspath__"):
        return load_config(str(value))
    raise TypeError(f"cannot make a lab config from {type(value).__name__}")
