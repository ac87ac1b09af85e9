"""The DCE/RPC remote management interface (C706 appendix Q; the `mgmt` interface of
MS-RPCE's runtime): which interfaces does this endpoint serve, is the server listening, what is
its principal name for an authentication service.

Every RPC server runtime answers it on every endpoint, before any interface-specific bind,
and tools (Samba's smbtorture rpc.mgmt, `rpcdump`-style scanners) use it to list what an
endpoint offers. The layout of each call follows Samba's librpc/idl/mgmt.idl, which is
wire-compatible with C706's `mgmt.idl`.

Who may call it: Windows' RPC runtime, when the server registered no authorization function
(RpcMgmtSetAuthorizationFn), lets every client call inq_if_ids, inq_princ_name, inq_stats and
is_server_listening, and refuses stop_server_listening to everyone (the "default
authorizations" table of RpcMgmtSetAuthorizationFn; C706's rpc_mgmt_set_authorization_fn gives
the same table). So the interface is exempt from the lab's minimum auth level, as the
endpoint mapper is, and stop_server_listening always answers access denied.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from typing import Sequence

from ..events import event
from ..rpc.interface import NCA_S_OP_RNG_ERROR, CallContext, RpcFault, RpcInterface
from . import ndr

MGMT_UUID = "afa8bd80-7d8a-11c9-bef4-08002b102989"
MGMT_VERSION = (1, 0)

OP_INQ_IF_IDS, OP_INQ_STATS, OP_IS_SERVER_LISTENING = 0, 1, 2
OP_STOP_SERVER_LISTENING, OP_INQ_PRINC_NAME = 3, 4

ERROR_SUCCESS = 0
ERROR_ACCESS_DENIED = 5
ERROR_INSUFFICIENT_BUFFER = 122
RPC_S_UNKNOWN_AUTHN_SERVICE = 1747

# rpc_c_stats_calls_in, _calls_out, _pkts_in, _pkts_out (C706 appendix Q): four counters.
STATS_ARRAY_MAX_SIZE = 4

AUTH_TYPE_SPNEGO, AUTH_TYPE_NTLM = 9, 10
# Windows Server registers an empty principal name for each authentication service it
# accepts (observed on Server 2022 and recorded in Samba's rpcd_epmapper). The lab accepts
# NTLM and SPNEGO(NTLM) at the RPC layer, so those are the services it names.
PRINCIPALS = {AUTH_TYPE_SPNEGO: "", AUTH_TYPE_NTLM: ""}

_REFERENT = 0x00020000

# Request layouts for big-endian callers (ndr.swap_to_little_endian); inq_if_ids,
# is_server_listening and stop_server_listening have no [in] parameters.
REQUESTS: dict[int, ndr.Layout] = {
    # Samba's IDL sends a second, unused unsigned long after max_count; C706's (and
    # impacket's) sends the count alone. Only the count is read.
    OP_INQ_STATS: ndr.params(ndr.U32),
    OP_INQ_PRINC_NAME: ndr.params(ndr.U32, ndr.U32),
}


class MgmtInterface(RpcInterface):
    uuid = MGMT_UUID
    version = MGMT_VERSION
    name = "mgmt"
    policy_exempt = True

    def __init__(self, served: Sequence[RpcInterface] = ()) -> None:
        # The other interfaces of the endpoint this instance is bound to, as inq_if_ids
        # reports them (the management interface itself is not listed, as Samba does not).
        self._served = [i for i in served if i.uuid != MGMT_UUID]

    def on_endpoint(self, served: Sequence[RpcInterface]) -> MgmtInterface:
        """The management interface of one endpoint, which serves `served` besides itself."""
        return MgmtInterface(served)

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        stub = ndr.in_little_endian(ctx, REQUESTS.get(opnum), stub, "mgmt")
        if opnum == OP_INQ_IF_IDS:
            return self._inq_if_ids(ctx)
        if opnum == OP_INQ_STATS:
            return self._inq_stats(stub, ctx)
        if opnum == OP_IS_SERVER_LISTENING:
            ctx.emit(event("mgmt", "mgmt.call", op="is_server_listening", result="ok"))
            # [out, ref] error_status_t *status, then the boolean32 result: listening.
            return struct.pack("<II", 0, 1)
        if opnum == OP_STOP_SERVER_LISTENING:
            # Disabled for every client by the runtime's default authorization.
            ctx.emit(event("mgmt", "mgmt.call", op="stop_server_listening", result="access_denied"))
            return struct.pack("<I", ERROR_ACCESS_DENIED)
        if opnum == OP_INQ_PRINC_NAME:
            return self._inq_princ_name(stub, ctx)
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"mgmt opnum {opnum}")

    # -- inq_if_ids (opnum 0): [out] rpc_if_id_vector_t **if_id_vector

    def _inq_if_ids(self, ctx: CallContext) -> bytes:
        ids = [(i.uuid, i.version) for i in self._served]
        n = len(ids)
        # The unique pointer to the vector, then the conformant struct: its conformance first
        # (C706 14.3.7.1), the count, one unique pointer per element, then the deferred
        # rpc_if_id_t referents {uuid, vers_major, vers_minor}.
        out = [struct.pack("<III", _REFERENT, n, n)]
        out += [struct.pack("<I", _REFERENT + 4 * (k + 1)) for k in range(n)]
        for uuid, (major, minor) in ids:
            out.append(uuidlib.UUID(uuid).bytes_le + struct.pack("<HH", major, minor))
        out.append(struct.pack("<I", ERROR_SUCCESS))
        ctx.emit(event("mgmt", "mgmt.call", op="inq_if_ids", count=n, result="ok"))
        return b"".join(out)

    # -- inq_stats (opnum 1): [in] max_count, [out] the count and that many counters

    def _inq_stats(self, stub: bytes, ctx: CallContext) -> bytes:
        if len(stub) < 4:
            raise ndr.bad_stub("mgmt_inq_stats: truncated")
        (max_count,) = struct.unpack_from("<I", stub)
        count = min(max_count, STATS_ARRAY_MAX_SIZE)
        # The lab keeps no runtime-wide call and packet counters; it reports zeros, which is
        # also what Samba's runtime reports.
        ctx.emit(event("mgmt", "mgmt.call", op="inq_stats", result="ok"))
        return struct.pack(f"<II{count}II", count, count, *([0] * count), ERROR_SUCCESS)

    # -- inq_princ_name (opnum 4): [in] authn_proto, [in] princ_name_size,
    #    [out, string, size_is(princ_name_size)] char princ_name[]

    def _inq_princ_name(self, stub: bytes, ctx: CallContext) -> bytes:
        if len(stub) < 8:
            raise ndr.bad_stub("mgmt_inq_princ_name: truncated")
        authn_proto, size = struct.unpack_from("<II", stub)
        if size == 0:
            # A [string] array of size zero cannot hold even the terminator.
            raise ndr.bad_stub("mgmt_inq_princ_name: princ_name_size 0")
        name = PRINCIPALS.get(authn_proto)
        if name is None:
            status, text = RPC_S_UNKNOWN_AUTHN_SERVICE, b""
        elif len(name) + 1 > size:
            status, text = ERROR_INSUFFICIENT_BUFFER, b""
        else:
            status, text = ERROR_SUCCESS, name.encode("ascii")
        chars = text + b"\x00"
        body = struct.pack("<III", size, 0, len(chars)) + chars
        body += b"\x00" * (-len(body) % 4)
        ctx.emit(event("mgmt", "mgmt.call", op="inq_princ_name", authn_proto=authn_proto,
                       result="ok" if status == ERROR_SUCCESS else f"0x{status:x}"))
        return body + struct.pack("<I", status)
