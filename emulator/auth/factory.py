"""One place that hands out fresh mechanisms for the SMB and DCE/RPC engines' security contexts."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

from ..config import Policy, ServerConfig
from ..directory import Directory
from ..ntlm.acceptor import NtlmAcceptor
from .acceptor import SecurityAcceptor
from .spnego import SpnegoAcceptor, neg_token_init2, offered_mechs

if TYPE_CHECKING:
    from ..kerberos.acceptor import KerberosAcceptor, KerberosCredentials, KerberosService

# MS-RPCE 2.2.1.1.7 security provider identifiers.
RPC_C_AUTHN_GSS_NEGOTIATE = 9
RPC_C_AUTHN_WINNT = 10
RPC_C_AUTHN_GSS_KERBEROS = 16


class AuthFactory:
    def __init__(self, directory: Directory, policy: Policy, server: ServerConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time,
                 kerberos: "KerberosService | None" = None) -> None:
        self._directory = directory
        self._policy = policy
        self._server = server
        self._random = random_bytes
        self._now = now
        self._decoy_hash: bytes | None = None
        self._kerberos: "KerberosCredentials | None" = None
        if kerberos is not None:
            # python-gssapi is imported only by labs that run a realm.
            from ..kerberos import acceptor as kerberos_acceptor

            self._kerberos = kerberos_acceptor.KerberosCredentials(kerberos)

    def __repr__(self) -> str:
        krb = f" realm={self._kerberos.service.realm!r}" if self._kerberos else ""
        return f"<AuthFactory domain={self._server.domain!r}{krb}>"

    @property
    def kerberos_enabled(self) -> bool:
        return self._kerberos is not None

    def ntlm(self) -> NtlmAcceptor:
        """A fresh NTLM context: every context draws its own server challenge."""
        if self._decoy_hash is None:
            self._decoy_hash = self._random(16)
        return NtlmAcceptor(self._directory, self._policy, self._server,
                            random_bytes=self._random, now=self._now, decoy_hash=self._decoy_hash)

    def kerberos(self, mech_name: str = "kerberos") -> "KerberosAcceptor | None":
        """A fresh Kerberos context, or None when the lab has no realm."""
        if self._kerberos is None:
            return None
        from ..kerberos.acceptor import KerberosAcceptor

        return KerberosAcceptor(self._kerberos, self._directory, mech_name=mech_name)

    def acceptor(self, auth_type: int) -> SecurityAcceptor | None:
        if auth_type == RPC_C_AUTHN_WINNT:
            # Plain NTLM is below a policy that requires Kerberos: refused like any unknown type.
            return None if self._policy.require_kerberos else self.ntlm()
        if auth_type == RPC_C_AUTHN_GSS_NEGOTIATE:
            return self.spnego()
        if auth_type == RPC_C_AUTHN_GSS_KERBEROS:
            return self.kerberos()
        return None   # anything else: the caller rejects the bind

    def _kerberos_for_spnego(self, mech_name: str) -> "KerberosAcceptor":
        k = self.kerberos(mech_name)
        if k is None:
            raise RuntimeError("SPNEGO chose Kerberos in a lab without a realm")
        return k

    def spnego(self) -> SpnegoAcceptor:
        maker = self._kerberos_for_spnego if self._kerberos is not None else None
        return SpnegoAcceptor(self.ntlm(), maker, require_kerberos=self._policy.require_kerberos)

    def spnego_init_token(self) -> bytes:
        return neg_token_init2(offered_mechs(self._kerberos is not None,
                                             not self._policy.require_kerberos))
