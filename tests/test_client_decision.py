"""The KB's client-side decision table, with no network."""

import pytest

from emulator.client.decision import plan, prompt_shown
from emulator.client.profile import Credentials, Profile

ALICE = Credentials("alice", "a")
BOB = Credentials("bob", "b")


@pytest.mark.parametrize("protseq, uns, shown", [
    ("ncacn_np", False, True), ("ncacn_np", True, False),
    ("ncacn_ip_tcp", False, True), ("ncacn_ip_tcp", True, True),
])
def test_prompt(protseq, uns, shown):
    assert prompt_shown(protseq, uns) is shown


def test_named_pipe_ignores_the_typed_credentials():
    a = plan(Profile("/o=X", ALICE, use_network_security=False, prompt_answer=BOB), "ncacn_np")
    assert a.prompt_shown and a.smb_credentials == ALICE and a.rpc_credentials is None


def test_named_pipe_uses_an_existing_ipc_session():
    a = plan(Profile("/o=X", ALICE, prompt_answer=BOB, ipc_session=BOB), "ncacn_np")
    assert a.smb_credentials == BOB and a.auth_layer == "smb_session_setup"


def test_tcp_uses_the_typed_credentials_in_the_bind():
    a = plan(Profile("/o=X", ALICE, use_network_security=True, prompt_answer=BOB), "ncacn_ip_tcp")
    assert a.prompt_shown and a.rpc_credentials == BOB and a.smb_credentials is None and a.auth_layer == "rpc_bind"


def test_unknown_protseq_rejected():
    with pytest.raises(ValueError):
        Profile("/o=X", ALICE, binding_order=("ncacn_http",))


def test_credentials_repr_hides_password():
    assert "s3cr3t" not in repr(Credentials("bob", "s3cr3t"))


# ---------------------------------------------------------------- beyond the KB: Kerberos

from emulator.client.profile import KerberosLogon  # noqa: E402

TICKET = KerberosLogon(ccache="FILE:/nonexistent", realm="CORP.TEST", hostname="exch01.corp.test")


@pytest.mark.parametrize("security", ["kerberos", "negotiate"])
def test_tcp_with_a_ticket_uses_the_logged_on_user_without_a_prompt(security):
    a = plan(Profile("/o=X", ALICE, prompt_answer=BOB, logon_security=security, kerberos=TICKET),
             "ncacn_ip_tcp")
    assert (a.prompt_shown, a.rpc_credentials, a.mech) == (False, ALICE, "kerberos")


def test_negotiate_without_a_ticket_falls_back_to_the_typed_ntlm_credentials():
    a = plan(Profile("/o=X", ALICE, prompt_answer=BOB, logon_security="negotiate"), "ncacn_ip_tcp")
    assert (a.prompt_shown, a.rpc_credentials, a.mech) == (True, BOB, "ntlm")


def test_kerberos_without_a_ticket_still_asks_for_kerberos():
    a = plan(Profile("/o=X", ALICE, prompt_answer=BOB, logon_security="kerberos"), "ncacn_ip_tcp")
    assert (a.prompt_shown, a.mech) == (False, "kerberos")


def test_named_pipe_session_is_kerberos_for_the_logged_on_user_only():
    own = plan(Profile("/o=X", ALICE, kerberos=TICKET), "ncacn_np")
    assert (own.smb_credentials, own.mech) == (ALICE, "kerberos")
    other = plan(Profile("/o=X", ALICE, ipc_session=BOB, kerberos=TICKET), "ncacn_np")
    assert (other.smb_credentials, other.mech) == (BOB, "ntlm")


def test_unknown_logon_security_is_refused():
    with pytest.raises(ValueError):
        Profile("/o=X", ALICE, logon_security="smartcard")
