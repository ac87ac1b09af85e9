"""Shared helpers for the Kerberos tests: a lab with its realm, MIT kinit into a private
ccache, and the environment Kerberos clients (MIT, Samba, impacket) need to use that realm.

The service host name is not "localhost": Samba's clients refuse Kerberos to a server named
localhost, so the lab names its services after a dotted host name and the clients are pointed
at 127.0.0.1 with -I (the realm's krb5.conf turns off every DNS lookup).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from emulator.config import default_config_with
from emulator.kerberos.realm import find_tool, kerberos_available
from emulator.lab import Lab

HOSTNAME = "exch01.corp.test"
REALM = "CORP.TEST"


def need_kerberos() -> None:
    """Skip unless MIT's KDC tools, kinit and python-gssapi are all here."""
    missing = kerberos_available()
    if missing:
        pytest.skip(missing)
    if find_tool("kinit") is None:
        pytest.skip("MIT kinit not found")
    try:
        import gssapi  # noqa: F401
    except ImportError:
        pytest.skip("python-gssapi is not installed")


def kerberos_config(**overrides):
    """The KB cast with the lab realm on an ephemeral KDC port, merged with `overrides`."""
    base = {"kerberos": {"enabled": True, "hostname": HOSTNAME, "kdc_port": 0}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return default_config_with(base)


def start_kerberos_lab(*, kdc_port: int | None = None, **overrides) -> Lab:
    """A started lab with its realm; every listener and the KDC on ephemeral ports unless
    `kdc_port` is given."""
    need_kerberos()
    ports = {"kdc": kdc_port} if kdc_port is not None else None
    return Lab(kerberos_config(**overrides), ports=ports).start()


@dataclass
class Ticket:
    """A ccache made by MIT kinit for one user of a lab realm."""
    ccache: str
    env: dict

    @property
    def path(self) -> str:
        return self.ccache.removeprefix("FILE:")


def client_env(lab: Lab, ccache: str | None = None) -> dict:
    if lab.realm is None:
        raise RuntimeError("the lab has no realm")
    env = dict(os.environ, KRB5_CONFIG=lab.realm.krb5_conf)
    env.pop("KRB5_KTNAME", None)
    if ccache is not None:
        env["KRB5CCNAME"] = ccache
    return env


def kinit(lab: Lab, user: str, password: str | None = None, *, name: str | None = None
          ) -> tuple[subprocess.CompletedProcess, Ticket]:
    """Run MIT kinit for `user` with the lab password (or `password`) into a fresh ccache."""
    if lab.realm is None:
        raise RuntimeError("the lab has no realm")
    ccache = "FILE:" + os.path.join(lab.realm.directory, f"{name or user}.ccache")
    env = client_env(lab, ccache)
    pw = lab.password(user) if password is None else password
    proc = subprocess.run([find_tool("kinit") or "kinit", f"{user}@{lab.realm.name}"],
                          input=pw + "\n", capture_output=True, text=True, env=env, timeout=30)
    return proc, Ticket(ccache, env)


def kvno(ticket: Ticket, principal: str) -> subprocess.CompletedProcess:
    """Fetch a service ticket into the ccache (MIT kvno talks TGS to the lab KDC)."""
    return subprocess.run([find_tool("kvno") or "kvno", principal], capture_output=True, text=True,
                          env=ticket.env, timeout=30)


def kadmin(lab: Lab, query: str) -> subprocess.CompletedProcess:
    """One kadmin.local query against the lab's database (for tests that change a principal)."""
    if lab.realm is None:
        raise RuntimeError("the lab has no realm")
    return subprocess.run([find_tool("kadmin.local") or "kadmin.local", "-r", lab.realm.name,
                           "-q", query], capture_output=True, text=True, env=lab.realm.env(),
                          timeout=30)


def samba_kerberos_args(ticket: Ticket) -> list[str]:
    """Options that make smbclient and rpcclient use this ccache and nothing else."""
    return ["--use-kerberos=required", f"--use-krb5-ccache={ticket.ccache}"]


def run_samba(tool: str, lab: Lab, ticket: Ticket, args: list[str], *, host: str = HOSTNAME,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """smbclient or rpcclient against the lab's SMB port, reaching `host` at 127.0.0.1."""
    argv = [tool, "-I", "127.0.0.1", "-p", str(lab.ports["smb"]), *samba_kerberos_args(ticket),
            *args]
    return subprocess.run(argv, capture_output=True, text=True, env=ticket.env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- a bare DCE/RPC client
# For the cases no stock client produces (a replayed or tampered AP-REQ, a missing final leg, a
# tampered wrap token): MIT's GSS-API makes the tokens, impacket's rpcrt structures frame the
# PDUs, and a plain socket carries them.

NDR = ("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0")
MGMT = ("afa8bd80-7d8a-11c9-bef4-08002b102989", "1.0")
AUTH_CTX_ID = 79231


def gss_initiator(ticket: Ticket, service: str, *, dce_style: bool = True):
    """A python-gssapi (MIT) initiator for `service@host`, from the ccache only."""
    import gssapi

    creds = gssapi.Credentials(usage="initiate", store={"ccache": ticket.ccache})
    flags = (gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity
             | gssapi.RequirementFlag.confidentiality | gssapi.RequirementFlag.replay_detection
             | gssapi.RequirementFlag.out_of_sequence_detection)
    if dce_style:
        flags |= gssapi.RequirementFlag.dce_style
    return gssapi.SecurityContext(
        name=gssapi.Name(service, gssapi.NameType.hostbased_service), creds=creds,
        usage="initiate", flags=flags, mech=gssapi.OID.from_int_seq("1.2.840.113554.1.2.2"))


class RawRpc:
    """One TCP connection that sends hand-made PDUs and reads whole fragments back."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(self, pdu: bytes) -> None:
        self.sock.sendall(pdu)

    def recv(self):
        """The next PDU as an impacket MSRPCHeader, or None when the server closed."""
        from impacket.dcerpc.v5.rpcrt import MSRPCHeader

        head = self._read(16)
        if head is None:
            return None
        frag_len = int.from_bytes(head[8:10], "little")
        rest = self._read(frag_len - 16)
        return None if rest is None else MSRPCHeader(head + rest)

    def _read(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf


def bind_pdu(iface: tuple[str, str], auth_type: int, level: int, token: bytes, *,
             call_id: int = 1, alter: bool = False) -> bytes:
    from impacket.dcerpc.v5.rpcrt import MSRPC_ALTERCTX, MSRPC_BIND, CtxItem, MSRPCBind, MSRPCHeader
    from impacket.uuid import uuidtup_to_bin

    bind = MSRPCBind()
    item = CtxItem()
    item["AbstractSyntax"] = uuidtup_to_bin(iface)
    item["TransferSyntax"] = uuidtup_to_bin(NDR)
    item["ContextID"] = 0
    item["TransItems"] = 1
    bind.addCtxItem(item)
    pdu = MSRPCHeader()
    pdu["type"] = MSRPC_ALTERCTX if alter else MSRPC_BIND
    pdu["pduData"] = bind.getData()
    pdu["call_id"] = call_id
    return _with_auth(pdu, auth_type, level, token)


def auth3_pdu(auth_type: int, level: int, token: bytes, *, call_id: int = 1) -> bytes:
    from impacket.dcerpc.v5.rpcrt import MSRPC_AUTH3, MSRPCHeader

    pdu = MSRPCHeader()
    pdu["type"] = MSRPC_AUTH3
    pdu["pduData"] = b"    "        # MS-RPCE 2.2.2.10: four bytes of padding before the trailer
    pdu["call_id"] = call_id
    return _with_auth(pdu, auth_type, level, token)


def _with_auth(pdu, auth_type: int, level: int, token: bytes) -> bytes:
    from impacket.dcerpc.v5.rpcrt import SEC_TRAILER

    trailer = SEC_TRAILER()
    trailer["auth_type"] = auth_type
    trailer["auth_level"] = level
    trailer["auth_ctx_id"] = AUTH_CTX_ID
    pad = (-len(pdu.get_packet())) % 4
    if pad:
        pdu["pduData"] += b"\xff" * pad
        trailer["auth_pad_len"] = pad
    pdu["sec_trailer"] = trailer
    pdu["auth_data"] = token
    return pdu.get_packet()


def sealed_request(ctx, auth_type: int, opnum: int, stub: bytes, *, call_id: int,
                   tamper: bool = False) -> bytes:
    """A privacy-level request sealed with GSS wrap_iov in DCE style (no header signing was
    negotiated: the stub and its padding are the only DATA buffer)."""
    import struct

    import gssapi.raw as graw
    from gssapi.raw import IOV, IOVBufferType

    pad = (-len(stub)) % 16
    body = stub + b"\x00" * pad
    iov = IOV((IOVBufferType.header, True, None), (IOVBufferType.data, False, body), std_layout=False)
    graw.wrap_iov(ctx, iov, confidential=True)
    sealed, signature = bytes(iov[1].value), bytes(iov[0].value)
    if tamper:
        # A bit of the ciphertext, or of the token's checksum when there is no stub.
        if sealed:
            sealed = bytes([sealed[0] ^ 0x01]) + sealed[1:]
        else:
            signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
    trailer = struct.pack("<BBBBI", auth_type, 6, pad, 0, AUTH_CTX_ID)
    prefix = struct.pack("<IHH", len(body), 0, opnum)
    frag_len = 16 + len(prefix) + len(sealed) + len(trailer) + len(signature)
    head = struct.pack("<BBBB4sHHI", 5, 0, 0, 0x03, b"\x10\x00\x00\x00", frag_len, len(signature),
                       call_id)
    return head + prefix + sealed + trailer + signature


def unseal_response(ctx, pdu) -> bytes:
    """The plaintext stub of a sealed response, checked by MIT's unwrap_iov (raises if the
    server's wrap token does not verify)."""
    import gssapi.raw as graw
    from gssapi.raw import IOV, IOVBufferType

    raw = pdu.get_packet()
    auth_len = int.from_bytes(raw[10:12], "little")
    trailer_at = len(raw) - auth_len - 8
    pad = raw[trailer_at + 2]
    iov = IOV((IOVBufferType.header, False, raw[len(raw) - auth_len:]),
              (IOVBufferType.data, False, raw[24:trailer_at]), std_layout=False)
    graw.unwrap_iov(ctx, iov)
    body = bytes(iov[1].value)
    return body[:len(body) - pad]


def mit_sealed_mgmt_call(lab: Lab, ticket: Ticket) -> bytes:
    """MIT's own initiator over TCP: auth_type 16 at privacy, the final AP-REP in AUTH3 (as
    Samba sends it), then one sealed inq_if_ids call. Returns the unsealed response stub."""
    ctx = gss_initiator(ticket, f"host@{HOSTNAME}")
    rpc = RawRpc(lab.ports["emsmdb"])
    try:
        rpc.send(bind_pdu(MGMT, 16, 6, ctx.step()))
        rpc.send(auth3_pdu(16, 6, ctx.step(rpc.recv()["auth_data"])))
        rpc.send(sealed_request(ctx, 16, 0, b"", call_id=3))
        return unseal_response(ctx, rpc.recv())
    finally:
        rpc.close()
