"""The lab as the page shows it: users, mailboxes and grants, the policy, the listeners.
Passwords and hashes never leave this module: a password is shown as "set"."""

from __future__ import annotations

from typing import Any

from ..config import AUTH_LEVELS, LabConfig

_LEVEL_NAMES = {v: k for k, v in AUTH_LEVELS.items()}


def lab_summary(config: LabConfig, ports: dict[str, int], host: str) -> dict[str, Any]:
    p = config.policy
    return {
        "source": config.source,
        "server": {"name": config.server.name, "domain": config.server.domain},
        "users": [{"name": u.name, "enabled": u.enabled,
                   "password": "set" if u.password is not None else "hash only"} for u in config.users],
        "mailboxes": [{"dn": m.dn, "owner": m.owner, "grants": list(m.grants)} for m in config.mailboxes],
        "policy": {
            "min_auth_level": {k: _LEVEL_NAMES.get(v, str(v)) for k, v in p.min_auth_level.items()},
            "ntlmv1_allowed": p.ntlmv1_allowed, "anonymous_allowed": p.anonymous_allowed,
            "guest_allowed": p.guest_allowed, "encryption_required": p.encryption_required,
            "smb_signing_required": p.smb_signing_required,
        },
        "listeners": [{"name": name, "host": host, "port": port} for name, port in sorted(ports.items())],
    }
