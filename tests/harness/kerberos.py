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


def start_kerberos_lab(**overrides) -> Lab:
    need_kerberos()
    return Lab(kerberos_config(**overrides)).start()


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
