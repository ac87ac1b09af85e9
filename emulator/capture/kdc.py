"""Kerberos KDC exchanges on TCP port 88: AS and TGS (RFC 4120 3.1, 3.3).

The ticket a server acts on was fetched from the KDC before the client ever reached the server:
AS-REQ/AS-REP for the TGT, TGS-REQ/TGS-REP for the service ticket. These exchanges name the
client and the service in clear (a KDC-REQ's cname or sname, a KDC-REP's cname and ticket
sname), so they are read without keys. Messages over TCP carry a 4-byte length (RFC 4120 7.2.2),
which with the message's own DER length marks a stream to a KDC on any port (the lab's KDC
listens on an ephemeral one). KDC traffic over UDP is not read (the lab's krb5.conf sends it
over TCP; Windows does so for every message larger than a datagram).

impacket's Kerberos ASN.1 types decode the messages. Each becomes an event in the ladder
vocabulary (`kerberos.as_req`, `kerberos.as_rep`, `kerberos.tgs_req`, `kerberos.tgs_rep`,
`kerberos.krb_error`); nothing encrypted is kept.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_KDC_MESSAGE = 1 << 20
MAX_KDC_EVENTS = 256
# RFC 4120 5.4.1, 5.4.2, 5.9.1 application tags.
KDC_TAGS = {0x6A: "as_req", 0x6B: "as_rep", 0x6C: "tgs_req", 0x6D: "tgs_rep", 0x7E: "krb_error"}
# RFC 4120 7.5.9 error codes a reader meets most.
KRB_ERRORS = {6: "KDC_ERR_C_PRINCIPAL_UNKNOWN", 7: "KDC_ERR_S_PRINCIPAL_UNKNOWN",
              18: "KDC_ERR_CLIENT_REVOKED", 24: "KDC_ERR_PREAUTH_FAILED",
              25: "KDC_ERR_PREAUTH_REQUIRED", 31: "KRB_AP_ERR_BAD_INTEGRITY",
              37: "KRB_AP_ERR_SKEW", 41: "KRB_AP_ERR_MODIFIED", 52: "KRB_ERR_RESPONSE_TOO_BIG"}


def looks_like_kdc(payload: bytes) -> bool:
    """A TCP record: a 4-byte length, then a KDC message whose DER header accounts for exactly
    that many bytes."""
    if len(payload) < 7 or payload[4] not in KDC_TAGS:
        return False
    (record,) = struct.unpack_from(">I", payload)
    first = payload[5]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(payload) < 6 + count:
            return False
        header, length = 2 + count, int.from_bytes(payload[6:6 + count], "big")
    return record == header + length


class KdcWalker:
    """One TCP stream to a KDC: frames records and reads each message's names. Which side is
    the client, the first message says (a request's sender, or a reply's receiver)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._bufs = {True: bytearray(), False: bytearray()}
        self.a_is_client: bool | None = None

    def feed(self, from_a: bool, payload: bytes, frame: int) -> None:
        buf = self._bufs[from_a]
        buf += payload
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">I", buf)
            if length > MAX_KDC_MESSAGE or length & 0x80000000:
                buf.clear()  # not a record we can frame (RFC 4120 7.2.2's reserved bit)
                self._add({"frame": frame, "kind": "malformed", "dir": _dir(from_a != (self.a_is_client is False)),
                           "layer": "kerberos", "reason": "bad_record_length"})
                return
            if len(buf) < 4 + length:
                return
            msg = bytes(buf[4:4 + length])
            del buf[:4 + length]
            if self.a_is_client is None and msg:
                self.a_is_client = (msg[0] in (0x6A, 0x6C)) == from_a
            self._add(read_kdc_message(msg, frame, from_a == self.a_is_client))

    def gap(self) -> None:
        self._bufs = {True: bytearray(), False: bytearray()}

    def _add(self, ev: dict[str, Any]) -> None:
        if len(self.events) < MAX_KDC_EVENTS:
            self.events.append(ev)


def _dir(from_client: bool) -> str:
    return "c2s" if from_client else "s2c"


def _name(principal: Any) -> str | None:
    if principal is None or not principal.hasValue():
        return None
    return "/".join(str(s) for s in principal["name-string"])


def read_kdc_message(msg: bytes, frame: int, from_client: bool) -> dict[str, Any]:
    """One KDC message as a ladder event: who asked for which service, or the error."""
    from impacket.krb5 import asn1
    from pyasn1.codec.der import decoder
    from pyasn1.error import PyAsn1Error

    kind = KDC_TAGS.get(msg[0]) if msg else None
    ev: dict[str, Any] = {"frame": frame, "kind": f"kerberos.{kind}", "dir": _dir(from_client)}
    spec = {"as_req": asn1.AS_REQ, "as_rep": asn1.AS_REP, "tgs_req": asn1.TGS_REQ,
            "tgs_rep": asn1.TGS_REP, "krb_error": asn1.KRB_ERROR}.get(kind or "")
    if spec is None:
        return {"frame": frame, "kind": "malformed", "dir": _dir(from_client), "layer": "kerberos",
                "reason": "not_a_kdc_message"}
    try:
        m = decoder.decode(msg, asn1Spec=spec())[0]
        if kind in ("as_req", "tgs_req"):
            body = m["req-body"]
            ev["client"] = _name(body["cname"])          # absent from a TGS-REQ: it is in the TGT
            ev["service"] = _name(body["sname"])
            ev["realm"] = str(body["realm"])
            padata = m["padata"]
            ev["preauth"] = bool(padata.hasValue()) and any(
                int(p["padata-type"]) == 2 for p in padata)   # PA-ENC-TIMESTAMP
        elif kind in ("as_rep", "tgs_rep"):
            ev["client"] = _name(m["cname"])
            ev["realm"] = str(m["crealm"])
            ev["service"] = _name(m["ticket"]["sname"])
        else:
            code = int(m["error-code"])
            ev["error"] = KRB_ERRORS.get(code, str(code))
            ev["service"] = _name(m["sname"])
            ev["client"] = _name(m["cname"])
    except (PyAsn1Error, ValueError, TypeError, KeyError):
        return {"frame": frame, "kind": "malformed", "dir": _dir(from_client), "layer": "kerberos",
                "reason": f"bad_{kind}"}
    return ev
