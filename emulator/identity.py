"""Who the server acts on behalf of.

This is the value the KB is about. A transport hands the RPC core the identity it already
established (the SMB session's user for a named pipe, nobody for raw TCP); an authenticated
RPC bind replaces it. Interfaces only ever read the result.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where an identity came from. The names are the ones in the `rpc.identity` event.
SMB_SESSION = "smb_session"
RPC_AUTH = "rpc_auth"
ANONYMOUS_SOURCE = "anonymous"


@dataclass(frozen=True)
class Identity:
    user: str | None  # None means anonymous
    domain: str = ""
    source: str = ANONYMOUS_SOURCE
    # How the identity was proven: "smb_session_setup" or "rpc_bind", and the NTLM flavour.
    auth_layer: str = "none"
    # The mechanism that proved it, in the words of explain's `mechanism` field: ntlm,
    # spnego-ntlm, kerberos, spnego-kerberos, schannel; "none" for nobody.
    mechanism: str = "none"

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    @property
    def qualified(self) -> str:
        """DOMAIN\\user, or "anonymous"."""
        if self.user is None:
            return "anonymous"
        return f"{self.domain}\\{self.user}" if self.domain else self.user


ANONYMOUS = Identity(user=None)
