"""impacket's SMB client against a running lab: log on (and on again, a re-authentication), open
the EMSMDB pipe and ask, through EcDoConnect, whose identity the pipe acts on."""

from __future__ import annotations

from impacket.dcerpc.v5 import transport
from impacket.smb import SMB_DIALECT
from impacket.smb3structs import SMB2_DIALECT_002, SMB2_DIALECT_21, SMB2_DIALECT_30, SMB2_DIALECT_311
from impacket.smbconnection import SMBConnection
from impacket.uuid import uuidtup_to_bin

from emulator.interfaces.emsmdb import EMSMDB_UUID, hEcDoConnect

from .cast import dn

EMSMDB = uuidtup_to_bin((EMSMDB_UUID, "0.81"))
DIALECTS = {"SMB1": SMB_DIALECT, "2.0.2": SMB2_DIALECT_002, "2.1": SMB2_DIALECT_21, "3.0": SMB2_DIALECT_30,
            "3.1.1": SMB2_DIALECT_311}
EC_SUCCESS, EC_LOGIN_PERM = 0, 0x3F2


def impacket_login(lab, user: str, dialect: str, password: str | None = None) -> SMBConnection:
    conn = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=lab.ports["smb"],
                         preferredDialect=DIALECTS[dialect], timeout=10)
    conn.login(user, lab.password(user) if password is None else password, "CORP")
    return conn


def emsmdb_pipe(lab, smb: SMBConnection):
    """A bound EMSMDB connection over \\emsmdb on `smb`, with no RPC authentication: it acts on
    the identity the SMB session had when the pipe was opened."""
    t = transport.SMBTransport("127.0.0.1", lab.ports["smb"], r"\emsmdb", smb_connection=smb)
    dce = t.get_dce_rpc()
    dce.connect()
    dce.bind(EMSMDB)
    return dce


def mailbox_answers(dce, *owners: str) -> list[int]:
    """EcDoConnect's status for each owner's mailbox: ecSuccess only for the acting user's own."""
    return [hEcDoConnect(dce, dn(owner))[0] for owner in owners]


def conn_of(lab, smb: SMBConnection) -> str:
    port = smb.getSMBServer().get_socket().getsockname()[1]
    return next(r["conn"] for r in lab.records("conn.open") if r["peer"] == f"127.0.0.1:{port}")
