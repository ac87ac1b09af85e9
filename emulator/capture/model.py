"""What the capture reader found: one `Connection` per RPC connection (a named pipe, or a TCP
stream carrying DCE/RPC), in the shape of DESIGN.md section 5."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# MS-RPCE 2.2.1.1.8 authentication levels and 2.2.1.1.7 security providers.
AUTH_LEVEL_NAMES = {0: "none", 1: "none", 2: "connect", 3: "call", 4: "packet", 5: "integrity",
                    6: "privacy"}
AUTH_TYPE_NAMES = {0: "none", 9: "spnego", 10: "ntlm", 14: "schannel", 16: "kerberos",
                   0x44: "netlogon", 0xFF: "default"}

EMSMDB_UUID = "a4f1db00-ca47-1067-b31f-00dd010662da"
INTERFACE_NAMES = {
    EMSMDB_UUID: "emsmdb",
    "5261574a-4572-206e-b268-6b199213b4e5": "asyncemsmdb",
    "f5cc5a18-4264-101a-8c59-08002b2f8426": "nspi",
    "1544f5e0-613c-11d1-93df-00c04fd7bd09": "rfr",
    "e1af8308-5d1f-11c9-91a4-08002b14a0fa": "epm",
    "4b324fc8-1670-01d3-1278-5a47bf6ee188": "srvsvc",
    "12345778-1234-abcd-ef00-0123456789ab": "lsarpc",
    "12345778-1234-abcd-ef00-0123456789ac": "samr",
    "12345678-1234-abcd-ef00-01234567cffb": "netlogon",
    "6bffd098-a112-3610-9833-46c3f87e345a": "wkssvc",
    "367abb81-9844-35f1-ad32-98f038001003": "svcctl",
    "338cd001-2244-31f1-aaaa-900038001003": "winreg",
    "00000143-0000-0000-c000-000000000046": "IRemUnknown2",
    "000001a0-0000-0000-c000-000000000046": "ISystemActivator",
    "99fcfec4-5260-101b-bbcb-00aa0021347a": "IOXIDResolver",
}
# A pathological connection (millions of faults, malformed or encrypted messages) must not hold
# an unbounded event list: past this many events, only the auth skeleton is still recorded.
MAX_EVENTS = 4096
AUTH_EVENT_KINDS = frozenset({
    "smb.negotiate", "smb.session_setup", "smb.tree_connect", "smb.pipe_open",
    "ntlm.negotiate", "ntlm.challenge", "ntlm.authenticate", "ntlm.session_keys", "kerberos.token",
    "kerberos.ticket", "kerberos.ap_rep",
    "schannel.negotiate", "schannel.challenge",
    "rpc.bind", "rpc.alter_context", "rpc.bind_ack", "rpc.alter_context_resp", "rpc.bind_nak",
    "rpc.identity", "emsmdb.connect_request", "emsmdb.connect"})


def add_event(conn: "Connection", ev: dict[str, Any]) -> None:
    """Append an event, within the MAX_EVENTS cap for those outside the auth skeleton."""
    if len(conn.events) >= MAX_EVENTS and ev["kind"] not in AUTH_EVENT_KINDS:
        conn.events_dropped += 1
    else:
        conn.events.append(ev)


EMSMDB_CALLS = {0: "EcDoConnect", 1: "EcDoDisconnect", 2: "EcDoRpc", 10: "EcDoConnectEx",
                11: "EcDoRpcExt2"}


@dataclass
class BindInfo:
    frame: int
    call_id: int
    kind: str  # "bind" or "alter_context"
    interface: str
    interface_name: str
    version: str
    auth_type: str
    auth_level: str
    result: str = "pending"  # ok | rejected | nak | pending
    result_frame: int | None = None


@dataclass
class EmsmdbCall:
    call: str
    frame: int
    user_dn: str | None
    status: str | None = None
    status_name: str | None = None
    response_frame: int | None = None
    sealed: bool = False
    unsealed: bool = False  # read with keys derived from a supplied password
    fault: bool = False     # the RPC runtime refused the call; it never reached EMSMDB


@dataclass
class Connection:
    stream: int
    transport: str  # ncacn_np | ncacn_ip_tcp
    client: str
    server: str
    # The live rpc.identity vocabulary: smb_session | rpc_auth | anonymous; "none" when the
    # server acted on nobody the capture shows (a failed or unfinished logon, or a connection
    # whose bind came before the capture started).
    identity_source: str = "none"
    user: str | None = None
    domain: str | None = None
    auth_level: str = "none"
    auth_type: str = "none"
    # ntlm | spnego-ntlm | kerberos | spnego-kerberos | schannel | none (auth/results.py)
    mechanism: str = "none"
    # Who the RPC-layer token named, whether or not the server accepted it.
    offered_user: str | None = None
    offered_domain: str | None = None
    offered_frame: int | None = None   # the client's message that named offered_user
    smb_user: str | None = None
    smb_domain: str | None = None
    smb_session_frame: int | None = None
    smb_mechanism: str | None = None  # how the SMB session was set up; "anonymous" for a null session
    ntlm_version: str | None = None
    identity_frame: int | None = None
    # The Kerberos client principal (user@REALM) behind the identity, read with a keytab.
    principal: str | None = None
    pipes: list[str] = field(default_factory=list)
    binds: list[BindInfo] = field(default_factory=list)
    emsmdb: list[EmsmdbCall] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    partial: bool = False
    first_frame: int = 0
    verified_pdus: int = 0  # signatures checked with keys from --password/--lab
    bad_signatures: int = 0
    # Events past MAX_EVENTS that say nothing about authentication are counted, not kept.
    events_dropped: int = 0

    @property
    def acting(self) -> str:
        """DOMAIN\\user the server acted on, as far as the capture shows."""
        if self.user is None:
            if self.identity_source == "anonymous" or (
                    self.identity_source == "smb_session" and self.smb_mechanism == "anonymous"):
                return "anonymous"
            how = self.smb_mechanism if self.identity_source == "smb_session" else self.mechanism
            if self.identity_source != "none" and "kerberos" in (how or ""):
                return "the Kerberos ticket's principal (not parsed)"
            return "an unknown user"
        return f"{self.domain}\\{self.user}" if self.domain else self.user

    def to_json(self) -> dict[str, Any]:
        # Built field by field (dataclasses.asdict deep-copies through reflection, which costs
        # more than reading the capture). Same keys, same order as the dataclass.
        d: dict[str, Any] = {
            "stream": self.stream, "transport": self.transport, "client": self.client,
            "server": self.server, "identity_source": self.identity_source, "user": self.user,
            "domain": self.domain, "auth_level": self.auth_level, "auth_type": self.auth_type,
            "mechanism": self.mechanism}
        if self.offered_user is not None:
            d["offered_user"], d["offered_domain"] = self.offered_user, self.offered_domain
            d["offered_frame"] = self.offered_frame
        # smb_user only when there is an SMB session, as DESIGN.md section 5 says.
        if self.transport == "ncacn_np":
            d["smb_user"], d["smb_domain"] = self.smb_user, self.smb_domain
            d["smb_session_frame"] = self.smb_session_frame
            d["smb_mechanism"] = self.smb_mechanism
        d["ntlm_version"], d["identity_frame"] = self.ntlm_version, self.identity_frame
        if self.principal is not None:
            d["principal"] = self.principal
        d["pipes"] = list(self.pipes)
        d["binds"] = [dict(b.__dict__) for b in self.binds]
        d["emsmdb"] = [dict(e.__dict__) for e in self.emsmdb]
        d["events"] = [dict(e) for e in self.events]
        d["partial"], d["first_frame"] = self.partial, self.first_frame
        d["verified_pdus"], d["bad_signatures"] = self.verified_pdus, self.bad_signatures
        if self.events_dropped:
            d["events_dropped"] = self.events_dropped
        return d


@dataclass
class SmbSession:
    """One SMB session setup exchange on a TCP stream, whether or not it opened a pipe."""
    stream: int
    client: str
    server: str
    session_id: int
    dialect: str | None
    mechanism: str  # ntlm | spnego-ntlm | kerberos | spnego-kerberos | plain | unknown
    user: str | None
    domain: str | None
    anonymous: bool
    status: str  # the final NT status, hex
    established: bool
    frame: int
    ntlm_version: str | None = None
    # SMB3 encryption: the cipher, whether its messages were read ("ok") or why not
    # (capture/smb3_keys.py), and how many were read or failed verification.
    cipher: str | None = None
    decryption: str | None = None
    decrypted_messages: int = 0
    failed_messages: int = 0
    encrypted_messages: int = 0  # SMB3 TRANSFORM messages of this session (not readable)
    principal: str | None = None  # the Kerberos client (user@REALM), read with a keytab

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d["principal"] is None:
            del d["principal"]
        return d
