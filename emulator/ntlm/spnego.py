"""SPNEGO moved to emulator/auth/spnego.py (it negotiates Kerberos as well as NTLM); these
names stay importable from here."""

from ..auth.spnego import (ACCEPT_COMPLETED, ACCEPT_INCOMPLETE, KNOWN_MECHS, KRB5_OID,
                           MS_KRB5_OID, NEG_HINT_PRINCIPAL, NTLMSSP_OID, REJECT, REJECT_TOKEN,
                           REQUEST_MIC, SPNEGO_OID, SpnegoAcceptor, neg_token_init2,
                           neg_token_resp, read_neg_token)

__all__ = [
    "ACCEPT_COMPLETED", "ACCEPT_INCOMPLETE", "KNOWN_MECHS", "KRB5_OID", "MS_KRB5_OID",
    "NEG_HINT_PRINCIPAL", "NTLMSSP_OID", "REJECT", "REJECT_TOKEN", "REQUEST_MIC", "SPNEGO_OID",
    "SpnegoAcceptor", "neg_token_init2", "neg_token_resp", "read_neg_token",
]
