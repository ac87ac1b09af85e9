"""Reading Kerberos in a capture with the service keys of a keytab.

A passive observer sees who a Kerberos client is only inside the ticket, which is encrypted in
the service's key. Given that key (a keytab, as the lab writes one and as Wireshark reads one
with `kerberos.file`), the reader follows the same chain the server does (RFC 4120 3.2,
MS-KILE 3.4.5):

    AP-REQ ticket enc-part  --service key, usage 2-->  EncTicketPart: client principal, session key
    AP-REQ authenticator    --session key, usage 11->  Authenticator: initiator subkey
    AP-REP enc-part         --session key, usage 12->  EncAPRepPart: acceptor subkey (DCE style)

and with the context key unseals and verifies DCE/RPC stubs: RFC 4121 wrap tokens (privacy) and
MIC tokens (integrity) for the AES enctypes, with MS-KILE's header signing (SIGN_ONLY buffers)
when the client asked for it, and RFC 4757 wrap and MIC tokens for RC4-HMAC contexts (the
HMAC-MD5 and RC4 of RFC 4757 7.3, from the Cryptodome primitives impacket itself uses).

impacket's Kerberos types and crypto do the work (`impacket.krb5.asn1`, `.crypto`, `.keytab`);
nothing here is a cipher or an ASN.1 codec. Keys never leave this module: every object that
holds one has a repr without it, and results carry names and outcomes only.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..auth.acceptor import PacketParts
from ..rpc import pdu as P
from ..rpc.verifier import RpcProtection, VerifyError, unprotect
from .authtokens import unframe_kerberos
from .fileformat import CaptureError

if TYPE_CHECKING:  # impacket is imported only when keys are asked for: it is slow to import
    from impacket.krb5.crypto import Key

# RFC 4120 7.5.1 key usages; RFC 4121 2 (GSS wrap and MIC).
USAGE_TICKET, USAGE_AUTHENTICATOR, USAGE_AP_REP = 2, 11, 12
USAGE_ACCEPTOR_SEAL, USAGE_ACCEPTOR_SIGN, USAGE_INITIATOR_SEAL, USAGE_INITIATOR_SIGN = 22, 23, 24, 25
# RFC 4121 4.2.2 token flags.
FLAG_SENT_BY_ACCEPTOR, FLAG_SEALED, FLAG_ACCEPTOR_SUBKEY = 1, 2, 4
TOK_WRAP, TOK_MIC = b"\x05\x04", b"\x04\x04"
TOKEN_HEADER = 16
AES_ENCTYPES = (17, 18)
RC4_ENCTYPE = 23
# RFC 4757 7.3: the token after RFC 2743's framing (0x60, length, the krb5 OID): TOK_ID 02 01
# (wrap) or 01 01 (MIC), SGN_ALG 11 00 (HMAC-MD5), SEAL_ALG 10 00 (RC4) or ff ff, filler.
RC4_WRAP, RC4_MIC = b"\x02\x01\x11\x00\x10\x00\xff\xff", b"\x01\x01\x11\x00\xff\xff\xff\xff"
RC4_SEAL_SALT, RC4_SIGN_SALT = 13, 15
RC4_MIC_SIZE, RC4_WRAP_SIZE = 37, 45
ENCTYPE_NAMES = {17: "aes128-cts-hmac-sha1-96", 18: "aes256-cts-hmac-sha1-96", 23: "rc4-hmac",
                 3: "des-cbc-md5", 16: "des3-cbc-sha1"}


class KeytabError(CaptureError):
    """The keytab could not be read (names the file, never a key)."""


@dataclass(frozen=True)
class ServiceKey:
    principal: str  # e.g. host/exch01.corp.test@CORP.TEST
    enctype: int
    kvno: int
    key: Key = field(repr=False)


class KerberosKeys:
    """The service keys of a keytab, and how to name a ticket's client as a lab user."""

    def __init__(self, keys: list[ServiceKey], users: dict[str, str] | None = None,
                 domain: str | None = None) -> None:
        self._keys = keys
        # Lab users by lower-case name, and the lab domain they live in (from --lab).
        self._users = users or {}
        self._domain = domain

    def __repr__(self) -> str:
        return f"KerberosKeys(principals={sorted({k.principal for k in self._keys})})"

    def __bool__(self) -> bool:
        return bool(self._keys)

    @classmethod
    def load(cls, path: str) -> KerberosKeys:
        from impacket.krb5.crypto import Key
        from impacket.krb5.keytab import Keytab

        try:
            with open(path, "rb") as f:
                data = f.read()
            table = Keytab(data)
        except OSError as exc:
            raise KeytabError(f"cannot read keytab {path}: {exc.strerror}") from None
        except Exception:  # noqa: BLE001 impacket's Structure raises bare Exception on a foreign file
            raise KeytabError(f"{path} is not a keytab") from None
        keys = []
        for entry in table.entries:
            if entry.deleted:
                continue
            block = entry.main_part["keyblock"]
            enctype = int(block["keytype"])
            try:
                key = Key(enctype, bytes(block["keyvalue"]["data"]))
            except (ValueError, KeyError):  # an enctype impacket does not implement (camellia ...)
                continue
            principal = entry.main_part["principal"].prettyPrint()
            keys.append(ServiceKey(principal.decode("utf-8", "replace")
                                   if isinstance(principal, bytes) else str(principal),
                                   enctype, int(entry.kvno), key))
        if not keys:
            raise KeytabError(f"{path} holds no usable key")
        return cls(keys)

    def with_lab(self, users: list[str], domain: str) -> KerberosKeys:
        return KerberosKeys(self._keys, {u.lower(): u for u in users}, domain)

    def candidates(self, enctype: int, service: str) -> list[ServiceKey]:
        """Keys that may decrypt a ticket for `service` (name without realm): the service's
        own first, then every other key of that enctype (a keytab may name the host
        differently from the ticket)."""
        same = [k for k in self._keys if k.enctype == enctype]
        own = [k for k in same if k.principal.split("@")[0].lower() == service.lower()]
        return own + [k for k in same if k not in own]

    def lab_user(self, name: str, realm: str) -> tuple[str, str]:
        """(user, domain) the principal maps to: the lab user of that name in the lab's domain
        when a lab was given, else the principal's name in its realm."""
        if self._users:
            user = self._users.get(name.lower())
            if user is not None and self._domain is not None:
                return user, self._domain
        return name, realm


def _message(token: bytes) -> bytes:
    inner = unframe_kerberos(token)
    return inner[2:] if inner is not None else token


def _principal(name: Any) -> str:
    return "/".join(str(s) for s in name["name-string"])


@dataclass
class TicketReading:
    """What an AP-REQ said, read with a service key. `result`: ok | no_key | bad_integrity |
    malformed. Names only; the keys stay in the KerberosExchange."""
    result: str
    service: str = ""
    enctype: str = ""
    client: str | None = None  # user@REALM
    user: str | None = None    # the lab user the client maps to
    domain: str | None = None


class KerberosExchange:
    """One Kerberos context as a capture shows it: the AP-REQ, then the AP-REP(s), and the key
    its wrap and MIC tokens use."""

    def __init__(self, keys: KerberosKeys) -> None:
        self._keys = keys
        self._session: Key | None = None
        self._initiator_subkey: Key | None = None
        self._acceptor_subkey: Key | None = None
        self.ticket: TicketReading | None = None

    def __repr__(self) -> str:
        return f"<KerberosExchange {self.ticket.client if self.ticket else None}>"

    @property
    def readable(self) -> bool:
        """The context's wrap and MIC tokens can be read here: AES (RFC 4121) or RC4 (RFC 4757)."""
        return self._session is not None and self._session.enctype in AES_ENCTYPES + (RC4_ENCTYPE,)

    def rc4_keys(self) -> list[Key]:
        """RFC 4757 tokens carry no key flag: the subkeys, then the session key, are tried."""
        keys = [self._acceptor_subkey, self._initiator_subkey, self._session]
        return [k for k in keys if k is not None and k.enctype == RC4_ENCTYPE]

    def ap_req(self, token: bytes) -> TicketReading:
        from impacket.krb5.asn1 import AP_REQ, Authenticator, EncTicketPart
        from pyasn1.codec.der import decoder
        from pyasn1.error import PyAsn1Error

        try:
            req = decoder.decode(_message(token), asn1Spec=AP_REQ())[0]
            ticket = req["ticket"]
            service = _principal(ticket["sname"])
            realm = str(ticket["realm"])
            enctype = int(ticket["enc-part"]["etype"])
            cipher = bytes(ticket["enc-part"]["cipher"])
        except (PyAsn1Error, ValueError, TypeError, KeyError):
            self.ticket = TicketReading("malformed")
            return self.ticket
        reading = TicketReading("no_key", f"{service}@{realm}", ENCTYPE_NAMES.get(enctype, str(enctype)))
        self.ticket = reading
        plain = None
        for candidate in self._keys.candidates(enctype, service):
            plain = _decrypt(candidate.key, USAGE_TICKET, cipher)
            if plain is not None:
                break
        else:
            if self._keys.candidates(enctype, service):
                reading.result = "bad_integrity"
            return reading
        try:
            part = decoder.decode(plain, asn1Spec=EncTicketPart())[0]
            name, crealm = _principal(part["cname"]), str(part["crealm"])
            session = _key(part["key"])
            auth_enc = req["authenticator"]
            auth_plain = _decrypt(session, USAGE_AUTHENTICATOR, bytes(auth_enc["cipher"]))
        except (PyAsn1Error, ValueError, TypeError, KeyError):
            reading.result = "malformed"
            return reading
        if auth_plain is None:
            reading.result = "bad_integrity"  # the authenticator does not match the ticket
            return reading
        try:
            authenticator = decoder.decode(auth_plain, asn1Spec=Authenticator())[0]
            subkey = authenticator["subkey"]
            self._initiator_subkey = _key(subkey) if subkey.hasValue() else None
        except (PyAsn1Error, ValueError, TypeError, KeyError):
            reading.result = "malformed"
            return reading
        self._session = session
        reading.result, reading.client = "ok", f"{name}@{crealm}"
        reading.user, reading.domain = self._keys.lab_user(name, crealm)
        return reading

    def ap_rep(self, token: bytes) -> str:
        """Read an AP-REP with the session key; keep the acceptor subkey it carries (DCE style:
        the server's AP-REP in the bind_ack). ok | no_key | bad_integrity | malformed."""
        from impacket.krb5.asn1 import AP_REP, EncAPRepPart
        from pyasn1.codec.der import decoder
        from pyasn1.error import PyAsn1Error

        if self._session is None:
            return "no_key"
        try:
            rep = decoder.decode(_message(token), asn1Spec=AP_REP())[0]
            plain = _decrypt(self._session, USAGE_AP_REP, bytes(rep["enc-part"]["cipher"]))
            if plain is None:
                return "bad_integrity"
            part = decoder.decode(plain, asn1Spec=EncAPRepPart())[0]
            subkey = part["subkey"]
        except (PyAsn1Error, ValueError, TypeError, KeyError):
            return "malformed"
        if subkey.hasValue() and self._acceptor_subkey is None:
            self._acceptor_subkey = _key(subkey)
        return "ok"

    def session_key_bytes(self) -> bytes | None:
        """The context's session key as GSS_C_INQ_SSPI_SESSION_KEY gives it to SMB (MS-KILE
        3.1.1.2), for capture/smb3_keys.py. Never printed."""
        key = self.context_key(True)
        return bytes(key.contents) if key is not None else None

    def context_key(self, acceptor_subkey: bool) -> Key | None:
        """RFC 4121 2: the acceptor's subkey when the token says so, else the initiator's
        subkey, else the ticket's session key."""
        if acceptor_subkey and self._acceptor_subkey is not None:
            return self._acceptor_subkey
        return self._initiator_subkey or self._session


def _key(block: Any) -> Key:
    from impacket.krb5.crypto import Key
    return Key(int(block["keytype"]), bytes(block["keyvalue"]))


def _decrypt(key: Key, usage: int, cipher: bytes) -> bytes | None:
    from impacket.krb5.crypto import InvalidChecksum, _enctype_table

    profile = _enctype_table.get(key.enctype)
    if profile is None:
        return None
    try:
        return profile.decrypt(key, usage, cipher)
    except (InvalidChecksum, ValueError):
        return None


# ---------------------------------------------------------------- RFC 4121 tokens in DCE/RPC

def _usage(flags: int, sealed: bool) -> int:
    if flags & FLAG_SENT_BY_ACCEPTOR:
        return USAGE_ACCEPTOR_SEAL if sealed else USAGE_ACCEPTOR_SIGN
    return USAGE_INITIATOR_SEAL if sealed else USAGE_INITIATOR_SIGN


class KerberosPacketReader:
    """PacketProtection seen from a reader: checks MIC tokens and unwraps wrap tokens of one
    context. It writes nothing (a reader never signs)."""

    def __init__(self, exchange: KerberosExchange) -> None:
        self._exchange = exchange

    def __repr__(self) -> str:
        return "<KerberosPacketReader>"

    # LevelSizedSignatures: a MIC token is 16 + 12 bytes for AES; a wrap token's auth_value is
    # its header and the rotated part, whose size the client's filler decides.
    def signature_size(self, sealed: bool) -> int:
        return 60 if sealed else 28

    def accepts_signature_size(self, size: int, sealed: bool) -> bool:
        if sealed:
            return TOKEN_HEADER + 12 <= size <= 4096
        return size in (28, RC4_MIC_SIZE)

    def sig_size(self) -> int:
        return 60

    def sign_packet(self, parts: PacketParts) -> bytes:
        raise VerifyError("a capture reader does not sign")

    def seal_packet(self, parts: PacketParts) -> tuple[bytes, bytes]:
        raise VerifyError("a capture reader does not seal")

    def _aes(self, header: bytes, sealed: bool) -> tuple[Any, Key, int] | None:
        from impacket.krb5.crypto import _enctype_table

        if len(header) < TOKEN_HEADER or header[:2] != (TOK_WRAP if sealed else TOK_MIC):
            return None
        flags = header[2]
        key = self._exchange.context_key(bool(flags & FLAG_ACCEPTOR_SUBKEY))
        if key is None or key.enctype not in AES_ENCTYPES:
            return None
        return _enctype_table[key.enctype], key, _usage(flags, sealed)

    def check_packet(self, parts: PacketParts, signature: bytes) -> bool:
        """RFC 4121 4.2.6.1: checksum = HMAC over the message then the token header."""
        from impacket.krb5.crypto import _checksum_table

        if len(signature) == RC4_MIC_SIZE:
            return self._rc4(parts, signature, sealed=False) is not None
        found = self._aes(signature[:TOKEN_HEADER], False)
        if found is None or len(signature) != 28:
            return False
        _profile, key, usage = found
        cksum = _checksum_table[15 if key.enctype == 17 else 16]
        header = signature[:TOKEN_HEADER]
        for message in _signed_variants(parts):
            if hmac.compare_digest(cksum.checksum(key, usage, message + header), signature[TOKEN_HEADER:]):
                return True
        return False

    def unseal_packet(self, parts: PacketParts, signature: bytes) -> bytes | None:
        """RFC 4121 4.2.4 with MS-KILE 3.4.5.4.1: the wrap token's header is the auth_value's
        first 16 bytes; the rest of it and the sealed stub are the ciphertext rotated right by
        RRC (+ EC, as Windows counts it). Decrypt with impacket's AES-CTS, then check the HMAC
        over confounder | (PDU header) | stub | (sec_trailer) | filler | token header."""
        from Cryptodome.Hash import HMAC

        if len(signature) == RC4_WRAP_SIZE and signature[:1] == b"\x60":
            return self._rc4(parts, signature, sealed=True)
        header = signature[:TOKEN_HEADER]
        found = self._aes(header, True)
        if found is None or not header[2] & FLAG_SEALED:
            return None
        profile, key, usage = found
        ec = int.from_bytes(header[4:6], "big")
        rrc = int.from_bytes(header[6:8], "big")
        rotated = signature[TOKEN_HEADER:] + parts.data
        ki = profile.derive(key, usage.to_bytes(4, "big") + b"\x55")
        ke = profile.derive(key, usage.to_bytes(4, "big") + b"\xaa")
        mac_size = profile.macsize
        for shift in dict.fromkeys((rrc + ec, rrc)):
            if not rotated or shift > len(rotated):
                continue
            shift %= len(rotated)
            ciphertext = rotated[shift:] + rotated[:shift]
            body, mac = ciphertext[:-mac_size], ciphertext[-mac_size:]
            if len(body) < profile.blocksize + TOKEN_HEADER + ec:
                continue
            plain = profile.basic_decrypt(ke, body)
            tail = plain[len(plain) - ec - TOKEN_HEADER:]
            # The encrypted copy of the header has RRC 0 (RFC 4121 4.2.4).
            if tail[ec:][:6] != header[:6] or tail[ec + 8:] != header[8:]:
                continue
            confounder, data = plain[:profile.blocksize], plain[profile.blocksize:len(plain) - len(tail)]
            for pre, post in _sign_only_variants(parts):
                expected = HMAC.new(ki.contents, confounder + pre + data + post + tail,
                                    profile.hashmod).digest()[:mac_size]
                if hmac.compare_digest(expected, mac):
                    return data
        return None


    def _rc4(self, parts: PacketParts, signature: bytes, sealed: bool) -> bytes | None:
        """RFC 4757 7.3 in DCE style (the token framed, the data outside it): recover the
        sequence number with the checksum, decrypt confounder and data, check the checksum.
        Returns the data, or None when no key of the context verifies."""
        from Cryptodome.Cipher import ARC4
        from Cryptodome.Hash import HMAC, MD5

        token = _rc4_token(signature)
        if token is None or token[:8] != (RC4_WRAP if sealed else RC4_MIC):
            return None
        header, seq_enc, cksum = token[:8], token[8:16], token[16:24]
        salt = (RC4_SEAL_SALT if sealed else RC4_SIGN_SALT).to_bytes(4, "little")
        for key in self._exchange.rc4_keys():
            k = key.contents
            seq = ARC4.new(_hmac_md5(_hmac_md5(k, b"\0\0\0\0"), cksum)).decrypt(seq_enc)
            confounder, data = b"", parts.data
            if sealed:
                local = bytes(b ^ 0xF0 for b in k)
                rc4 = ARC4.new(_hmac_md5(_hmac_md5(local, b"\0\0\0\0"), seq[:4]))
                confounder, data = rc4.decrypt(token[24:32]), rc4.decrypt(parts.data)
            sign_key = _hmac_md5(k, b"signaturekey\0")
            for pre, post in _sign_only_variants(parts):
                digest = MD5.new(salt + header + confounder + pre + data + post).digest()
                if hmac.compare_digest(HMAC.new(sign_key, digest, MD5).digest()[:8], cksum):
                    return data
        return None


def _hmac_md5(key: bytes, data: bytes) -> bytes:
    from Cryptodome.Hash import HMAC, MD5
    return HMAC.new(key, data, MD5).digest()


def _rc4_token(signature: bytes) -> bytes | None:
    """The 32-byte (wrap) or 24-byte (MIC) RFC 4757 token after its GSS framing."""
    if signature[:1] != b"\x60" or len(signature) < 2:
        return None
    at = 2 + (signature[1] & 0x7F if signature[1] & 0x80 else 0)
    if signature[at:at + 1] != b"\x06" or len(signature) < at + 2:
        return None
    return signature[at + 2 + signature[at + 1]:]


def _signed_variants(parts: PacketParts) -> tuple[bytes, ...]:
    # Header signing is agreed in the bind (PFC_SUPPORT_HEADER_SIGN); the reader tries the
    # agreed form first and the other after.
    whole, stub = parts.pre + parts.data + parts.post, parts.data
    return (whole, stub) if parts.header_signing else (stub, whole)


def _sign_only_variants(parts: PacketParts) -> tuple[tuple[bytes, bytes], ...]:
    with_header, without = (parts.pre, parts.post), (b"", b"")
    return (with_header, without) if parts.header_signing else (without, with_header)


class KerberosUnsealer:
    """Per connection: opens signed and sealed fragments of one Kerberos context (the
    capture reader's counterpart of unseal.Unsealer)."""

    def __init__(self, exchange: KerberosExchange, auth_type: int, auth_level: int,
                 context_id: int, header_signing: bool) -> None:
        self._protection = KerberosPacketReader(exchange)
        self._ctx = (auth_type, auth_level, context_id, header_signing)

    def __repr__(self) -> str:
        return "<KerberosUnsealer>"

    def open(self, pdu: P.Request | P.Response, from_client: bool) -> bytes:
        """Plaintext stub of a signed or sealed fragment; raises VerifyError."""
        auth_type, level, ctx, header_signing = self._ctx
        if pdu.auth is not None:
            level = pdu.auth.auth_level
        return unprotect(RpcProtection(self._protection, auth_type, level, ctx, header_signing), pdu)
