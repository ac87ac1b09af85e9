"""What the Exchange client's profile and the workstation know before the user clicks Logon."""

from __future__ import annotations

from dataclasses import dataclass, field

# The protocol sequence names of the RPC_Binding_Order registry value.
KNOWN_PROTSEQS = ("ncalrpc", "ncacn_ip_tcp", "ncacn_spx", "ncacn_np", "netbios", "ncacn_vns_spp")
# The ones this emulator serves; the others are skipped like an unavailable transport.
SERVED_PROTSEQS = ("ncacn_ip_tcp", "ncacn_np")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)
    domain: str = "CORP"

    @property
    def qualified(self) -> str:
        return f"{self.domain}\\{self.user}" if self.domain else self.user


# Outlook's "Logon network security" (later versions): Password Authentication (NTLM), Kerberos
# Password Authentication, and Negotiate Authentication (Kerberos when a ticket can be had,
# else NTLM).
LOGON_SECURITY = ("password", "kerberos", "negotiate")


@dataclass(frozen=True)
class KerberosLogon:
    """The logged-on user's Kerberos logon on the workstation: a ccache holding a TGT and the
    service tickets, and the names the server's principals use."""
    ccache: str
    realm: str
    hostname: str


@dataclass(frozen=True)
class Endpoint:
    """Where to reach the server. A port of None means "ask the endpoint mapper"."""

    host: str = "127.0.0.1"
    smb_port: int = 445
    epm_port: int = 135
    emsmdb_port: int | None = None          # ncacn_ip_tcp: None -> ept_map over TCP
    pipe: str | None = None                 # ncacn_np: None -> ept_map over \pipe\epmapper


@dataclass(frozen=True)
class Profile:
    mailbox_dn: str
    logged_on: Credentials                   # whose credentials the SMB redirector uses
    binding_order: tuple[str, ...] = ("ncacn_np", "ncacn_ip_tcp")
    use_network_security: bool = False
    prompt_answer: Credentials | None = None  # what the user types at the NT credential prompt
    ipc_session: Credentials | None = None    # an existing `net use \\server\IPC$ /user:...` session
    server: Endpoint = Endpoint()
    connect_call: str = "EcDoConnect"         # or "EcDoConnectEx"
    auth_level: int = 2                       # RPC_C_AUTHN_LEVEL_CONNECT, as the real capture shows
    timeout: float = 10.0
    logon_security: str = "password"          # one of LOGON_SECURITY
    kerberos: KerberosLogon | None = None     # None: no ticket can be had

    def __post_init__(self) -> None:
        for p in self.binding_order:
            if p not in KNOWN_PROTSEQS:
                raise ValueError(f"unknown protocol sequence {p!r} (known: {', '.join(KNOWN_PROTSEQS)})")
        if self.logon_security not in LOGON_SECURITY:
            raise ValueError(f"logon_security is one of {', '.join(LOGON_SECURITY)}")
        if self.connect_call not in ("EcDoConnect", "EcDoConnectEx"):
            raise ValueError("connect_call is EcDoConnect or EcDoConnectEx")


def lab_credentials(config, spec: str | None, domain: str | None = None) -> Credentials | None:
    """"user" (password taken from the lab config) or "user:password" -> Credentials."""
    if spec is None:
        return None
    user, sep, password = spec.partition(":")
    if not sep:
        u = config.user(user)
        if u is None or u.password is None:
            raise ValueError(f"no password for {user!r} in the lab config; give {user}:PASSWORD")
        password = u.password
    return Credentials(user, password, config.server.domain if domain is None else domain)
