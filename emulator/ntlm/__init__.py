"""NTLM and SPNEGO acceptors (MS-NLMP, RFC 4178, MS-SPNG) for the SMB and DCE/RPC engines.

Sans-IO: contexts take tokens and give back tokens and events; randomness and time come from
the `AuthFactory`'s `random_bytes` and `now`.
"""

from .acceptor import NtlmAcceptor
from .factory import (AuthFactory, RPC_C_AUTHN_GSS_KERBEROS, RPC_C_AUTHN_GSS_NEGOTIATE,
                      RPC_C_AUTHN_WINNT, SecurityAcceptor)
from .keys import KeyUnavailable, SessionSecurity
from .results import AuthResult, StepResult
from .spnego import NTLMSSP_OID, SPNEGO_OID, SpnegoAcceptor

__all__ = [
    "AuthFactory", "AuthResult", "KeyUnavailable", "NtlmAcceptor", "NTLMSSP_OID",
    "RPC_C_AUTHN_GSS_KERBEROS", "RPC_C_AUTHN_GSS_NEGOTIATE", "RPC_C_AUTHN_WINNT",
    "SecurityAcceptor", "SessionSecurity", "SPNEGO_OID", "SpnegoAcceptor", "StepResult",
]
