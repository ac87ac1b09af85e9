"""A private MIT Kerberos realm for one lab: database, principals, keytab, and a running KDC.

Nothing here speaks Kerberos: MIT's own tools do (kdb5_util, kadmin.local, krb5kdc). This
module only writes their configuration into a temporary directory, runs them, and removes the
directory when the lab stops. The KDC listens on loopback only.

    realm = Realm.create(config, port=0)   # port 0: a free ephemeral port is picked first
    realm.krb5_conf, realm.keytab, realm.port
    realm.stop()

Secrets: the master password is random and never leaves this process; user passwords go to
kadmin.local on its standard input, never on a command line; the keytab is a lab secret (it
decrypts every ticket the lab's services accept) and stays in the temporary directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ..config import LabConfig, User

log = logging.getLogger("emulator.kerberos")

# Service classes the lab's services accept tickets for: SMB (cifs), RPC over TCP as Windows
# and Samba name it (host), and the Exchange store's own (exchangeMDB).
SERVICE_CLASSES = ("cifs", "host", "exchangeMDB")
# AES first; RC4-HMAC because a user known only by its NT hash can have no other key.
ENCTYPES = "aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96 rc4-hmac"
KEY_SALTS = "aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal rc4-hmac:normal"
_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class RealmError(RuntimeError):
    """The realm could not be made or its KDC did not start. The message names the step and
    carries the tool's own words, which never include a key or a password."""


def find_tool(name: str) -> str | None:
    """MIT's admin tools live in /usr/sbin, which a non-root PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def kerberos_available() -> str | None:
    """None when the MIT KDC tools are installed, else what is missing."""
    missing = [t for t in ("krb5kdc", "kdb5_util", "kadmin.local") if find_tool(t) is None]
    return f"MIT Kerberos tools not found: {', '.join(missing)}" if missing else None


def default_realm(config: LabConfig) -> str:
    return f"{config.server.domain.upper()}.TEST"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on loopback, for UDP and TCP alike. krb5kdc cannot be
    asked for port 0, so the lab picks one and hands it over (a small race that a lab accepts)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RealmError("no free loopback port for the KDC")


@dataclass
class Realm:
    name: str
    hostname: str
    port: int
    directory: str
    krb5_conf: str
    keytab: str
    kdc_log: str
    # Users who have no Kerberos key (nt_hash users whose key could not be placed).
    ntlm_only: tuple[str, ...] = ()
    _process: subprocess.Popen | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, config: LabConfig, *, realm: str | None = None, hostname: str = "localhost",
               port: int = 0, host: str = "127.0.0.1") -> "Realm":
        missing = kerberos_available()
        if missing:
            raise RealmError(missing)
        name = (realm or default_realm(config)).upper()
        if port == 0:
            port = free_port(host)
        directory = tempfile.mkdtemp(prefix="rpcauth-krb5-")
        os.chmod(directory, 0o700)
        self = cls(name=name, hostname=hostname, port=port, directory=directory,
                   krb5_conf=os.path.join(directory, "krb5.conf"),
                   keytab=os.path.join(directory, "lab.keytab"),
                   kdc_log=os.path.join(directory, "kdc.log"))
        try:
            self._write_configs(host)
            self._create_database()
            self.ntlm_only = self._add_users(config.users)
            self._add_services()
            # A process that exits without stopping its lab still takes its KDC and keys along.
            atexit.register(self.stop)
            self._start_kdc()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def rcache(self) -> str:
        """The acceptors' replay cache (MIT's file2 type), private to this lab."""
        return f"file2:{os.path.join(self.directory, 'acceptor.rcache')}"

    @property
    def kdc_conf(self) -> str:
        return os.path.join(self.directory, "kdc.conf")

    def env(self) -> dict[str, str]:
        """The environment MIT tools (and a Kerberos client) need to use this realm only."""
        env = dict(os.environ)
        env.update(KRB5_CONFIG=self.krb5_conf, KRB5_KDC_PROFILE=self.kdc_conf,
                   KRB5CCNAME=f"FILE:{os.path.join(self.directory, 'admin.ccache')}")
        env.pop("KRB5_KTNAME", None)
        return env

    def _write_configs(self, host: str) -> None:
        d = self.directory
        kdc_conf = f"""[kdcdefaults]
 kdc_listen = {host}:{self.port}
 kdc_tcp_listen = {host}:{self.port}

[realms]
 {self.name} = {{
  database_name = {d}/principal
  key_stash_file = {d}/stash
  acl_file = {d}/kadm5.acl
  admin_keytab = {d}/kadm5.keytab
  kdc_listen = {host}:{self.port}
  kdc_tcp_listen = {host}:{self.port}
  kadmind_listen = {host}:0
  master_key_type = aes256-cts-hmac-sha1-96
  supported_enctypes = {KEY_SALTS}
  max_life = 10h 0m 0s
  max_renewable_life = 1d 0h 0m 0s
 }}

[logging]
 kdc = FILE:{self.kdc_log}
 admin_server = FILE:{d}/kadmin.log
 default = FILE:{d}/krb5lib.log
"""
        # The client side: nothing is looked up in DNS, names are not canonicalised by reverse
        # lookups, and the only KDC is this one.
        krb5_conf = f"""[libdefaults]
 default_realm = {self.name}
 dns_lookup_kdc = false
 dns_lookup_realm = false
 dns_canonicalize_hostname = false
 rdns = false
 ignore_acceptor_hostname = false
 allow_weak_crypto = false
 allow_rc4 = true
 default_tkt_enctypes = {ENCTYPES}
 default_tgs_enctypes = {ENCTYPES}
 permitted_enctypes = {ENCTYPES}
 udp_preference_limit = 1
 forwardable = true

[realms]
 {self.name} = {{
  kdc = {host}:{self.port}
 }}

[domain_realm]
 {self.hostname} = {self.name}
 .{self.hostname} = {self.name}
"""
        for path, text in ((self.kdc_conf, kdc_conf), (self.krb5_conf, krb5_conf),
                           (os.path.join(d, "kadm5.acl"), "")):
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)

    def _run(self, step: str, argv: list[str], stdin: str | None = None) -> str:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  env=self.env(), timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RealmError(f"{step}: {exc.__class__.__name__}") from None
        if proc.returncode != 0:
            # The tools echo neither passwords nor keys; the first lines say what went wrong.
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RealmError(f"{step} failed: {' / '.join(detail)}")
        return proc.stdout

    def _kadmin(self, step: str, query: str, stdin: str | None = None) -> str:
        return self._run(step, [find_tool("kadmin.local") or "kadmin.local", "-r", self.name,
                                "-q", query], stdin)

    def _create_database(self) -> None:
        master = secrets.token_urlsafe(32)
        # -s writes the stash file, so krb5kdc starts without asking for the master password.
        # -P puts the password on kdb5_util's command line for the instant it runs: it is random,
        # used once, and guards only this throw-away database (the stash file holds the key).
        self._run("kdb5_util create", [find_tool("kdb5_util") or "kdb5_util", "-r", self.name,
                                       "create", "-s", "-P", master])

    def _add_users(self, users: tuple[User, ...]) -> tuple[str, ...]:
        ntlm_only: list[str] = []
        for user in users:
            # Users need pre-authentication, as in Active Directory: without it the KDC hands
            # an AS-REP in the user's key to anyone who asks, for offline guessing. (Not on
            # service principals: there MIT reads the flag as a rule about the client's TGT.)
            flags = "+requires_preauth " + ("" if user.enabled else "-allow_tix ")
            if user.password is not None:
                # kadmin.local prompts for the password twice on stdin.
                self._kadmin(f"addprinc {user.name}", f"addprinc {flags}{user.name}",
                             stdin=f"{user.password}\n{user.password}\n")
                continue
            from .ntkeys import place_rc4_key

            self._kadmin(f"addprinc {user.name}",
                         f"addprinc {flags}-randkey -e rc4-hmac:normal {user.name}")
            if not place_rc4_key(self, user.name, user.nt_hash):
                ntlm_only.append(user.name)
        for name in ntlm_only:
            log.warning("kerberos: user %s is configured by NT hash only and its RC4-HMAC key could "
                        "not be placed in the KDC: NTLM only", name)
        return tuple(ntlm_only)

    def service_principals(self) -> list[str]:
        return [f"{svc}/{self.hostname}@{self.name}" for svc in SERVICE_CLASSES]

    def _add_services(self) -> None:
        for principal in self.service_principals():
            self._kadmin(f"addprinc {principal}", f"addprinc -randkey {principal}")
            self._kadmin(f"ktadd {principal}", f"ktadd -k {self.keytab} {principal}")
        os.chmod(self.keytab, 0o600)

    def _start_kdc(self) -> None:
        krb5kdc = find_tool("krb5kdc") or "krb5kdc"
        with open(os.path.join(self.directory, "krb5kdc.stderr"), "wb") as err:
            self._process = subprocess.Popen(
                [krb5kdc, "-n", "-r", self.name, "-P", os.path.join(self.directory, "kdc.pid")],
                env=self.env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RealmError(f"krb5kdc exited with status {self._process.returncode}: "
                                 f"{self._tail(os.path.join(self.directory, 'krb5kdc.stderr'))}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RealmError(f"krb5kdc did not listen on port {self.port} within 15 s")

    @staticmethod
    def _tail(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return " / ".join(fh.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ lifetime
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the KDC (our own child, by its handle) and remove the realm's directory."""
        atexit.unregister(self.stop)
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)

    def ready_info(self) -> dict[str, object]:
        return {"kdc": self.port, "realm": self.name, "krb5_conf": self.krb5_conf,
                "keytab": self.keytab, "kerberos_host": self.hostname}
