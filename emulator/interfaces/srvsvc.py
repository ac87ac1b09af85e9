"""SRVSVC, the server service (MS-SRVS): enough for `smbclient -L`, `rpcclient srvinfo`,
and impacket's hNetrShareEnum / hNetrServerGetInfo against the emulator's SMB listener.

A lab tester lists shares before anything else; answering as Windows answers a
non-administrator keeps those tools happy and shows no more than Windows would.
"""

from __future__ import annotations

import struct
from typing import Any

from impacket.dcerpc.v5 import srvs

from ..config import ServerConfig
from ..events import event
from ..rpc.interface import NCA_S_OP_RNG_ERROR, CallContext, RpcFault, RpcInterface
from .ndr import decode_call

SRVSVC_UUID = "4b324fc8-1670-01d3-1278-5a47bf6ee188"
SRVSVC_VERSION = (3, 0)

OP_NETR_SHARE_ENUM = 15
OP_NETR_SERVER_GET_INFO = 21

ERROR_SUCCESS = 0
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_LEVEL = 124

# MS-SRVS 2.2.2.6 / 2.2.2.7: what the server says it is.
PLATFORM_ID_NT = 500
VERSION = (10, 0)
SV_TYPE = 0x00000001 | 0x00000002 | 0x00001000 | 0x00008000   # workstation, server, NT, server NT
COMMENT = "rpcauth-emulator"

DEFAULT_SHARES: list[tuple[str, int, str]] = [("IPC$", 0x80000003, "Remote IPC")]


class SrvsvcInterface(RpcInterface):
    uuid = SRVSVC_UUID
    version = SRVSVC_VERSION
    name = "srvsvc"

    def __init__(self, server: ServerConfig,
                 shares: list[tuple[str, int, str]] = DEFAULT_SHARES) -> None:
        self.server = server
        self.shares = list(shares)

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        if opnum == OP_NETR_SHARE_ENUM:
            return self._share_enum(decode_call(srvs.NetrShareEnum, stub), ctx)
        if opnum == OP_NETR_SERVER_GET_INFO:
            return self._server_get_info(decode_call(srvs.NetrServerGetInfo, stub), ctx)
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"srvsvc opnum {opnum}")

    # -- NetrShareEnum (MS-SRVS 3.1.4.8)

    def _share_enum(self, req: Any, ctx: CallContext) -> bytes:
        level = int(req.fields["InfoStruct"]["Level"])
        resume_ptr = req.fields["ResumeHandle"]
        has_resume = bool(resume_ptr.fields.get("ReferentID"))
        ctx.emit(event("srvsvc", "srvsvc.share_enum", level=level,
                       acting_user=ctx.identity.qualified,
                       result="ok" if level in (0, 1) else "refused"))
        if level not in (0, 1):
            # Levels 2 and 502 carry paths and security descriptors: Windows gives them to
            # administrators only. Any other level is not one this server knows.
            error = ERROR_ACCESS_DENIED if level in (2, 502) else ERROR_INVALID_LEVEL
            # SHARE_ENUM_STRUCT {Level, union tag, null container}, TotalEntries, ResumeHandle.
            out = struct.pack("<IIII", level, level, 0, 0)
            out += struct.pack("<II", 0x00020000, 0) if has_resume else struct.pack("<I", 0)
            return out + struct.pack("<I", error)

        resp = srvs.NetrShareEnumResponse()
        resp.fields["InfoStruct"]["Level"] = level
        union = resp.fields["InfoStruct"].fields["ShareInfo"]
        union["tag"] = level
        arm = "Level0" if level == 0 else "Level1"
        container = srvs.SHARE_INFO_0_CONTAINER() if level == 0 else srvs.SHARE_INFO_1_CONTAINER()
        container["EntriesRead"] = len(self.shares)
        items = []
        for name, kind, remark in self.shares:
            item = srvs.SHARE_INFO_0() if level == 0 else srvs.SHARE_INFO_1()
            item["shi%d_netname" % level] = name + "\x00"
            if level == 1:
                item["shi1_type"] = kind
                item["shi1_remark"] = remark + "\x00"
            items.append(item)
        container["Buffer"] = items
        union[arm] = container
        resp["TotalEntries"] = len(self.shares)
        if has_resume:
            resp["ResumeHandle"] = 0
        else:
            resp["ResumeHandle"] = srvs.NULL
        resp["ErrorCode"] = ERROR_SUCCESS
        return resp.getData()

    # -- NetrServerGetInfo (MS-SRVS 3.1.4.17)

    def _server_get_info(self, req: Any, ctx: CallContext) -> bytes:
        level = int(req["Level"])
        ctx.emit(event("srvsvc", "srvsvc.server_get_info", level=level,
                       acting_user=ctx.identity.qualified,
                       result="ok" if level in (100, 101, 102) else "invalid_level"))
        if level not in (100, 101, 102):
            return struct.pack("<III", level, 0, ERROR_INVALID_LEVEL)
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
