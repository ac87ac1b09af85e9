"""Give a KDC principal an RC4-HMAC key equal to a known NT hash, as Active Directory does.

RFC 4757's RC4-HMAC key is the NT hash itself, so a user the lab knows only by its hash can
still get tickets. MIT's tools set keys from passwords or at random, never from raw bytes; the
one way in is the database dump: `kdb5_util dump`, replace the principal's RC4 key data, and
`kdb5_util load -update`. Key data in a dump is encrypted in the master key (MIT's
krb5_dbe_def_encrypt_key_data: a 2-byte little-endian key length, then the key encrypted with
key usage 0); impacket's Kerberos crypto does that encryption, nothing here implements it.

Keys never leave this module: neither the hash nor the master key is logged or put in an
exception, and the dump file is removed at once.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .realm import Realm

log = logging.getLogger("emulator.kerberos")

ETYPE_RC4_HMAC = 23


def _master_key(stash_path: str) -> tuple[int, bytes]:
    """The master key's (enctype, key bytes) from the stash, which MIT writes as a keytab."""
    from impacket.krb5.keytab import Keytab

    tab = Keytab.loadFile(stash_path)
    for entry in tab.entries:
        keyblock = entry.main_part["keyblock"]
        return int(keyblock["keytype"]), bytes(keyblock["keyvalue"]["data"])
    raise ValueError("the stash holds no key")


def _encrypt_key_data(mkey_type: int, mkey: bytes, key: bytes) -> bytes:
    from impacket.krb5.crypto import Key, _enctype_table

    enc = _enctype_table[mkey_type]
    cipher = enc.encrypt(Key(mkey_type, mkey), 0, key, os.urandom(enc.blocksize))
    return struct.pack("<H", len(key)) + cipher


def _replace_rc4_key(line: str, contents: bytes) -> str | None:
    """The dump line with its RC4 key data replaced, or None when it has no RC4 key.

    The version-7 princ line is tab-separated: "princ", a base length, the principal's length,
    the counts of tl-data and of key data, the extra-data length, the principal, eight
    attribute fields, then tl-data entries (type, length, hex each) and key-data entries
    (version, kvno, then per stored part: type, length, hex)."""
    f = line.rstrip("\n").split("\t")
    n_tl, n_keys = int(f[3]), int(f[4])
    pos = 15 + 3 * n_tl
    for _ in range(n_keys):
        version = int(f[pos])
        parts = 1 if version == 1 else 2
        etype_at = pos + 2
        if int(f[etype_at]) == ETYPE_RC4_HMAC:
            f[etype_at + 1] = str(len(contents))
            f[etype_at + 2] = contents.hex()
            return "\t".join(f) + "\n"
        pos += 2 + 3 * parts
    return None


def place_rc4_key(realm: "Realm", user: str, nt_hash: bytes) -> bool:
    """Set `user`'s RC4-HMAC key (the principal must already have one) to `nt_hash`. False when
    it could not be done; the reason is logged without any key."""
    from .realm import RealmError, find_tool

    dump = os.path.join(realm.directory, f"nt-{user}.dump")
    kdb5_util = find_tool("kdb5_util") or "kdb5_util"
    principal = f"{user}@{realm.name}"
    try:
        realm._run(f"dump {principal}", [kdb5_util, "-r", realm.name, "dump", dump, principal])
        with open(dump, encoding="utf-8") as fh:
            lines = fh.readlines()
        mkey_type, mkey = _master_key(os.path.join(realm.directory, "stash"))
        contents = _encrypt_key_data(mkey_type, mkey, nt_hash)
        out, done = [], False
        for line in lines:
            if line.startswith("princ\t") and line.split("\t")[6] == principal:
                replaced = _replace_rc4_key(line, contents)
                if replaced is None:
                    break
                out.append(replaced)
                done = True
            else:
                out.append(line)
        if not done:
            log.warning("kerberos: %s has no RC4-HMAC key to replace", principal)
            return False
        with open(dump, "w", encoding="utf-8") as fh:
            fh.writelines(out)
        realm._run(f"load {principal}", [kdb5_util, "-r", realm.name, "load", "-update", dump])
        return True
    except (RealmError, OSError, ValueError, KeyError, IndexError) as exc:
        log.warning("kerberos: could not give %s its NT-hash key (%s)", principal,
                    exc.__class__.__name__)
        return False
    finally:
        try:
            os.remove(dump)
        except OSError:
            pass
