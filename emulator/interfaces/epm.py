"""The endpoint mapper (C706 appendix L / MS-RPCE 2.2.1.2): where does interface X listen?

An Exchange client asks TCP 135 for EMSMDB's port before it binds over ncacn_ip_tcp
(the reference capture shows exactly this). Over ncacn_np the answer is the pipe name.
Request and response use impacket's epm structures, so impacket's hept_map/hept_lookup and
Samba's rpcclient read the answers; the towers themselves are built and parsed here, strictly.
"""

from __future__ import annotations

import socket
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

from impacket.dcerpc.v5 import epm as _epm
from impacket.dcerpc.v5.ndr import NDRUniConformantVaryingArray

from ..events import Event, event
from ..rpc.interface import (NCA_S_FAULT_ACCESS_DENIED, NCA_S_OP_RNG_ERROR, CallContext,
                             RpcFault, RpcInterface)
from . import ndr
from .ndr import decode_call

EPM_UUID = "e1af8308-5d1f-11c9-91a4-08002b14a0fa"
EPM_VERSION = (3, 0)

# C706 appendix L / MS-RPCE: status values of the ept_* operations.
EPT_S_OK = 0
EPT_S_NOT_REGISTERED = 0x16C9A0D6          # also "no more entries" at the end of ept_lookup
EPT_S_CANT_PERFORM_OP = 0x16C9A0CD

# Opnums (C706 appendix O, ept interface).
OP_EPT_INSERT, OP_EPT_DELETE, OP_EPT_LOOKUP, OP_EPT_MAP = 0, 1, 2, 3
OP_EPT_LOOKUP_HANDLE_FREE, OP_EPT_INQ_OBJECT, OP_EPT_MGMT_DELETE = 4, 5, 6
OP_EPT_LT_INQ_REPLACE = 7

# Tower floor protocol identifiers (C706 appendix I and L).
FLOOR_UUID = 0x0D
FLOOR_RPC_CO = 0x0B
FLOOR_TCP = 0x07
FLOOR_NAMED_PIPE = 0x0F
FLOOR_IP = 0x09
FLOOR_NETBIOS = 0x11

NDR_SYNTAX = ("8a885d04-1ceb-11c9-9fe8-08002b104860", 2)
RPC_C_EP_ALL_ELTS = 0
ANNOTATION_MAX = 64                        # ept_max_annotation_size
MAX_TOWERS_PER_REPLY = 64                  # bounds any reply, whatever max_towers/max_ents say
LOOKUP_KEY = "epm_lookup"                  # ctx.conn_state: {handle bytes: next index}
MAX_LOOKUP_HANDLES = 64
NULL_HANDLE = b"\x00" * 20


@dataclass(frozen=True)
class Endpoint:
    uuid: str
    version: tuple[int, int]
    protseq: str          # "ncacn_ip_tcp" | "ncacn_np"
    endpoint: str         # "6001" or "\\PIPE\\emsmdb"
    host: str             # "127.0.0.1", or the NetBIOS name for ncacn_np
    annotation: str = ""


class TowerError(ValueError):
    pass


@dataclass(frozen=True)
class Tower:
    """The parts of a protocol tower an endpoint mapper matches on."""
    interface: str
    version: tuple[int, int]
    syntax: bytes         # floor 2 as sent (LHS and RHS), echoed back in answers
    protseq: str | None   # None when floor 4 names a protocol we do not serve


def _floor(lhs: bytes, rhs: bytes) -> bytes:
    return struct.pack("<H", len(lhs)) + lhs + struct.pack("<H", len(rhs)) + rhs


def _uuid_floor(uuid: str, major: int, minor: int) -> bytes:
    # LHS: identifier, UUID in little-endian (NDR) form, major version; RHS: minor version.
    return _floor(bytes([FLOOR_UUID]) + uuidlib.UUID(uuid).bytes_le + struct.pack("<H", major),
                  struct.pack("<H", minor))


def build_tower(ep: Endpoint, syntax_floor: bytes | None = None) -> bytes:
    """C706 appendix L: interface, transfer syntax, RPC connection-oriented, then the
    transport's address floors. Ports go big-endian on the wire; names are NUL-terminated."""
    floors = [_uuid_floor(ep.uuid, ep.version[0], ep.version[1]),
              syntax_floor or _uuid_floor(NDR_SYNTAX[0], NDR_SYNTAX[1], 0),
              _floor(bytes([FLOOR_RPC_CO]), b"\x00\x00")]
    if ep.protseq == "ncacn_ip_tcp":
        floors.append(_floor(bytes([FLOOR_TCP]), struct.pack(">H", int(ep.endpoint))))
        floors.append(_floor(bytes([FLOOR_IP]), socket.inet_aton(ep.host)))
    elif ep.protseq == "ncacn_np":
        floors.append(_floor(bytes([FLOOR_NAMED_PIPE]), ep.endpoint.encode("ascii") + b"\x00"))
        floors.append(_floor(bytes([FLOOR_NETBIOS]), ep.host.encode("ascii") + b"\x00"))
    else:
        raise ValueError(f"unsupported protocol sequence {ep.protseq}")
    return struct.pack("<H", len(floors)) + b"".join(floors)


def parse_tower(data: bytes) -> Tower:
    """Read the floors of a map tower; raises TowerError on anything malformed."""
    if len(data) < 2:
        raise TowerError("tower too short")
    (count,) = struct.unpack_from("<H", data, 0)
    if not 3 <= count <= 16:
        raise TowerError(f"tower with {count} floors")
    pos, floors = 2, []
    for _ in range(count):
        if pos + 2 > len(data):
            raise TowerError("floor header truncated")
        (lhs_len,) = struct.unpack_from("<H", data, pos)
        lhs = data[pos + 2: pos + 2 + lhs_len]
        pos += 2 + lhs_len
        if len(lhs) != lhs_len or lhs_len == 0 or pos + 2 > len(data):
            raise TowerError("floor truncated")
        (rhs_len,) = struct.unpack_from("<H", data, pos)
        rhs = data[pos + 2: pos + 2 + rhs_len]
        pos += 2 + rhs_len
        if len(rhs) != rhs_len:
            raise TowerError("floor truncated")
        floors.append((lhs, rhs))
    iface_lhs, iface_rhs = floors[0]
    if len(iface_lhs) != 19 or iface_lhs[0] != FLOOR_UUID or len(iface_rhs) != 2:
        raise TowerError("floor 1 is not an interface identifier")
    interface = str(uuidlib.UUID(bytes_le=iface_lhs[1:17]))
    major = struct.unpack_from("<H", iface_lhs, 17)[0]
    minor = struct.unpack_from("<H", iface_rhs, 0)[0]
    syn_lhs, syn_rhs = floors[1]
    if len(syn_lhs) != 19 or syn_lhs[0] != FLOOR_UUID or len(syn_rhs) != 2:
        raise TowerError("floor 2 is not a transfer syntax")
    syntax = _floor(syn_lhs, syn_rhs)
    protseq = None
    if len(floors) >= 4 and floors[2][0][:1] == bytes([FLOOR_RPC_CO]):
        proto = floors[3][0][:1]
        protseq = {bytes([FLOOR_TCP]): "ncacn_ip_tcp",
                   bytes([FLOOR_NAMED_PIPE]): "ncacn_np"}.get(proto)
    return Tower(interface, (major, minor), syntax, protseq)


def _set_towers(array: NDRUniConformantVaryingArray, towers: list[bytes], maximum: int) -> None:
    items = []
    for tower in towers:
        p = _epm.twr_p_t()
        p["tower_length"] = len(tower)
        p["tower_octet_string"] = tower
        items.append(p)
    array["Data"] = items
    # [size_is(max_towers), length_is(*num_towers)]: Samba's NDR checks the conformance
    # against the max_towers it asked for, so it must be that value, not the count.
    array.fields["MaximumCount"] = max(maximum, len(items))


# [in] parameters of the calls the mapper reads, for big-endian callers (ndr.py).
_TWR = ndr.struct_of(ndr.U32, ndr.conf_array(ndr.U8))        # twr_t: length, octets
_RPC_IF_ID = ndr.struct_of(ndr.UUID, ndr.U16, ndr.U16)
# ept_entry_t: object UUID, tower pointer, `[string] char annotation[64]`.
_ENTRY = ndr.struct_of(ndr.UUID, ndr.ptr(_TWR), ndr.varying_array(ndr.U8, ANNOTATION_MAX))
# The registration calls, unmarshalled before they are refused (ept_insert, ept_delete,
# ept_mgmt_delete of C706 appendix O).
REGISTRATION: dict[int, ndr.Layout] = {
    OP_EPT_INSERT: ndr.params(ndr.U32, ndr.conf_array(_ENTRY), ndr.U32),
    OP_EPT_DELETE: ndr.params(ndr.U32, ndr.conf_array(_ENTRY)),
    OP_EPT_MGMT_DELETE: ndr.params(ndr.U32, ndr.ptr(ndr.UUID), ndr.ptr(_TWR)),
}
REQUESTS: dict[int, ndr.Layout] = {**REGISTRATION,
    OP_EPT_MAP: ndr.params(ndr.ptr(ndr.UUID), ndr.ptr(_TWR), ndr.HANDLE, ndr.U32),
    OP_EPT_LOOKUP: ndr.params(ndr.U32, ndr.ptr(ndr.UUID), ndr.ptr(_RPC_IF_ID), ndr.U32,
                              ndr.HANDLE, ndr.U32),
    OP_EPT_LOOKUP_HANDLE_FREE: ndr.params(ndr.HANDLE),
}


class EpmInterface(RpcInterface):
    uuid = EPM_UUID
    version = EPM_VERSION
    name = "epm"
    policy_exempt = True

    def __init__(self, endpoints: Callable[[], list[Endpoint]]) -> None:
        self._endpoints = endpoints

    def call(self, opnum: int, stub: bytes, ctx: CallContext) -> bytes:
        stub = ndr.in_little_endian(ctx, REQUESTS.get(opnum), stub, "epm")
        if opnum == OP_EPT_MAP:
            return self._map(decode_call(_epm.ept_map, stub), ctx)
        if opnum == OP_EPT_LOOKUP:
            return self._lookup(decode_call(_epm.ept_lookup, stub), ctx)
        if opnum == OP_EPT_LOOKUP_HANDLE_FREE:
            return self._handle_free(stub, ctx)
        if opnum in (OP_EPT_INSERT, OP_EPT_DELETE, OP_EPT_MGMT_DELETE, OP_EPT_LT_INQ_REPLACE):
            # Remote registration is refused, as Windows refuses it to network callers; a
            # stub that does not even unmarshal gets the bad-stub fault first.
            if opnum in REGISTRATION:
                ndr.check(REGISTRATION[opnum], stub, "epm")
            ctx.emit(event("epm", "epm.refused", opnum=opnum, result="access_denied"))
            raise RpcFault(NCA_S_FAULT_ACCESS_DENIED, f"epm opnum {opnum} is local only")
        if opnum == OP_EPT_INQ_OBJECT:
            raise RpcFault(NCA_S_FAULT_ACCESS_DENIED, "ept_inq_object")
        raise RpcFault(NCA_S_OP_RNG_ERROR, f"epm opnum {opnum}")

    def connection_closed(self, ctx_state: dict[str, Any]) -> list[Event]:
        ctx_state.pop(LOOKUP_KEY, None)
        return []

    # -- ept_map (opnum 3)

    def _map(self, req: Any, ctx: CallContext) -> bytes:
        max_towers = int(req["max_towers"])
        tower_ptr = req.fields["map_tower"]
        tower: Tower | None = None
        reason = ""
        if tower_ptr.fields.get("ReferentID"):
            octets = _octets(tower_ptr.fields["Data"].fields["tower_octet_string"])
            if tower_ptr["tower_length"] != len(octets):
                reason = "tower length mismatch"
            else:
                try:
                    tower = parse_tower(octets)
                except TowerError as exc:
                    reason = str(exc)
        else:
            reason = "no map tower"

        matches: list[Endpoint] = []
        if tower is not None and tower.protseq is not None:
            matches = [ep for ep in self._endpoints()
                       if ep.uuid.lower() == tower.interface and ep.version[0] == tower.version[0]
                       and ep.protseq == tower.protseq]
        towers = [build_tower(ep, tower.syntax if tower else None)
                  for ep in matches[: min(max_towers, MAX_TOWERS_PER_REPLY)]]
        status = EPT_S_OK if towers else EPT_S_NOT_REGISTERED

        resp = _epm.ept_mapResponse()
        resp.fields["entry_handle"]["context_handle_attributes"] = 0
        resp.fields["entry_handle"]["context_handle_uuid"] = b"\x00" * 16
        resp["num_towers"] = len(towers)
        _set_towers(resp.fields["ITowers"], towers, max_towers)
        for i, item in enumerate(resp.fields["ITowers"]["Data"]):
            item.fields["ReferentID"] = 0x00020000 + 4 * i
        resp["status"] = status
        fields = dict(interface=tower.interface if tower else None,
                      version=f"{tower.version[0]}.{tower.version[1]}" if tower else None,
                      protseq=tower.protseq if tower else None,
                      result=matches[0].endpoint if towers else "not_registered")
        if reason:
            fields["reason"] = reason
        ctx.emit(event("epm", "epm.map", **fields))
        return resp.getData()

    # -- ept_lookup (opnum 2)

    def _lookup(self, req: Any, ctx: CallContext) -> bytes:
        max_ents = int(req["max_ents"])
        handle = bytes(req.fields["entry_handle"].getData())
        table = ctx.conn_state.setdefault(LOOKUP_KEY, {})
        if handle == NULL_HANDLE:
            start = 0
        elif handle in table:
            start = table[handle]
        else:
            raise RpcFault(0x1C00001A, "ept_lookup: unknown entry handle")

        inquiry = int(req["inquiry_type"])
        endpoints = self._endpoints() if inquiry == RPC_C_EP_ALL_ELTS else self._filtered(req)
        batch = endpoints[start: start + min(max_ents, MAX_TOWERS_PER_REPLY)]
        end = start + len(batch)

        resp = _epm.ept_lookupResponse()
        table.pop(handle, None)
        if not batch:
            # Nothing left: "no more entries" with a null handle (rpcclient's epmlookup, which
            # asks one entry at a time, stops here; so does Windows, as its output shows).
            status, next_handle = EPT_S_NOT_REGISTERED, NULL_HANDLE
        elif len(batch) < max_ents and end >= len(endpoints):
            # A short batch ends the walk at once, with status 0 and a null handle: what Windows
            # answers (impacket's hept_lookup and rpcdump.py raise on any other status, and
            # impacket pull request 1849 records that Windows never sends one here). Samba
            # sends "no more entries" with the last batch instead, and its smbtorture
            # rpc.epmapper Lookup_simple expects that (docs/conformance.md).
            status, next_handle = EPT_S_OK, NULL_HANDLE
        else:
            # A full batch (or one cut at MAX_TOWERS_PER_REPLY): the caller may have more to
            # read, so hand out a handle that remembers the position (a Windows Server 2016
            # answers max_ents=1 this way).
            if len(table) >= MAX_LOOKUP_HANDLES:
                table.clear()
            counter = ctx.conn_state.get(LOOKUP_KEY + "_n", 0) + 1
            ctx.conn_state[LOOKUP_KEY + "_n"] = counter
            next_handle = b"\x00" * 4 + uuidlib.UUID(int=(0xE9 << 120) | counter).bytes_le
            table[next_handle] = end
            status = EPT_S_OK

        resp.fields["entry_handle"]["context_handle_attributes"] = 0
        resp.fields["entry_handle"]["context_handle_uuid"] = next_handle[4:]
        resp["num_ents"] = len(batch)
        entries = []
        for i, ep in enumerate(batch):
            entry = _epm.ept_entry_t()
            entry["object"] = b"\x00" * 16
            entry.fields["tower"]["tower_length"] = len(tower := build_tower(ep))
            entry.fields["tower"]["tower_octet_string"] = tower
            entry.fields["tower"].fields["ReferentID"] = 0x00020000 + 4 * i
            text = ep.annotation.encode("ascii", "replace")[: ANNOTATION_MAX - 1] + b"\x00"
            entry["annotation"] = text
            entries.append(entry)
        resp.fields["entries"]["Data"] = entries
        resp.fields["entries"].fields["MaximumCount"] = max(max_ents, len(entries))
        resp["status"] = status
        ctx.emit(event("epm", "epm.lookup", start=start, returned=len(batch),
                       result="ok" if batch else "no_more_entries"))
        return resp.getData()

    def _filtered(self, req: Any) -> list[Endpoint]:
        """RPC_C_EP_MATCH_BY_IF (1) and friends: keep the endpoints of the asked interface."""
        ifid = req.fields["Ifid"]
        if not ifid.fields.get("ReferentID"):
            return self._endpoints()
        wanted = str(uuidlib.UUID(bytes_le=bytes(ifid.fields["Data"]["Uuid"])))
        return [ep for ep in self._endpoints() if ep.uuid.lower() == wanted]

    # -- ept_lookup_handle_free (opnum 4): [in, out] handle, [out] status

    def _handle_free(self, stub: bytes, ctx: CallContext) -> bytes:
        if len(stub) < 20:
            raise RpcFault(0x6F7, "ept_lookup_handle_free: short stub")
        handle = bytes(stub[:20])
        ctx.conn_state.get(LOOKUP_KEY, {}).pop(handle, None)
        return NULL_HANDLE + struct.pack("<I", EPT_S_OK)


def _octets(array: Any) -> bytes:
    data = array["Data"]
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return b"".join(x if isinstance(x, bytes) else bytes([x]) for x in data)


def tower_summary(tower: bytes) -> str:
    """A string binding for a tower, read back with impacket's own parser (for tests, logs)."""
    return _epm.PrintStringBinding(_epm.EPMTower(tower)["Floors"]) % "host"
