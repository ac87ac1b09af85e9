"""The Windows redirector's rule for SMB3 encryption, on impacket's SMB client.

impacket encrypts a session whenever the server offers a cipher. The redirector this client
stands for encrypts only when the server's SESSION_SETUP answer asks for it
(SMB2_SESSION_FLAG_ENCRYPT_DATA, MS-SMB2 3.2.5.3.1) or the client is configured to require it,
which Outlook's era never was. So a lab whose policy merely offers encryption sees clear SMB from
this client, as it would from Windows, and one that requires it sees it encrypted.
"""

from __future__ import annotations

from typing import Callable

from impacket.smb3 import SMB3
from impacket.smb3structs import SMB2_SESSION_FLAG_ENCRYPT_DATA, SMB2_SESSION_SETUP, SMB2SessionSetup_Response
from impacket.smbconnection import SMBConnection

STATUS_SUCCESS = 0


def encrypt_only_when_asked(smb: SMBConnection) -> Callable[[], None]:
    """Watch the SESSION_SETUP answers of `smb`; the returned function, called after the logon,
    turns impacket's own encryption off unless the server asked for it."""
    conn = smb.getSMBServer()
    if not isinstance(conn, SMB3):
        return lambda: None                      # SMB1 has no encryption
    asked: list[bool] = []
    receive = conn.recvSMB

    def watching(packetID=None):                 # noqa: N803  (impacket's parameter name)
        packet = receive(packetID)
        if packet["Command"] == SMB2_SESSION_SETUP and packet["Status"] == STATUS_SUCCESS:
            flags = SMB2SessionSetup_Response(packet["Data"])["SessionFlags"]
            asked.append(bool(flags & SMB2_SESSION_FLAG_ENCRYPT_DATA))
        return packet

    conn.recvSMB = watching

    def settle() -> None:
        conn.recvSMB = receive
        if asked and not asked[-1]:
            conn._Session["SessionFlags"] &= ~SMB2_SESSION_FLAG_ENCRYPT_DATA
    return settle
