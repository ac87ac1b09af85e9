"""Security contexts: one state machine, typed against one mechanism Protocol.

- acceptor.py: `SecurityAcceptor`, what the engines may ask of a mechanism (NTLM, SPNEGO,
  Kerberos), and `PacketParts` for DCE/RPC packet protection.
- context.py: `SecurityContext`, the states of one RPC association's or SMB session's security,
  and `acting_identity`, the one rule of KB Q146188.
- factory.py: `AuthFactory`, fresh mechanisms for each context.
- results.py: `AuthResult` and `StepResult`, which never hold a secret.
"""

from .acceptor import KeyUnavailable, PacketParts, SecurityAcceptor
from .context import SecurityContext, SecurityStateError, State, authenticated_identity
from .factory import (AuthFactory, RPC_C_AUTHN_GSS_KERBEROS, RPC_C_AUTHN_GSS_NEGOTIATE,
                      RPC_C_AUTHN_WINNT)
from .results import AuthResult, StepResult

__all__ = [
    "AuthFactory", "AuthResult", "KeyUnavailable", "PacketParts", "RPC_C_AUTHN_GSS_KERBEROS",
    "RPC_C_AUTHN_GSS_NEGOTIATE", "RPC_C_AUTHN_WINNT", "SecurityAcceptor", "SecurityContext",
    "SecurityStateError", "State", "StepResult", "authenticated_identity",
]
