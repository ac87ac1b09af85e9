"""One DCE/RPC connection (a TCP stream or one open named pipe) as replay drives it.

For each captured client PDU: what it is, what must change before our server sees it, and
whether an answer is due. For each answer, the original server's and ours: what it says and a
comparison key (what must be equal for the two servers to have "done the same thing"; ports,
handles, challenges and timestamps always differ and are left out).

What is rewritten, and nothing else:
- context handles the original server handed out, in later request stubs (`Learned.handles`);
- association group ids in binds;
- with a password for the captured user: the NTLM AUTHENTICATE (auth3 or alter_context leg),
  recomputed over our CHALLENGE, and from then on the verifier of every signed or sealed
  request (the captured stub is unsealed with the capture's keys and sealed again with ours).
Without a password the captured AUTHENTICATE goes out as captured, and our server must refuse
it: it answers the capture's challenge, not ours.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..capture.authtokens import TokenInfo, inspect_token
from ..capture.model import (
    AUTH_LEVEL_NAMES,
    AUTH_TYPE_NAMES,
    EMSMDB_CALLS,
    EMSMDB_UUID,
    INTERFACE_NAMES,
)
from ..capture.rpcconn import FAULT_NAMES, read_user_dn
from ..capture.unseal import Unsealer, derive
from ..directory import status_name
from ..rpc import pdu as P
from ..rpc.verifier import RpcProtection, VerifyError, protect, unprotect
from ..ntlm.keys import SessionSecurity
from ..sansio import ProtocolError
from .standin import Authored, Unauthorable, ntlm_part, reauthor, server_challenge
from .state import HANDLE_LEN, Learned

EPM_UUID = "e1af8308-5d1f-11c9-91a4-08002b14a0fa"
EPM_CALLS = {0: "ept_insert", 1: "ept_delete", 2: "ept_lookup", 3: "ept_map", 4: "ept_lookup_handle_free"}
LEVEL_PACKET = 4
ASSOC_GROUP_OFFSET = 20           # bind/alter_context: header, max_xmit_frag, max_recv_frag
MAX_STUB = 1 << 20                # of one call's stub kept while its fragments arrive
REJECT_REASONS = {1: "abstract syntax not supported", 2: "transfer syntaxes not supported",
                  3: "local limit exceeded"}


@dataclass
class Said:
    """One message as the report shows it."""
    label: str
    key: tuple = ()
    final: bool = True            # False for a response fragment that is not the last one


@dataclass
class Outgoing:
    data: bytes = field(repr=False)
    label: str
    expects_answer: bool
    answers: int = 1                # final answers due when expects_answer (SMB2: one per element)
    reauthored: str | None = None   # what replay computed instead of the captured bytes
    auth: str | None = None         # "negotiate" | "authenticate" | "kerberos": a security leg
    notes: list[str] = field(default_factory=list)


def token_label(info: TokenInfo, auth_type: int) -> str:
    if info.mechanism == "kerberos" or auth_type == 16:
        return "Kerberos token"
    if info.mechanism != "ntlm" or info.message is None:
        return f"{AUTH_TYPE_NAMES.get(auth_type, auth_type)} token"
    if info.message == "authenticate":
        who = "anonymous" if info.anonymous else f"{info.domain}\\{info.user}" if info.domain else str(info.user)
        return f"NTLM{info.ntlm_version or ''} AUTHENTICATE as {who}"
    return f"NTLM {info.message.upper()}"


def tower_port(tower: bytes) -> int | None:
    """The TCP port of an ncacn_ip_tcp protocol tower (C706 appendix L, floor 4)."""
    from impacket.dcerpc.v5 import epm

    try:
        floors = epm.EPMTower(tower)["Floors"]
        if len(floors) >= 4 and floors[3]["ProtocolData"][:1] == b"\x07":
            return struct.unpack(">H", floors[3]["RelatedData"][:2])[0]
    except Exception:  # impacket's Structure raises assorted errors on foreign towers
        return None
    return None


def ept_map_ports(stub: bytes) -> list[int]:
    """The ncacn_ip_tcp ports in an ept_map response stub."""
    from impacket.dcerpc.v5 import epm

    try:
        resp = epm.ept_mapResponse(stub)
        towers = [b"".join(x if isinstance(x, bytes) else bytes([x]) for x in t["tower_octet_string"])
                  for t in resp["ITowers"]]
    except Exception:  # impacket raises anything on NDR it cannot read
        return []
    return [p for p in (tower_port(t) for t in towers) if p is not None]


class RpcChannel:
    def __init__(self, learned: Learned, transport: str) -> None:
        self.learned = learned
        self.transport = transport
        self.contexts: dict[int, str] = {}
        self.calls: dict[int, tuple[str | None, int]] = {}
        self.interfaces: list[str] = []
        self.little_endian = True
        # The security context: captured NEGOTIATE, the two CHALLENGEs, our re-authored leg.
        self.auth_params: tuple[int, int, int] | None = None   # (auth_type, level, context id)
        self.negotiate: bytes | None = None
        self.captured_challenge: bytes | None = None     # the token, for key derivation
        self.our_challenge: bytes | None = None
        self.authored: Authored | None = None
        self.captured_user: str | None = None
        self._ours: SessionSecurity | None = None   # our re-authored context, client side
        self._orig_unsealer: Unsealer | None = None
        self._orig_stubs: dict[int, bytes] = {}
        self._stubs: dict[tuple[str, int], bytes] = {}    # ("sent"|"original"|"ours", call id)
        self._orig_groups: dict[int, int] = {}
        self._map_iface: dict[int, str] = {}
        self.deterministic = False   # our CHALLENGE repeated the captured one
        self.refused_signatures = False

    # ------------------------------------------------------------------ helpers

    def call_name(self, call_id: int) -> str:
        iface, opnum = self.calls.get(call_id, (None, -1))
        if iface == EMSMDB_UUID and opnum in EMSMDB_CALLS:
            return EMSMDB_CALLS[opnum]
        if iface == EPM_UUID and opnum in EPM_CALLS:
            return EPM_CALLS[opnum]
        name = INTERFACE_NAMES.get(iface or "", iface or "?")
        return f"{name} opnum {opnum}"

    @property
    def challenges(self) -> tuple[bytes | None, bytes | None]:
        """(captured, ours) 8-byte server challenges, for the report."""
        c = server_challenge(self.captured_challenge) if self.captured_challenge else None
        o = server_challenge(self.our_challenge) if self.our_challenge else None
        return c, o

    # ------------------------------------------------------------------ client side

    def client_pdu(self, raw: bytes) -> Outgoing:
        try:
            pdu = P.decode(raw)
        except ProtocolError as exc:
            return Outgoing(raw, f"undecodable RPC PDU ({exc.reason})", expects_answer=True)
        self.little_endian = pdu.header.little_endian
        if isinstance(pdu, P.Bind):
            return self._bind(pdu, raw)
        if isinstance(pdu, P.Auth3):
            out = Outgoing(raw, "auth3", expects_answer=False)
            return self._auth_leg(pdu, out)
        if isinstance(pdu, P.Request):
            return self._request(pdu, raw)
        name = P.PTYPE_NAMES.get(pdu.header.ptype, str(pdu.header.ptype))
        return Outgoing(raw, name, expects_answer=False)

    def _bind(self, pdu: P.Bind, raw: bytes) -> Outgoing:
        verb = "alter_context" if isinstance(pdu, P.AlterContext) else "bind"
        names = []
        for ctx in pdu.contexts:
            self.contexts[ctx.context_id] = ctx.abstract.uuid
            name = INTERFACE_NAMES.get(ctx.abstract.uuid, ctx.abstract.uuid)
            names.append(f"{name} v{ctx.abstract.version[0]}.{ctx.abstract.version[1]}")
            if ctx.abstract.uuid not in self.interfaces:
                self.interfaces.append(ctx.abstract.uuid)
        auth = "no auth"
        if pdu.auth is not None:
            auth = (f"{AUTH_TYPE_NAMES.get(pdu.auth.auth_type, pdu.auth.auth_type)}, "
                    f"{AUTH_LEVEL_NAMES.get(pdu.auth.auth_level, pdu.auth.auth_level)}")
        label = f"{verb} {' + '.join(dict.fromkeys(names)) or '(no context)'} ({auth})"
        data = raw
        notes = []
        group = pdu.assoc_group_id
        if group and group in self.learned.assoc_groups:
            fmt = "<I" if pdu.header.little_endian else ">I"
            data = raw[:ASSOC_GROUP_OFFSET] + struct.pack(fmt, self.learned.assoc_groups[group]) + \
                raw[ASSOC_GROUP_OFFSET + 4:]
            notes.append(f"association group 0x{group:x} mapped to ours")
        out = Outgoing(data, label, expects_answer=True, notes=notes)
        if pdu.auth is not None:
            out = self._auth_leg(pdu, out)
        return out

    def _auth_leg(self, pdu: P.Bind | P.Auth3, out: Outgoing) -> Outgoing:
        av = pdu.auth
        if av is None:
            return out
        info = inspect_token(av.token)
        out.label += f": {token_label(info, av.auth_type)}"
        out.auth = "kerberos" if info.mechanism == "kerberos" or av.auth_type == 16 else (info.message or "token")
        if self.auth_params is None or info.message == "negotiate":
            self.auth_params = (av.auth_type, av.auth_level, av.context_id)
        if info.message == "negotiate":
            self.negotiate = av.token
        if info.mechanism == "kerberos" or av.auth_type == 16:
            out.notes.append("a captured Kerberos AP-REQ: our server must find it in its replay "
                             "cache or fail to decrypt it; replay cannot re-author Kerberos")
        if info.message != "authenticate":
            return out
        self.captured_user = f"{info.domain}\\{info.user}" if info.domain else info.user
        self._capture_keys(info, av)
        captured_ch, our_ch = self.challenges
        if captured_ch is not None and our_ch is not None and captured_ch == our_ch:
            self.deterministic = True
        keyring = self.learned.keyring
        if keyring and self.our_challenge is not None and not info.anonymous:
            try:
                authored = reauthor(av.token, self.negotiate, self.our_challenge, keyring)
            except Unauthorable as exc:
                out.notes.append(f"not re-authored: {exc}")
            else:
                self.authored = authored
                self._ours = authored.client_security()
                out.data = P.replace_auth_value(out.data, authored.token)
                out.reauthored = (f"NTLM{authored.ntlm_version} AUTHENTICATE recomputed as "
                                  f"{authored.domain}\\{authored.user} for our server's challenge")
                return out
        out.notes.append("captured AUTHENTICATE sent as captured: it answers the capture's challenge"
                         + (f" {captured_ch.hex()}" if captured_ch else "")
                         + (f", not ours ({our_ch.hex()})" if our_ch and our_ch != captured_ch else
                            ", and ours is the same one" if our_ch else ""))
        return out

    def _capture_keys(self, info: TokenInfo, av: P.AuthVerifier) -> None:
        """With the captured user's password, the capture's own session keys: they unseal the
        captured stubs, which are then sealed again with ours."""
        keyring = self.learned.keyring
        if not keyring or av.auth_level < LEVEL_PACKET:
            return
        challenge = server_challenge(self.captured_challenge) if self.captured_challenge else None
        keys = derive(ntlm_part(av.token) or b"", challenge, keyring)
        if keys.ok and keys.readers is not None:
            self._orig_unsealer = Unsealer(keys.readers, av.auth_type, av.auth_level, av.context_id)

    def _request(self, pdu: P.Request, raw: bytes) -> Outgoing:
        flags = pdu.header.pfc_flags
        iface = self.contexts.get(pdu.context_id)
        if flags & P.PFC_FIRST_FRAG or pdu.call_id not in self.calls:
            self.calls[pdu.call_id] = (iface, pdu.opnum)
            self._stubs.pop(("sent", pdu.call_id), None)
            if iface == EPM_UUID and pdu.opnum == 3 and pdu.auth is None:
                self._note_map_request(pdu)
        name = self.call_name(pdu.call_id)
        expects = bool(flags & P.PFC_LAST_FRAG) and not flags & P.PFC_MAYBE
        protected = pdu.auth is not None and pdu.auth.auth_level >= LEVEL_PACKET
        stub: bytes | None = pdu.stub
        notes: list[str] = []
        if protected:
            stub = self._open_captured(pdu)
        label = f"request {name}"
        if stub is not None and iface == EMSMDB_UUID and pdu.opnum in (0, 10):
            whole = self._stubs.get(("sent", pdu.call_id), b"") + stub
            self._stubs[("sent", pdu.call_id)] = whole[:4096]
            if flags & P.PFC_LAST_FRAG:
                dn = read_user_dn(whole, "<" if pdu.header.little_endian else ">")
                label = f"request {name}({dn or '?'})"
        elif stub is None:
            label += " (sealed)"
        if not flags & P.PFC_LAST_FRAG:
            label += " [fragment]"
        out = Outgoing(raw, label, expects_answer=expects, notes=notes)
        if protected:
            if stub is not None and self._ours is not None and self.auth_params is not None:
                stub = self.learned.swap_handles(stub)
                sc = RpcProtection(self._ours, pdu.auth.auth_type, pdu.auth.auth_level, pdu.auth.context_id)
                prefix = raw[P.HEADER_SIZE:pdu.stub_offset]
                out.data = protect(sc, P.REQUEST, flags, pdu.call_id, prefix, stub)
                out.reauthored = ("sealed again with our session's keys" if pdu.auth.auth_level == 6
                                  else "signed again with our session's keys")
            else:
                self.refused_signatures = True
                notes.append("signed/sealed with the capture's session keys, which our server does "
                             "not share: its verifier cannot check out")
            return out
        swapped = self.learned.swap_handles(pdu.stub)
        if swapped != pdu.stub:
            out.data = raw[:pdu.stub_offset] + swapped + raw[pdu.stub_offset + len(pdu.stub):]
            notes.append("context handle mapped to ours")
        return out

    def _open_captured(self, pdu: P.Request) -> bytes | None:
        if self._orig_unsealer is None:
            return pdu.stub if pdu.auth is not None and pdu.auth.auth_level < 6 else None
        try:
            return self._orig_unsealer.open(pdu, True)
        except VerifyError:
            return None

    # ------------------------------------------------------------------ answers

    def original_answer(self, raw: bytes) -> Said:
        return self._answer(raw, ours=False)

    def our_answer(self, raw: bytes) -> Said:
        return self._answer(raw, ours=True)

    def _answer(self, raw: bytes, ours: bool) -> Said:
        try:
            pdu = P.decode(raw)
        except ProtocolError as exc:
            return Said(f"undecodable ({exc.reason})", ("undecodable",))
        if isinstance(pdu, P.BindAck):     # AlterContextResp is a BindAck
            return self._bind_ack(pdu, ours)
        if isinstance(pdu, P.BindNak):
            return Said(f"bind_nak (reason {pdu.reject_reason})", ("bind_nak", pdu.reject_reason))
        if isinstance(pdu, P.Fault):
            name = FAULT_NAMES.get(pdu.status, "fault")
            return Said(f"fault {name} (0x{pdu.status:08x})", ("fault", pdu.status))
        if isinstance(pdu, P.Response):
            return self._response(pdu, ours)
        name = P.PTYPE_NAMES.get(pdu.header.ptype, str(pdu.header.ptype))
        return Said(name, (name,))

    def _bind_ack(self, pdu: P.BindAck, ours: bool) -> Said:
        verb = "alter_context_resp" if isinstance(pdu, P.AlterContextResp) else "bind_ack"
        parts, key = [], []
        ifaces = [self.contexts.get(cid) for cid in sorted(self.contexts)]
        for i, r in enumerate(pdu.results):
            name = INTERFACE_NAMES.get(ifaces[i] or "", ifaces[i] or "?") if i < len(ifaces) else "?"
            if r.result == P.RESULT_ACCEPTANCE:
                parts.append(f"accepted {name}")
            elif r.result == P.RESULT_NEGOTIATE_ACK:
                parts.append("bind-time features acknowledged")
            else:
                parts.append(f"rejected {name} ({REJECT_REASONS.get(r.reason, r.reason)})")
            key.append((r.result, r.reason if r.result else 0))
        label = f"{verb}: {', '.join(parts) or 'no results'}"
        token_kind = None
        if pdu.auth is not None:
            info = inspect_token(pdu.auth.token)
            token_kind = info.message or info.mechanism
            label += f": {token_label(info, pdu.auth.auth_type)}"
            if info.message == "challenge":
                if ours:
                    self.our_challenge = pdu.auth.token
                else:
                    self.captured_challenge = pdu.auth.token
        if ours:
            original = self._orig_groups.get(pdu.call_id)
            if original and pdu.assoc_group_id and original != pdu.assoc_group_id:
                self.learned.assoc_groups[original] = pdu.assoc_group_id
        else:
            self._orig_groups[pdu.call_id] = pdu.assoc_group_id
        return Said(label, (verb, tuple(key), token_kind))

    def _response(self, pdu: P.Response, ours: bool) -> Said:
        flags = pdu.header.pfc_flags
        name = self.call_name(pdu.call_id)
        stub = self._open_answer(pdu, ours)
        slot = ("ours" if ours else "original", pdu.call_id)
        whole = None
        if stub is not None:
            whole = self._stubs.get(slot, b"") + stub
            if len(whole) > MAX_STUB:
                whole = whole[-MAX_STUB:]
            self._stubs[slot] = whole
        if not flags & P.PFC_LAST_FRAG:
            return Said(f"response {name} [fragment]", ("response fragment",), final=False)
        self._stubs.pop(slot, None)
        if whole is None:
            return Said(f"response {name} (sealed)", ("response", name, "sealed"))
        iface, opnum = self.calls.get(pdu.call_id, (None, -1))
        self._learn_from_response(pdu.call_id, iface, opnum, whole, ours)
        if len(whole) < 4:
            return Said(f"response {name}", ("response", name))
        code = struct.unpack("<I" if pdu.header.little_endian else ">I", whole[-4:])[0]
        if iface == EMSMDB_UUID and opnum in (0, 10, 1):
            return Said(f"response {name} -> {status_name(code)} (0x{code:08x})", ("response", name, code))
        if iface == EPM_UUID and opnum == 3:
            ports = ept_map_ports(whole)
            where = f"ncacn_ip_tcp port {ports[0]}" if ports else (
                "not registered" if code else "a named pipe or other non-TCP endpoint")
            return Said(f"response ept_map -> {where}", ("response", name, code, bool(ports)))
        return Said(f"response {name} -> returns 0x{code:08x}", ("response", name, code))

    def _open_answer(self, pdu: P.Response, ours: bool) -> bytes | None:
        if pdu.auth is None or pdu.auth.auth_level < LEVEL_PACKET:
            return pdu.stub
        if ours:
            if self._ours is None or self.auth_params is None:
                return None if pdu.auth.auth_level == 6 else pdu.stub
            sc = RpcProtection(self._ours, pdu.auth.auth_type, pdu.auth.auth_level, pdu.auth.context_id)
            try:
                return unprotect(sc, pdu)
            except VerifyError:
                return None
        if self._orig_unsealer is None:
            return None if pdu.auth.auth_level == 6 else pdu.stub
        try:
            return self._orig_unsealer.open(pdu, False)
        except VerifyError:
            return None

    def _learn_from_response(self, call_id: int, iface: str | None, opnum: int, stub: bytes,
                             ours: bool) -> None:
        if not ours:
            self._orig_stubs[call_id] = stub
            if iface == EPM_UUID and opnum == 3:
                self._note_map(call_id, stub)
            return
        original = self._orig_stubs.pop(call_id, None)
        if iface == EPM_UUID and opnum == 3:
            mapped = self._map_iface.get(call_id)
            for port in ept_map_ports(stub):
                if mapped:
                    self.learned.our_ports.setdefault(mapped, port)
        if original is None:
            return
        # A call that hands out a context handle returns it first (EcDoConnect's pcxh, a
        # policy handle); a same-length answer may carry more, at the same places.
        self.learned.learn_handle(original[:HANDLE_LEN], stub[:HANDLE_LEN])
        if len(original) == len(stub):
            for pos in range(4, len(stub) - HANDLE_LEN + 1, 4):
                self.learned.learn_handle(original[pos:pos + HANDLE_LEN], stub[pos:pos + HANDLE_LEN])

    def _note_map(self, call_id: int, stub: bytes) -> None:
        iface = self._map_iface.get(call_id)
        if iface is None:
            return
        for port in ept_map_ports(stub):
            self.learned.captured_ports.setdefault(port, iface)

    def _note_map_request(self, pdu: P.Request) -> None:
        """Remember which interface an ept_map request asks for, to pair the captured answer's
        port with ours."""
        from ..interfaces.epm import TowerError, parse_tower

        stub = pdu.stub
        # ept_map (C706 appendix O): [in, ptr] object uuid, [in, ptr] map_tower: referent id,
        # tower_length, conformance, octets. A null object pointer is 4 zero bytes.
        pos = 4 + (16 if stub[:4] != b"\x00" * 4 else 0)
        if len(stub) < pos + 12:
            return
        length = struct.unpack_from("<I", stub, pos + 4)[0]
        try:
            tower = parse_tower(stub[pos + 12:pos + 12 + length])
        except (TowerError, ValueError):
            return
        self._map_iface[pdu.call_id] = tower.interface
