"""The rpcauth_lab fixture used the way a lab tester would, in a separate pytest run."""

pytest_plugins = ["pytester"]


def test_fixture_in_five_lines(pytester):
    pytester.makepyfile(test_lab="""
        def test_kb(rpcauth_lab):
            r = rpcauth_lab.client(mailbox="/o=Corp/ou=Site/cn=Recipients/cn=bob", binding_order=["ncacn_np"], typed="bob")
            assert r.status_name == "ecLoginPerm" and r.acting_user == "CORP\\\\alice"
            assert rpcauth_lab.records("emsmdb.connect")[-1]["identity_source"] == "smb_session"
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "rpcauth")
    result.assert_outcomes(passed=1)


def test_marker_changes_the_lab(pytester):
    pytester.makepyfile(test_marker="""
        import pytest

        @pytest.mark.rpcauth_config({"policy": {"encryption_required": True}})
        def test_connect_level_is_not_enough(rpcauth_lab):
            r = rpcauth_lab.client(mailbox="/o=Corp/ou=Site/cn=Recipients/cn=bob", binding_order=["ncacn_ip_tcp"],
                                   typed="bob")
            assert r.status_name == "ecNotEncrypted"
    """)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
