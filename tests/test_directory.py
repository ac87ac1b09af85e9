"""The one function that decides whether an identity may open a mailbox."""

import pytest

from emulator.config import default_config
from emulator.directory import (EC_LOGIN_FAILURE, EC_LOGIN_PERM, EC_SUCCESS, EC_UNKNOWN_USER, Directory,
                                status_hex, status_name)
from emulator.identity import ANONYMOUS, Identity

DN = "/o=Corp/ou=Site/cn=Recipients/cn={}"


@pytest.fixture(scope="module")
def directory():
    return Directory(default_config())


@pytest.mark.parametrize("user, mailbox, status", [
    ("alice", "alice", EC_SUCCESS),          # owner
    ("alice", "bob", EC_LOGIN_PERM),         # the KB's failure
    ("bob", "bob", EC_SUCCESS),
    ("alice", "carol", EC_SUCCESS),          # grant
    ("bob", "carol", EC_LOGIN_PERM),
    ("alice", "nobody", EC_UNKNOWN_USER),    # unknown DN
    ("mallory", "mallory", EC_LOGIN_FAILURE),  # disabled
    ("ghost", "bob", EC_LOGIN_FAILURE),      # not in the directory at all
])
def test_mailbox_access(directory, user, mailbox, status):
    assert directory.mailbox_access(Identity(user, "CORP", "smb_session"), DN.format(mailbox)) == status


def test_dn_is_case_insensitive(directory):
    assert directory.mailbox_access(Identity("bob", "CORP", "rpc_auth"), DN.format("bob").upper()) == EC_SUCCESS


def test_anonymous_is_a_logon_failure(directory):
    assert directory.mailbox_access(ANONYMOUS, DN.format("bob")) == EC_LOGIN_FAILURE


def test_status_names():
    assert status_name(0x3F2) == "ecLoginPerm" and status_hex(0x3F2) == "0x000003f2"
    assert status_name(0x80040111) == "ecLoginFailure"
