"""Users, mailboxes and grants: the one place that answers "may identity X open mailbox DN Y?".

Exchange compares distinguished names case-insensitively, and so do we.
"""

from __future__ import annotations

from .config import LabConfig, User
from .identity import Identity

# MS-OXCDATA 2.4 error codes used by EcDoConnect(Ex).
EC_SUCCESS = 0x00000000
EC_LOGIN_PERM = 0x000003F2
EC_UNKNOWN_USER = 0x000003EB
EC_LOGIN_FAILURE = 0x80040111
EC_ACCESS_DENIED = 0x80070005
EC_NOT_ENCRYPTED = 0x00000970

STATUS_NAMES = {
    EC_SUCCESS: "ecSuccess",
    EC_LOGIN_PERM: "ecLoginPerm",
    EC_UNKNOWN_USER: "ecUnknownUser",
    EC_LOGIN_FAILURE: "ecLoginFailure",
    EC_ACCESS_DENIED: "ecAccessDenied",
    EC_NOT_ENCRYPTED: "ecNotEncrypted",
}


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, f"0x{code:08x}")


def status_hex(code: int) -> str:
    return f"0x{code:08x}"


class Directory:
    def __init__(self, config: LabConfig) -> None:
        self.domain = config.server.domain
        self._users = {u.name.lower(): u for u in config.users}
        self._mailboxes = {m.dn.lower(): m for m in config.mailboxes}

    def user(self, name: str) -> User | None:
        return self._users.get(name.lower())

    def domain_matches(self, domain: str) -> bool:
        """NTLM clients send the NetBIOS domain, the DNS domain, the workstation or nothing;
        accept the lab's NetBIOS domain and an empty or '.' domain."""
        return domain.upper() in ("", ".", self.domain.upper())

    def mailbox_owner(self, dn: str) -> str | None:
        mb = self._mailboxes.get(dn.lower())
        return mb.owner if mb else None

    def mailbox_access(self, identity: Identity, dn: str) -> int:
        """The status EcDoConnect returns for `identity` asking to open `dn`."""
        if not identity.authenticated:
            return EC_LOGIN_FAILURE
        user = self.user(identity.user or "")
        if user is None or not user.enabled:
            return EC_LOGIN_FAILURE
        mb = self._mailboxes.get(dn.lower())
        if mb is None:
            return EC_UNKNOWN_USER
        allowed = {mb.owner.lower(), *(g.lower() for g in mb.grants)}
        return EC_SUCCESS if user.name.lower() in allowed else EC_LOGIN_PERM
