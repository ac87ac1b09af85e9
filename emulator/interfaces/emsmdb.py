"""EMSMDB, the Exchange store interface: who may open which mailbox (MS-OXCRPC 3.1.4).

This is where the KB's outcome becomes visible. The interface never decides *who* is
calling: the RPC core hands it `ctx.identity` (the SMB session's user on a named pipe unless
an authenticated bind replaced it). It only asks the directory whether that identity may open
the mailbox DN the client named, and reports the answer as a MAPI status in the return value
of EcDoConnect(Ex), exactly as Exchange does; a refusal is never a transport fault.

The NDR structures below follow the MS-OXCRPC IDL and the legacy EcDoConnect/EcDoRpc wire
format seen in a real Exchange 5.5 capture. They are impacket NDRCALL classes so that the
synthetic client (built on impacket's DCE/RPC client) calls the server with the very same
definitions; `hEcDoConnect`, `hEcDoConnectEx` and `hEcDoDisconnect` are its entry points.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

from impacket.dcerpc.v5.dtypes import LPSTR, STR, ULONG, USHORT
from impacket.dcerpc.v5.ndr import (NDRCALL, NDRSTRUCT, NDRUniConformantArray,
                                    NDRUniConformantVaryingArray)
from impacket.dcerpc.v5.rpcrt import DCERPCException
from impacket.uuid import uuidtup_to_bin

from ..config import AUTH_LEVEL_NAMES, Policy, ServerConfig
from ..directory import (EC_NOT_ENCRYPTED, EC_SUCCESS, Directory, status_hex,
                         status_name)
from ..events import Event, event
from ..rpc.interface import (NCA_S_FAULT_CONTEXT_MISMATCH, NCA_S_FAULT_REMOTE_NO_MEMORY,
                             NCA_S_OP_RNG_ERROR,
                             CallContext, RpcFault, RpcInterface)
from . import emsmdb_wire as wire
from . import ndr
from .ndr import bad_stub, decode_call

EMSMDB_UUID = "a4f1db00-ca47-1067-b31f-00dd010662da"
EMSMDB_VERSION = (0, 81)
MSRPC_UUID_EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))

# Opnums, MS-OXCRPC 3.1.4 (0-2 and 6 are the Exchange 4.0/5.5-era calls).
OP_EC_DO_CONNECT = 0
OP_EC_DO_DISCONNECT = 1
OP_EC_DO_RPC = 2
OP_EC_DUMMY_RPC = 6
OP_EC_DO_CONNECT_EX = 10
OP_EC_DO_RPC_EXT2 = 11

RPC_C_AUTHN_LEVEL_PKT_PRIVACY = 6

# What the server announces after a successful connect. The version triple is Exchange
# 5.5 SP4's, as in the reference capture; the poll and retry values are the ones Exchange
# returns (MS-OXCRPC 3.1.4.11: pcmsPollsMax, pcRetry, pcmsRetryDelay).
SERVER_VERSION = (5, 2653, 23)
POLLS_MAX_MS = 60000
RETRY_COUNT = 6
RETRY_DELAY_MS = 10000

# MS-OXCRPC 3.1.4.2 / 3.1.4.11 range() limits on the in/out buffer sizes.
MAX_CB_OUT = 0x40000
MAX_CB_AUX_OUT = 0x1008

HANDLE_SIZE = 20
NULL_HANDLE = b"\x00" * HANDLE_SIZE
# A client opens a handful of sessions; a connection piling up thousands is hostile.
MAX_HANDLES_PER_CONNECTION = 256
HANDLES_KEY = "handles"          # ctx.conn_state[HANDLES_KEY]: {handle bytes: Identity}


# ------------------------------------------------------------------ NDR structures (MS-OXCRPC)

class CXH(NDRSTRUCT):
    """A context handle on the wire: 4 attribute bytes and a 16-byte UUID (C706 / MS-RPCE
    2.2.4.4 ndr_context_handle)."""
    structure = (("Data", "20s=b''"),)

    def getAlignment(self) -> int:
        return 4


class VERSION3(NDRSTRUCT):
    """`unsigned short rgw...Version[3]`: a fixed array, marshalled as three shorts."""
    structure = (("Major", USHORT), ("Minor", USHORT), ("Build", USHORT))


class BYTE_CARRAY(NDRUniConformantArray):
    """`[size_is(n)] unsigned char []`: conformant byte array."""
    item = "c"


class BYTE_CVARRAY(NDRUniConformantVaryingArray):
    """`[size_is(n), length_is(m)] unsigned char []`: conformant varying byte array."""
    item = "c"


class DCERPCSessionError(DCERPCException):
    """impacket's DCERPC_v5.request looks this name up in the request's module when a call
    returns a non-zero status and checkError is on."""

    def __str__(self) -> str:
        code = self.error_code or 0
        return f"EMSMDB SessionError: {status_name(code)} ({status_hex(code)})"


class EcDoConnect(NDRCALL):
    """MS-OXCRPC 3.1.4.1, opnum 0 (the request a real Outlook of the Exchange 5.5 era sends)."""
    opnum = OP_EC_DO_CONNECT
    structure = (
        ("szUserDN", STR),                # [in, string, charset(DOS)], a [ref] pointer: no referent id
        ("ulFlags", ULONG),
        ("ulConMod", ULONG),
        ("cbLimit", ULONG),
        ("ulCpid", ULONG),
        ("ulLcidString", ULONG),
        ("ulLcidSort", ULONG),
        ("ulIcxrLink", ULONG),
        ("usFCanConvertCodePages", USHORT),
        ("rgwClientVersion", VERSION3),
        ("pulTimeStamp", ULONG),          # [in, out]
    )


class EcDoConnectResponse(NDRCALL):
    structure = (
        ("pcxh", CXH),
        ("pcmsPollsMax", ULONG),
        ("pcRetry", ULONG),
        ("pcmsRetryDelay", ULONG),
        ("picxr", USHORT),
        ("szDNPrefix", LPSTR),            # [out, string] char **: a unique pointer inside a ref one
        ("szDisplayName", LPSTR),
        ("rgwServerVersion", VERSION3),
        ("rgwBestVersion", VERSION3),
        ("pulTimeStamp", ULONG),
        ("ErrorCode", ULONG),             # the MAPISTATUS return value
    )


class EcDoConnectEx(NDRCALL):
    """MS-OXCRPC 3.1.4.11, opnum 10: EcDoConnect plus auxiliary buffers."""
    opnum = OP_EC_DO_CONNECT_EX
    structure = EcDoConnect.structure + (
        ("rgbAuxIn", BYTE_CARRAY),        # [in, size_is(cbAuxIn)]
        ("cbAuxIn", ULONG),
        ("pcbAuxOut", ULONG),             # [in, out, range(0, 0x1008)]
    )


class EcDoConnectExResponse(NDRCALL):
    structure = EcDoConnectResponse.structure[:-1] + (
        ("rgbAuxOut", BYTE_CVARRAY),      # [out, length_is(*pcbAuxOut), size_is(*pcbAuxOut)]
        ("pcbAuxOut", ULONG),
        ("ErrorCode", ULONG),
    )


class EcDoDisconnect(NDRCALL):
    """MS-OXCRPC 3.1.4.3, opnum 1: [in, out, ref] CXH *pcxh."""
    opnum = OP_EC_DO_DISCONNECT
    structure = (("pcxh", CXH),)


class EcDoDisconnectResponse(NDRCALL):
    structure = (("pcxh", CXH), ("ErrorCode", ULONG))


class EcDoRpc(NDRCALL):
    """Opnum 2, the legacy ROP call. On the wire (reference capture): the handle, the ROP
    buffer as one conformant varying array (size_is(cbIn), length_is(*pcbOut)), then
    [in, out] unsigned short *pcbOut and [in] unsigned short cbIn."""
    opnum = OP_EC_DO_RPC
    structure = (
        ("pcxh", CXH),
        ("rgb", BYTE_CVARRAY),
        ("pcbOut", USHORT),
        ("cbIn", USHORT),
    )


class EcDoRpcResponse(NDRCALL):
    structure = (
        ("pcxh", CXH),
        ("rgb", BYTE_CVARRAY),
        ("pcbOut", USHORT),
        ("ErrorCode", ULONG),
    )


class EcDummyRpc(NDRCALL):
    """MS-OXCRPC 3.1.4.9, opnum 6: no parameters; a liveness probe."""
    opnum = OP_EC_DUMMY_RPC
    structure = ()


class EcDummyRpcResponse(NDRCALL):
    structure = (("ErrorCode", ULONG),)


class EcDoRpcExt2(NDRCALL):
    """MS-OXCRPC 3.1.4.2, opnum 11."""
    opnum = OP_EC_DO_RPC_EXT2
    structure = (
        ("pcxh", CXH),
        ("pulFlags", ULONG),
        ("rgbIn", BYTE_CARRAY),           # [in, size_is(cbIn)]
        ("cbIn", ULONG),
        ("pcbOut", ULONG),                # [in, out, range(0, 0x40000)]
        ("rgbAuxIn", BYTE_CARRAY),        # [in, size_is(cbAuxIn)]
        ("cbAuxIn", ULONG),
        ("pcbAuxOut", ULONG),             # [in, out, range(0, 0x1008)]
    )


class EcDoRpcExt2Response(NDRCALL):
    structure = (
        ("pcxh", CXH),
        ("pulFlags", ULONG),
        ("rgbOut", BYTE_CVARRAY),
        ("pcbOut", ULONG),
        ("rgbAuxOut", BYTE_CVARRAY),
        ("pcbAuxOut", ULONG),
        ("pulTransTime", ULONG),
        ("ErrorCode", ULONG),
    )


def _set_bytes(array: NDRUniConformantVaryingArray | NDRUniConformantArray, data: bytes,
               maximum: int | None = None) -> None:
    array["Data"] = data
    if maximum is not None and maximum > 0:
        # impacket writes fields["MaximumCount"] as the conformance when it is set.
        array.fields["MaximumCount"] = maximum


def _array_bytes(array: Any) -> bytes:
    data = array["Data"]
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return b"".join(x if isinstance(x, bytes) else bytes([x]) for x in data)


def _conformance(array: Any) -> int:
    """The max count impacket read for a conformant array (what size_is() must equal)."""
    m = array.fields.get("MaximumCount")
    return int(m) if m else len(_array_bytes(array))


# [in] parameters of each call, for big-endian callers (ndr.py). The ROP and auxiliary
# buffers are byte arrays whose content MS-OXCRPC defines little-endian: never swapped.
_U32, _U16 = ndr.U32, ndr.U16
_CONNECT = (ndr.CSTRING, *[_U32] * 7, *[_U16] * 4, _U32)
REQUESTS: dict[int, ndr.Layout] = {
    OP_EC_DO_CONNECT: ndr.params(*_CONNECT),
    OP_EC_DO_CONNECT_EX: ndr.params(*_CONNECT, ndr.conf_array(ndr.U8), _U32, _U32),
    OP_EC_DO_DISCONNECT: ndr.params(ndr.HANDLE),
    OP_EC_DO_RPC: ndr.params(ndr.HANDLE, ndr.conf_varying_array(ndr.U8), _U16, _U16),
    OP_EC_DO_RPC_EXT2: ndr.params(ndr.HANDLE, _U32, ndr.conf_array(ndr.U8), _U32, _U32,
                                  ndr.conf_array(ndr.U8), _U32, _U32),
}


# ------------------------------------------------------------------ the interface

class EmsmdbInterface(RpcInterface):
    uuid = EMSMDB_UUID
    version = EMSMDB_VERSION
    name = "emsmdb"

    def __init__(self, directory: Directory, policy: Policy, server: ServerConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.directory = directory
        self.policy = policy
        self.server = server
        self._random_bytes = random_bytes
        # picxr, the session index a client may later link to (ulIcxrLink); 16 bits on the wire.
        self._icxr = itertools.count(1)

    # -- dispatch

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        stub = ndr.in_little_endian(ctx, REQUESTS.get(opnum), stub, "emsmdb")
        # The logon calls go through the hand-written codec (emsmdb_wire): they run on every
        # logon, and impacket's generic NDR objects were the largest cost of a TCP logon.
        if opnum == OP_EC_DO_CONNECT:
            return self._connect(wire.decode_connect(stub, extended=False), ctx, extended=False)
        if opnum == OP_EC_DO_CONNECT_EX:
            return self._connect(wire.decode_connect(stub, extended=True), ctx, extended=True)
        if opnum == OP_EC_DO_DISCONNECT:
            return self._disconnect(wire.decode_disconnect(stub), ctx)
        if opnum == OP_EC_DO_RPC:
            return self._do_rpc(decode_call(EcDoRpc, stub), ctx)
        if opnum == OP_EC_DUMMY_RPC:
            resp = EcDummyRpcResponse()
            resp["ErrorCode"] = EC_SUCCESS
            return resp.getData()
        if opnum == OP_EC_DO_RPC_EXT2:
            return self._do_rpc_ext2(decode_call(EcDoRpcExt2, stub), ctx)
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"emsmdb opnum {opnum}")

    def connection_closed(self, ctx_state: dict[str, Any]) -> list[Event]:
        handles = ctx_state.pop(HANDLES_KEY, None) or {}
        if not handles:
            return []
        return [event("emsmdb", "emsmdb.handle_released", count=len(handles))]

    # -- EcDoConnect / EcDoConnectEx

    def _connect(self, req: wire.ConnectRequest, ctx: CallContext, *, extended: bool) -> bytes:
        user_dn = req.user_dn
        status = self._decide(ctx, user_dn)
        ok = status == EC_SUCCESS
        handle = NULL_HANDLE
        dn_prefix = display_name = ""
        if ok:
            handle = self._new_handle(ctx)
            dn_prefix = _dn_prefix(user_dn)
            display_name = self.directory.mailbox_owner(user_dn) or ""
        # Fixed referent ids (the values MIDL uses, inside encode_connect_response) keep a
        # seeded run byte-for-byte repeatable. The stamp is the client's to compare on a later
        # ulIcxrLink; echoing it keeps the server free of clocks.
        data = wire.encode_connect_response(
            extended=extended, handle=handle,
            polls_max=POLLS_MAX_MS if ok else 0, retry=RETRY_COUNT if ok else 0,
            retry_delay=RETRY_DELAY_MS if ok else 0,
            icxr=(next(self._icxr) & 0xFFFF) if ok else 0,
            dn_prefix=dn_prefix, display_name=display_name,
            server_version=SERVER_VERSION, best_version=req.client_version,
            timestamp=req.timestamp, status=status)

        ctx.emit(event(
            "emsmdb", "emsmdb.connect",
            call="EcDoConnectEx" if extended else "EcDoConnect",
            opnum=OP_EC_DO_CONNECT_EX if extended else OP_EC_DO_CONNECT,
            user_dn=user_dn,
            acting_user=ctx.identity.qualified,
            identity_source=ctx.identity.source,
            transport=ctx.transport,
            auth_level=AUTH_LEVEL_NAMES.get(ctx.auth_level, str(ctx.auth_level)),
            status=status_hex(status),
            status_name=status_name(status),
        ))
        return data

    def _decide(self, ctx: CallContext, user_dn: str) -> int:
        # MS-OXCRPC 3.1.4.11: a server that requires encryption refuses any connect that did
        # not arrive at RPC_C_AUTHN_LEVEL_PKT_PRIVACY, before it looks at anything else.
        if self.policy.encryption_required and ctx.auth_level < RPC_C_AUTHN_LEVEL_PKT_PRIVACY:
            return EC_NOT_ENCRYPTED
        return self.directory.mailbox_access(ctx.identity, user_dn)

    def _new_handle(self, ctx: CallContext) -> bytes:
        handles = ctx.conn_state.setdefault(HANDLES_KEY, {})
        if len(handles) >= MAX_HANDLES_PER_CONNECTION:
            raise RpcFault(NCA_S_FAULT_REMOTE_NO_MEMORY, "emsmdb: too many sessions on one connection")
        for _ in range(8):
            # Attributes 0 and 16 unpredictable bytes: a handle must not be guessable, even
            # though it is also bound to this connection and identity.
            handle = b"\x00\x00\x00\x00" + bytes(self._random_bytes(16))[:16].ljust(16, b"\x00")
            if handle != NULL_HANDLE and handle not in handles:
                handles[handle] = ctx.identity
                return handle
        # Only a broken random source repeats itself this often; refuse rather than loop.
        raise RpcFault(NCA_S_FAULT_REMOTE_NO_MEMORY, "emsmdb: no fresh context handle")

    # -- handle-bearing calls

    def _check_handle(self, handle: bytes, ctx: CallContext, call: str) -> None:
        """A session context handle is valid only on the connection that created it and only
        for the identity that created it (MS-RPCE 3.3.1.5.2: context handles are scoped to the
        association; Exchange additionally binds its session to the logon)."""
        owner = (ctx.conn_state.get(HANDLES_KEY) or {}).get(handle)
        if owner is None or owner != ctx.identity:
            result = "unknown_handle" if owner is None else "identity_mismatch"
            ctx.emit(event("emsmdb", f"emsmdb.{call}", call=_CALL_NAMES[call],
                           acting_user=ctx.identity.qualified, result=result))
            raise RpcFault(NCA_S_FAULT_CONTEXT_MISMATCH, f"{_CALL_NAMES[call]}: {result}")

    def _disconnect(self, handle: bytes, ctx: CallContext) -> bytes:
        self._check_handle(handle, ctx, "disconnect")
        del ctx.conn_state[HANDLES_KEY][handle]
        ctx.emit(event("emsmdb", "emsmdb.disconnect", call="EcDoDisconnect",
                       acting_user=ctx.identity.qualified, result="ok"))
        # MS-OXCRPC 3.1.4.3: the handle comes back zeroed.
        return wire.encode_disconnect_response(EC_SUCCESS)

    def _do_rpc(self, req: EcDoRpc, ctx: CallContext) -> bytes:
        handle = bytes(req.fields["pcxh"]["Data"])
        rop_in = _array_bytes(req.fields["rgb"])
        if req["pcbOut"] != len(rop_in) or req["cbIn"] < len(rop_in):
            raise bad_stub("EcDoRpc: buffer counts disagree")
        self._check_handle(handle, ctx, "rpc")
        ctx.emit(event("emsmdb", "emsmdb.rpc", call="EcDoRpc", opnum=OP_EC_DO_RPC,
                       acting_user=ctx.identity.qualified, rop_bytes=len(rop_in), result="ok"))
        resp = EcDoRpcResponse()
        resp.fields["pcxh"]["Data"] = handle
        # No ROP is executed: an empty reply buffer, sized like the client's (size_is(cbIn)).
        _set_bytes(resp.fields["rgb"], b"", maximum=req["cbIn"])
        resp["pcbOut"] = 0
        resp["ErrorCode"] = EC_SUCCESS
        return resp.getData()

    def _do_rpc_ext2(self, req: EcDoRpcExt2, ctx: CallContext) -> bytes:
        handle = bytes(req.fields["pcxh"]["Data"])
        rop_in = _array_bytes(req.fields["rgbIn"])
        aux_in = _array_bytes(req.fields["rgbAuxIn"])
        if req["cbIn"] != len(rop_in) or _conformance(req.fields["rgbIn"]) != len(rop_in):
            raise bad_stub("EcDoRpcExt2: cbIn does not match rgbIn")
        if req["cbAuxIn"] != len(aux_in) or _conformance(req.fields["rgbAuxIn"]) != len(aux_in):
            raise bad_stub("EcDoRpcExt2: cbAuxIn does not match rgbAuxIn")
        if req["pcbOut"] > MAX_CB_OUT or req["pcbAuxOut"] > MAX_CB_AUX_OUT:
            raise bad_stub("EcDoRpcExt2: output size out of range")
        self._check_handle(handle, ctx, "rpc")
        ctx.emit(event("emsmdb", "emsmdb.rpc", call="EcDoRpcExt2", opnum=OP_EC_DO_RPC_EXT2,
                       acting_user=ctx.identity.qualified, rop_bytes=len(rop_in), result="ok"))
        resp = EcDoRpcExt2Response()
        resp.fields["pcxh"]["Data"] = handle
        resp["pulFlags"] = 0
        _set_bytes(resp.fields["rgbOut"], b"")
        resp["pcbOut"] = 0
        _set_bytes(resp.fields["rgbAuxOut"], b"")
        resp["pcbAuxOut"] = 0
        resp["pulTransTime"] = 0
        resp["ErrorCode"] = EC_SUCCESS
        return resp.getData()


_CALL_NAMES = {"disconnect": "EcDoDisconnect", "rpc": "EcDoRpc"}


def _dn_prefix(user_dn: str) -> str:
    """szDNPrefix: the DN up to the last RDN, upper-cased as Exchange returns it
    ("/O=CORP/OU=SITE/CN=RECIPIENTS/CN=")."""
    cut = user_dn.lower().rfind("/cn=")
    return (user_dn[: cut + 4] if cut >= 0 else "").upper()


# ------------------------------------------------------------------ client side (impacket)

def _fill_connect(req: NDRCALL, user_dn: str, *, flags: int, con_mod: int, cpid: int,
                  lcid: int, client_version: tuple[int, int, int]) -> None:
    req["szUserDN"] = user_dn + "\x00"
    req["ulFlags"] = flags
    req["ulConMod"] = con_mod
    req["cbLimit"] = 0
    req["ulCpid"] = cpid
    req["ulLcidString"] = lcid
    req["ulLcidSort"] = lcid
    req["ulIcxrLink"] = 0xFFFFFFFF      # no session to link to
    req["usFCanConvertCodePages"] = 1
    req.fields["rgwClientVersion"]["Major"], req.fields["rgwClientVersion"]["Minor"], \
        req.fields["rgwClientVersion"]["Build"] = client_version
    req["pulTimeStamp"] = 0


def _connect_result(resp: NDRCALL) -> tuple[int, bytes, str]:
    status = resp["ErrorCode"]
    handle = bytes(resp.fields["pcxh"]["Data"])
    pointer = resp.fields["szDisplayName"]
    name = pointer.fields["Data"]["Data"] if pointer.fields.get("ReferentID") else ""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return status, handle, name.rstrip("\x00")


def hEcDoConnect(dce: Any, user_dn: str, *, flags: int = 0, con_mod: int = 0, cpid: int = 1252,
                 lcid: int = 1033, client_version: tuple[int, int, int] = (5, 3144, 0)
                 ) -> tuple[int, bytes, str]:
    """Call EcDoConnect on a bound impacket DCERPC_v5; returns (MAPI status, handle, display name).
    A refusal is a status, not an exception; a fault still raises DCERPCException."""
    req = EcDoConnect()
    _fill_connect(req, user_dn, flags=flags, con_mod=con_mod, cpid=cpid, lcid=lcid,
                  client_version=client_version)
    return _connect_result(dce.request(req, checkError=False))


def hEcDoConnectEx(dce: Any, user_dn: str, *, flags: int = 0, con_mod: int = 0,
                   cpid: int = 1252, lcid: int = 1033,
                   client_version: tuple[int, int, int] = (8, 0, 4013)) -> tuple[int, bytes, str]:
    req = EcDoConnectEx()
    _fill_connect(req, user_dn, flags=flags, con_mod=con_mod, cpid=cpid, lcid=lcid,
                  client_version=client_version)
    _set_bytes(req.fields["rgbAuxIn"], b"")
    req["cbAuxIn"] = 0
    req["pcbAuxOut"] = MAX_CB_AUX_OUT
    return _connect_result(dce.request(req, checkError=False))


def hEcDoDisconnect(dce: Any, handle: bytes) -> int:
    """Returns the MAPI status, or the fault status when the server rejects the handle."""
    req = EcDoDisconnect()
    req.fields["pcxh"]["Data"] = handle
    try:
        resp = dce.request(req, checkError=False)
    except DCERPCException as exc:
        code = exc.get_error_code()
        if code is None:
            raise
        return code
    return resp["ErrorCode"]


def hEcDummyRpc(dce: Any) -> int:
    return dce.request(EcDummyRpc(), checkError=False)["ErrorCode"]
