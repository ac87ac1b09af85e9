"""The workstation's Kerberos logon for the synthetic client: MIT kinit and kvno fill a private
ccache (as a Windows logon fills the logon session's ticket cache), and impacket takes the
service tickets from it. impacket asks no KDC itself: its own KDC client cannot read an MIT
KDC's replies (docs/kerberos.md)."""

from __future__ import annotations

import os
import subprocess

from ..kerberos.realm import find_tool
from .profile import KerberosLogon

SERVICES = ("cifs", "host")


class NoTicket(Exception):
    """No service ticket for the server in the logged-on user's ccache."""


def workstation_logon(krb5_conf: str, realm: str, hostname: str, user: str, password: str,
                      directory: str) -> KerberosLogon | None:
    """kinit the user and fetch tickets for the server's SMB and RPC services. None when the KDC
    gives no ticket (a wrong password, a disabled user): the workstation then has none."""
    ccache = "FILE:" + os.path.join(directory, f"{user}.ccache")
    env = dict(os.environ, KRB5_CONFIG=krb5_conf, KRB5CCNAME=ccache)
    kinit = subprocess.run([find_tool("kinit") or "kinit", f"{user}@{realm}"], input=password + "\n",
                           capture_output=True, text=True, env=env, timeout=30, check=False)
    if kinit.returncode != 0:
        return None
    for svc in SERVICES:
        subprocess.run([find_tool("kvno") or "kvno", f"{svc}/{hostname}@{realm}"],
                       capture_output=True, text=True, env=env, timeout=30, check=False)
    return KerberosLogon(ccache=ccache, realm=realm, hostname=hostname)


def service_ticket(logon: KerberosLogon, service: str) -> dict:
    """impacket's TGS dict (KDC_REP, cipher, sessionKey) for service/hostname."""
    from impacket.krb5.ccache import CCache

    cache = CCache.loadFile(logon.ccache.removeprefix("FILE:"))
    spn = f"{service}/{logon.hostname}@{logon.realm}"
    cred = cache.getCredential(spn, anySPN=False)
    if cred is None:
        raise NoTicket(spn)
    return cred.toTGS()
