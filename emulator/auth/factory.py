"""One place that hands out fresh mechanisms for the SMB and DCE/RPC engines' security contexts."""

from __future__ import annotations

import os
import time
from typing import Callable

from ..config import Policy, ServerConfig
from ..directory import Directory
from ..ntlm.acceptor import NtlmAcceptor
from ..ntlm.spnego import SpnegoAcceptor, neg_token_init2
from .acceptor import SecurityAcceptor

# MS-RPCE 2.2.1.1.7 security provider identifiers.
RPC_C_AUTHN_GSS_NEGOTIATE = 9
RPC_C_AUTHN_WINNT = 10
RPC_C_AUTHN_GSS_KERBEROS = 16



class AuthFactory:
    def __init__(self, directory: Directory, policy: Policy, server: ServerConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time) -> None:
        self._directory = directory
        self._policy = policy
        self._server = server
        self._random = random_bytes
        self._now = now
        self._decoy_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"<AuthFactory domain={self._server.domain!r}>"

    def ntlm(self) -> NtlmAcceptor:
        """A fresh NTLM context: every context draws its own server challenge."""
        if self._decoy_hash is None:
            self._decoy_hash = self._random(16)
        return NtlmAcceptor(self._directory, self._policy, self._server,
                            random_bytes=self._random, now=self._now, decoy_hash=self._decoy_hash)

    def acceptor(self, auth_type: int) -> SecurityAcceptor | None:
        if auth_type == RPC_C_AUTHN_WINNT:
            return self.ntlm()
        if auth_type == RPC_C_AUTHN_GSS_NEGOTIATE:
            return self.spnego()
        return None   # Kerberos and anything else: the caller rejects the bind

    def spnego(self) -> SpnegoAcceptor:
        return SpnegoAcceptor(self.ntlm())

    def spnego_init_token(self) -> bytes:
        return neg_token_init2()
