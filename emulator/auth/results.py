"""What an authentication step gives back, and how a finished logon is described.

Neither type ever holds a secret: `StepResult.token` is what the server sends (a CHALLENGE, a
SPNEGO wrapper or a MAC), and `AuthResult` names the user and the outcome only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..events import Event

# The short failure reasons of DESIGN.md section 5 that this package can produce.
REASONS = (
    "ok", "wrong_password", "unknown_user", "disabled", "ntlmv1_forbidden", "lm_forbidden",
    "anonymous_forbidden", "guest_forbidden", "bad_mic", "bad_target_info", "malformed",
    "bad_state", "expired", "unsupported_mech",
    # Kerberos (emulator/kerberos/acceptor.py) and SPNEGO under policy.require_kerberos.
    "wrong_service", "replay", "bad_integrity", "clock_skew", "not_yet_valid", "refused",
    "downgrade",
)

# What `AuthResult.mech` names: the mechanism that proved the identity, in the vocabulary of the
# `mechanism` field of explain and of the events.
MECHANISMS = ("ntlm", "spnego-ntlm", "kerberos", "spnego-kerberos", "schannel")


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    reason: str
    user: str | None          # None for anonymous (and for failures before a name was read)
    domain: str
    workstation: str
    ntlm_version: str         # "NTLMv2" | "NTLMv1" | "LM" | "anonymous" | "guest" | "" (not reached)
    mech: str                 # "ntlm" | "spnego" (NTLM inside SPNEGO) | "kerberos" | ...
    mic: bool = False         # the AUTHENTICATE carried an NTLM MIC
    principal: str = ""       # Kerberos: the ticket's client principal (user@REALM)

    @property
    def mechanism(self) -> str:
        """`mech` in the vocabulary of MECHANISMS (SPNEGO's own results say "spnego" for NTLM)."""
        return "spnego-ntlm" if self.mech == "spnego" else self.mech

    @property
    def flavour(self) -> str:
        """How the logon was proven, as the identity's auth_layer names it: the NTLM version,
        or the mechanism for anything that is not NTLM."""
        return self.ntlm_version or self.mech


@dataclass(frozen=True)
class StepResult:
    # The token is not secret, but it is noise in a log line; its length says enough.
    token: bytes = field(repr=False)
    complete: bool
    ok: bool
    events: list[Event] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"StepResult(token=<{len(self.token)} bytes>, complete={self.complete}, ok={self.ok}, "
                f"events={[e.kind for e in self.events]})")


def failure(reason: str, *, mech: str = "ntlm", user: str | None = None, domain: str = "",
            workstation: str = "", ntlm_version: str = "", mic: bool = False) -> AuthResult:
    return AuthResult(ok=False, reason=reason, user=user, domain=domain, workstation=workstation,
                      ntlm_version=ntlm_version, mech=mech, mic=mic)
