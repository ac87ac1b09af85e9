"""What a page may send, checked on the server. Every refusal is a FormError whose message is
shown to the user as it is: it names the field and what is allowed, and echoes nothing long."""

from __future__ import annotations

import re
from typing import Mapping

from ..client.profile import KNOWN_PROTSEQS
from ..config import LabConfig
from ..matrix import KB_DN, Scenario

MAX_FIELD = 1024           # characters in any one field
MAX_PASSWORD = 256
FIELDS = ("binding_order", "use_network_security", "logged_on", "typed", "ipc_session", "mailbox", "call")
# An Exchange DN: /o=ORG/ou=SITE/cn=Recipients/cn=NAME, each part non-empty and printable.
_DN = re.compile(r"^(?:/(?:o|ou|cn)=[^/=\x00-\x1f\x7f]{1,64}){1,8}$", re.IGNORECASE)
_USER = re.compile(r"^[A-Za-z0-9._$-]{1,64}$")
_TRUE, _FALSE = {"on", "true", "1", "yes"}, {"off", "false", "0", "no", ""}


class FormError(ValueError):
    pass


def _short(value: str) -> str:
    return value if len(value) <= 40 else value[:37] + "..."


def _field(form: Mapping[str, str], name: str, default: str = "") -> str:
    value = form.get(name, default)
    if not isinstance(value, str):
        raise FormError(f"{name}: expected text")
    if len(value) > MAX_FIELD:
        raise FormError(f"{name}: {len(value)} characters is too long (at most {MAX_FIELD})")
    return value.strip()


def _user(config: LabConfig, name: str, value: str, *, allow_password: bool) -> str:
    user, sep, password = value.partition(":")
    if sep and not allow_password:
        raise FormError(f"{name}: give a lab user's name only (their password comes from the lab)")
    if not _USER.match(user):
        raise FormError(f"{name}: {_short(user)!r} is not a user name (letters, digits, . _ $ -)")
    if config.user(user) is None:
        known = ", ".join(u.name for u in config.users) or "none"
        raise FormError(f"{name}: unknown user {_short(user)!r}; the lab's users are {known}")
    if sep and not 0 < len(password) <= MAX_PASSWORD:
        raise FormError(f"{name}: a typed password must be 1 to {MAX_PASSWORD} characters")
    return value


def what_if(form: Mapping[str, str], config: LabConfig) -> Scenario:
    """A what-if case -> the Scenario the synthetic client runs once."""
    unknown = sorted(set(form) - set(FIELDS) - {"token"})
    if unknown:
        raise FormError(f"unknown field(s): {', '.join(_short(u) for u in unknown[:5])}")
    order_text = _field(form, "binding_order", "ncacn_np,ncacn_ip_tcp")
    order = tuple(p.strip() for p in order_text.split(",") if p.strip())
    if not order:
        raise FormError("binding_order: name at least one protocol sequence")
    if len(order) > len(KNOWN_PROTSEQS) or len(set(order)) != len(order):
        raise FormError("binding_order: each protocol sequence at most once")
    for p in order:
        if p not in KNOWN_PROTSEQS:
            raise FormError(f"binding_order: unknown protocol sequence {_short(p)!r} "
                            f"(known: {', '.join(KNOWN_PROTSEQS)})")
    uns = _field(form, "use_network_security", "off").lower()
    if uns not in _TRUE | _FALSE:
        raise FormError("use_network_security: on or off")
    logged_on = _field(form, "logged_on", "alice")
    if not logged_on:
        raise FormError("logged_on: the workstation's logged-on user is required")
    logged_on = _user(config, "logged_on", logged_on, allow_password=False)
    typed = _field(form, "typed") or None
    if typed is not None:
        typed = _user(config, "typed", typed, allow_password=True)
    ipc = _field(form, "ipc_session") or None
    if ipc is not None:
        ipc = _user(config, "ipc_session", ipc, allow_password=False)
    mailbox = _field(form, "mailbox", KB_DN.format("bob"))
    if not _DN.match(mailbox):
        raise FormError(f"mailbox: {_short(mailbox)!r} is not a mailbox DN "
                        f"(like {KB_DN.format('bob')})")
    call = _field(form, "call", "EcDoConnect")
    if call not in ("EcDoConnect", "EcDoConnectEx"):
        raise FormError("call: EcDoConnect or EcDoConnectEx")
    return Scenario(id="what-if", title="what-if", cite="", binding_order=order,
                    use_network_security=uns in _TRUE, logged_on=logged_on, typed=typed,
                    ipc_session=ipc, mailbox=mailbox, call=call, expect={})
