"""Where the live view listens, and whether it needs a token.

On 127.0.0.1, ::1 or localhost only this machine's users reach the page. Anywhere else
(another loopback alias included: the rule is about the name given, so it can be tested
without leaving loopback) every request must carry a random token printed at start-up, as
notebook servers do.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"
TOKEN_FREE_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class UiAddress:
    host: str
    port: int
    token: str | None = field(default=None, repr=False)

    @property
    def needs_token(self) -> bool:
        return self.token is not None

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"/?token={self.token}" if self.token else "/"
        return f"http://{host}:{self.port if port is None else port}{query}"


def parse_address(spec: str | int, *, token: str | None = None) -> UiAddress:
    """"PORT", "HOST:PORT" or "[V6]:PORT" -> UiAddress. A token is made for any host outside
    TOKEN_FREE_HOSTS unless one is given."""
    text = str(spec).strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise AddressError(f"cannot read {text!r}: use [ADDRESS]:PORT for IPv6")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise AddressError(f"cannot read {text!r}: no host before ':'")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"cannot read {text!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port {port} is out of range")
    if host not in TOKEN_FREE_HOSTS and token is None:
        token = secrets.token_urlsafe(24)
    return UiAddress(host, port, token)
