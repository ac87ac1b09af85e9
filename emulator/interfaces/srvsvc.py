"""SRVSVC, the server service (MS-SRVS): enough for `smbclient -L`, `rpcclient srvinfo`,
impacket's hNetrShareEnum / hNetrServerGetInfo and Samba's smbtorture rpc.srvsvc (its
non-administrator cases) against the emulator's SMB listener.

A lab tester lists shares before anything else; answering as Windows answers a
non-administrator keeps those tools happy and shows no more than Windows would. The levels
refused to a non-administrator, and with which error, are the ones smbtorture's rpc.srvsvc
expects of Windows for a caller without administrative rights.
"""

from __future__ import annotations

import struct
from typing import Any

from impacket.dcerpc.v5 import srvs

from ..config import ServerConfig
from ..events import event
from ..rpc.interface import NCA_S_OP_RNG_ERROR, CallContext, RpcFault, RpcInterface
from . import ndr
from .ndr import decode_call, wide_string

SRVSVC_UUID = "4b324fc8-1670-01d3-1278-5a47bf6ee188"
SRVSVC_VERSION = (3, 0)

OP_NETR_SHARE_ENUM = 15
OP_NETR_SHARE_GET_INFO = 16
OP_NETR_SERVER_GET_INFO = 21
_DWORD = struct.Struct("<I")
_COUNTS = struct.Struct("<III")
# ServerName is a name like \\HOST: far shorter than this, which bounds what is read.
MAX_SERVER_NAME = 1024
OP_NETR_SHARE_ENUM_STICKY = 36

ERROR_SUCCESS = 0
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_LEVEL = 124
NERR_NET_NAME_NOT_FOUND = 2310

# Share information levels a non-administrator is refused (MS-SRVS 3.1.4.8 / 3.1.4.10: they
# carry paths, permissions and security descriptors) and the ones nobody gets from the
# sticky-share enumeration (MS-SRVS 3.1.4.9 lists 0, 1, 2, 502 and 503 for it).
ENUM_ADMIN_LEVELS = (2, 501, 502, 503)
STICKY_ADMIN_LEVELS = (2, 502, 503)
GET_INFO_OK_LEVELS = (0, 1, 501, 1005)
GET_INFO_ADMIN_LEVELS = (2, 502, 503)

# MS-SRVS 2.2.2.6 / 2.2.2.7: what the server says it is.
PLATFORM_ID_NT = 500
VERSION = (10, 0)
SV_TYPE = 0x00000001 | 0x00000002 | 0x00001000 | 0x00008000   # workstation, server, NT, server NT
COMMENT = "rpcauth-emulator"

DEFAULT_SHARES: list[tuple[str, int, str]] = [("IPC$", 0x80000003, "Remote IPC")]

# [in] parameters, for big-endian callers (ndr.py): the server name is a unique pointer to a
# wide string; SHARE_ENUM_STRUCT is a level and a union of pointers to containers of arrays.
_WPTR = ndr.ptr(ndr.WSTRING)


def _container(*info: ndr.Layout) -> ndr.Layout:
    """SHARE_INFO_x_CONTAINER: EntriesRead and a pointer to an array of SHARE_INFO_x."""
    return ndr.struct_of(ndr.U32, ndr.ptr(ndr.conf_array(ndr.struct_of(*info))))


_U32 = ndr.U32
_INFO_2 = (_WPTR, _U32, _WPTR, _U32, _U32, _U32, _WPTR, _WPTR)
_SD = ndr.ptr(ndr.conf_array(ndr.U8))
_SHARE_ENUM_STRUCT = ndr.struct_of(_U32, ndr.union_of({
    0: ndr.ptr(_container(_WPTR)),
    1: ndr.ptr(_container(_WPTR, _U32, _WPTR)),
    2: ndr.ptr(_container(*_INFO_2)),
    501: ndr.ptr(_container(_WPTR, _U32, _WPTR, _U32)),
    502: ndr.ptr(_container(*_INFO_2, _U32, _SD)),
    503: ndr.ptr(_container(*_INFO_2, _WPTR, _U32, _SD)),
}))
_ENUM = ndr.params(_WPTR, _SHARE_ENUM_STRUCT, _U32, ndr.ptr(_U32))
REQUESTS: dict[int, ndr.Layout] = {
    OP_NETR_SHARE_ENUM: _ENUM,
    OP_NETR_SHARE_ENUM_STICKY: _ENUM,
    OP_NETR_SHARE_GET_INFO: ndr.params(_WPTR, ndr.WSTRING, _U32),
    OP_NETR_SERVER_GET_INFO: ndr.params(_WPTR, _U32),
}


class SrvsvcInterface(RpcInterface):
    uuid = SRVSVC_UUID
    version = SRVSVC_VERSION
    name = "srvsvc"

    def __init__(self, server: ServerConfig,
                 shares: list[tuple[str, int, str]] = DEFAULT_SHARES) -> None:
        self.server = server
        self.shares = list(shares)
        # NetrServerGetInfo's answer depends only on the level and this server's fixed config, and
        # building it through impacket's NDR classes was most of the call's cost in the profile of
        # a named-pipe logon: each level is encoded once.
        self._server_info: dict[int, bytes] = {}

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        stub = ndr.in_little_endian(ctx, REQUESTS.get(opnum), stub, "srvsvc")
        if opnum == OP_NETR_SHARE_ENUM:
            return self._share_enum(decode_call(srvs.NetrShareEnum, stub), ctx)
        if opnum == OP_NETR_SHARE_ENUM_STICKY:
            # Sticky shares are the ones the registry keeps; IPC$ is not one of them.
            return self._share_enum(decode_call(srvs.NetrShareEnumSticky, stub), ctx, sticky=True)
        if opnum == OP_NETR_SHARE_GET_INFO:
            return self._share_get_info(decode_call(srvs.NetrShareGetInfo, stub), ctx)
        if opnum == OP_NETR_SERVER_GET_INFO:
            return self._server_get_info(server_get_info_level(stub), ctx)
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"srvsvc opnum {opnum}")

    # -- NetrShareEnum (MS-SRVS 3.1.4.8)

    def _share_enum(self, req: Any, ctx: CallContext, sticky: bool = False) -> bytes:
        level = int(req.fields["InfoStruct"]["Level"])
        resume_ptr = req.fields["ResumeHandle"]
        has_resume = bool(resume_ptr.fields.get("ReferentID"))
        ctx.emit(event("srvsvc", "srvsvc.share_enum", level=level, sticky=sticky,
                       acting_user=ctx.identity.qualified,
                       result="ok" if level in (0, 1) else "refused"))
        shares = [] if sticky else self.shares
        if level not in (0, 1):
            # Levels 2, 501, 502 and 503 carry paths, flags and security descriptors: Windows
            # gives them to administrators only (501 is not a level of the sticky
            # enumeration at all). Any other level is not one this server knows.
            admin = STICKY_ADMIN_LEVELS if sticky else ENUM_ADMIN_LEVELS
            error = ERROR_ACCESS_DENIED if level in admin else ERROR_INVALID_LEVEL
            # SHARE_ENUM_STRUCT {Level, union tag, null container}, TotalEntries, ResumeHandle.
            out = struct.pack("<IIII", level, level, 0, 0)
            out += struct.pack("<II", 0x00020000, 0) if has_resume else struct.pack("<I", 0)
            return out + struct.pack("<I", error)

        resp = srvs.NetrShareEnumStickyResponse() if sticky else srvs.NetrShareEnumResponse()
        resp.fields["InfoStruct"]["Level"] = level
        union = resp.fields["InfoStruct"].fields["ShareInfo"]
        union["tag"] = level
        arm = "Level0" if level == 0 else "Level1"
        container = srvs.SHARE_INFO_0_CONTAINER() if level == 0 else srvs.SHARE_INFO_1_CONTAINER()
        container["EntriesRead"] = len(shares)
        items = []
        for name, kind, remark in shares:
            item = srvs.SHARE_INFO_0() if level == 0 else srvs.SHARE_INFO_1()
            item["shi%d_netname" % level] = name + "\x00"
            if level == 1:
                item["shi1_type"] = kind
                item["shi1_remark"] = remark + "\x00"
            items.append(item)
        container["Buffer"] = items
        union[arm] = container
        resp["TotalEntries"] = len(shares)
        if has_resume:
            resp["ResumeHandle"] = 0
        else:
            resp["ResumeHandle"] = srvs.NULL
        resp["ErrorCode"] = ERROR_SUCCESS
        return resp.getData()

    # -- NetrShareGetInfo (MS-SRVS 3.1.4.10)

    def _share_get_info(self, req: Any, ctx: CallContext) -> bytes:
        level = int(req["Level"])
        name = wide_string(req["NetName"], "NetName", max_len=256)
        share = next((sh for sh in self.shares if sh[0].lower() == name.lower()), None)
        if share is None:
            error = NERR_NET_NAME_NOT_FOUND
        elif level in GET_INFO_ADMIN_LEVELS:
            error = ERROR_ACCESS_DENIED
        elif level not in GET_INFO_OK_LEVELS:
            error = ERROR_INVALID_LEVEL
        else:
            error = ERROR_SUCCESS
        ctx.emit(event("srvsvc", "srvsvc.share_get_info", level=level, share=name[:80],
                       acting_user=ctx.identity.qualified,
                       result="ok" if error == ERROR_SUCCESS else f"{error}"))
        if error != ERROR_SUCCESS or share is None:
            # The union's discriminant, a null arm pointer, the error.
            return struct.pack("<III", level, 0, error)
        share_name, kind, remark = share
        resp = srvs.NetrShareGetInfoResponse()
        union = resp.fields["InfoStruct"]
        union["tag"] = level
        if level == 1005:
            info = srvs.SHARE_INFO_1005()
            info["shi1005_flags"] = 0
        else:
            info = {0: srvs.SHARE_INFO_0, 1: srvs.SHARE_INFO_1, 501: srvs.SHARE_INFO_501}[level]()
            prefix = "shi%d_" % level
            info[prefix + "netname"] = share_name + "\x00"
            if level in (1, 501):
                info[prefix + "type"] = kind
                info[prefix + "remark"] = remark + "\x00"
            if level == 501:
                info["shi501_flags"] = 0
        union["ShareInfo%d" % level] = info
        resp["ErrorCode"] = ERROR_SUCCESS
        return resp.getData()

    # -- NetrServerGetInfo (MS-SRVS 3.1.4.17)

    def _server_get_info(self, level: int, ctx: CallContext) -> bytes:
        ctx.emit(event("srvsvc", "srvsvc.server_get_info", level=level,
                       acting_user=ctx.identity.qualified,
                       result="ok" if level in (100, 101, 102) else "invalid_level"))
        if level not in (100, 101, 102):
            return struct.pack("<III", level, 0, ERROR_INVALID_LEVEL)
        encoded = self._server_info.get(level)
        if encoded is None:
            encoded = self._server_info[level] = self._encode_server_info(level)
        return encoded

    def _encode_server_info(self, level: int) -> bytes:
        resp = srvs.NetrServerGetInfoResponse()
        info_union = resp.fields["InfoStruct"]
        info_union["tag"] = level
        info = {100: srvs.SERVER_INFO_100, 101: srvs.SERVER_INFO_101,
                102: srvs.SERVER_INFO_102}[level]()
        p = "sv%d_" % level
        info[p + "platform_id"] = PLATFORM_ID_NT
        info[p + "name"] = self.server.netbios_name + "\x00"
        if level >= 101:
            info[p + "version_major"], info[p + "version_minor"] = VERSION
            info[p + "type"] = SV_TYPE
            info[p + "comment"] = COMMENT + "\x00"
        if level == 102:
            info[p + "users"] = 0
            info[p + "disc"] = 15
            info[p + "hidden"] = 0
            info[p + "announce"] = 240
            info[p + "anndelta"] = 3000
            info[p + "licenses"] = 0
            info[p + "userpath"] = "C:\\\x00"
        info_union["ServerInfo%d" % level] = info
        resp["ErrorCode"] = ERROR_SUCCESS
        return resp.getData()


def server_get_info_level(stub: bytes) -> int:
    """The Level of a NetrServerGetInfo request (MS-SRVS 3.1.4.17), or RpcFault(NCA_S_FAULT_NDR).

    The stub is `[in, string, unique] SRVSVC_HANDLE ServerName; [in] DWORD Level`: a referent ID,
    then (when it is not NULL) a conformant varying UTF-16 string (C706 14.3.4.2: maximum count,
    offset 0, actual count <= maximum, the characters, padded to 4), then the level. The server
    reads only the level, and decoding this one call through impacket's NDR classes cost ~0.1 ms,
    a tenth of the named-pipe logon's Python time in the profile, so it is read here directly,
    with the same checks and the same fault."""
    if len(stub) > ndr.MAX_STUB:
        raise ndr.bad_stub("NetrServerGetInfo: stub too large")
    try:
        (referent,) = _DWORD.unpack_from(stub, 0)
        off = 4
        if referent:
            maximum, offset, actual = _COUNTS.unpack_from(stub, off)
            if offset != 0 or actual > maximum or maximum > MAX_SERVER_NAME:
                raise ndr.bad_stub("NetrServerGetInfo: ServerName counts")
            off += 12 + 2 * actual
            off += -off % 4
        (level,) = _DWORD.unpack_from(stub, off)
    except struct.error:
        raise ndr.bad_stub("NetrServerGetInfo: stub too short") from None
    return level
