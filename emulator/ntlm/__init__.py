"""NTLM and SPNEGO mechanisms (MS-NLMP, RFC 4178, MS-SPNG) behind the SecurityAcceptor of
emulator.auth.

Sans-IO: contexts take tokens and give back tokens and events; randomness and time come from
the `AuthFactory`'s `random_bytes` and `now`.
"""

from .acceptor import NtlmAcceptor
from .keys import SessionSecurity
from .spnego import NTLMSSP_OID, SPNEGO_OID, SpnegoAcceptor

__all__ = ["NtlmAcceptor", "NTLMSSP_OID", "SessionSecurity", "SPNEGO_OID", "SpnegoAcceptor"]
