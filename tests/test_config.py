"""The lab config: the embedded KB cast, and errors that name file, line and key."""

import pytest

from emulator.config import AUTH_LEVELS, ConfigError, default_config, load_config, parse_config
from impacket.ntlm import compute_nthash


def test_default_lab_is_the_kb_cast():
    cfg = default_config()
    assert cfg.server.domain == "CORP"
    assert {u.name for u in cfg.users} >= {"alice", "bob"}
    owners = {m.dn: m.owner for m in cfg.mailboxes}
    assert owners["/o=Corp/ou=Site/cn=Recipients/cn=bob"] == "bob"
    assert owners["/o=Corp/ou=Site/cn=Recipients/cn=alice"] == "alice"
    assert cfg.policy.min_auth_level == {"ncacn_ip_tcp": AUTH_LEVELS["connect"], "ncacn_np": AUTH_LEVELS["none"]}
    assert cfg.user("mallory").enabled is False


def test_password_becomes_nt_hash_and_stays_out_of_repr():
    cfg = parse_config('users:\n  - {name: dave, password: "S3cret-pw"}\n')
    dave = cfg.user("DAVE")
    assert dave.nt_hash == compute_nthash("S3cret-pw")
    text = repr(cfg)
    assert "S3cret-pw" not in text and dave.nt_hash.hex() not in text


def test_nt_hash_accepted():
    h = compute_nthash("x").hex()
    cfg = parse_config(f'users:\n  - {{name: erin, nt_hash: "{h}"}}\n')
    assert cfg.user("erin").nt_hash.hex() == h and cfg.user("erin").password is None


@pytest.mark.parametrize("text, line, key, reason", [
    ("server: {name: X}\nusers:\n  - {name: a, pasword: x}\n", 3, "users[0].pasword", "unknown key"),
    ("users:\n  - {name: a}\n", 2, "users[0]", "exactly one of password or nt_hash"),
    ("users:\n  - {name: a, nt_hash: zz}\n", 2, "users[0].nt_hash", "32 hex digits"),
    ("users:\n  - {name: a, password: p}\nmailboxes:\n  - {dn: /o=X/cn=a, owner: b}\n", 4,
     "mailboxes[0].owner", "unknown user"),
    ("policy:\n  min_auth_level: {ncacn_ip_tcp: loud}\n", 2, "policy.min_auth_level.ncacn_ip_tcp", "is not one of"),
    ("transports:\n  epm: {port: 70000}\n", 2, "transports.epm.port", "not a TCP port"),
    ("policy:\n  ntlmv1_allowed: maybe\n", 2, "policy.ntlmv1_allowed", "true or false"),
    ("bogus: 1\n", 1, "bogus", "unknown key"),
])
def test_bad_config_names_line_key_and_reason(text, line, key, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lab.yaml")
    err = info.value
    assert (err.source, err.line, err.key) == ("lab.yaml", line, key)
    assert reason in err.reason
    assert str(err).startswith(f"lab.yaml:{line}: {key}: ")


def test_secret_not_echoed_in_errors():
    with pytest.raises(ConfigError) as info:
        parse_config('users:\n  - {name: a, nt_hash: "0123456789abcdef0123456789abcdeX"}\n')
    assert "0123456789abcdef" not in str(info.value)


def test_yaml_syntax_error_has_a_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("users:\n  - {name: a\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(p))
    assert info.value.source == str(p) and info.value.line is not None


def test_missing_file():
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/lab.yaml")
    assert "/nonexistent/lab.yaml" in str(info.value)


def test_port_override():
    cfg = default_config().with_ports(smb=0, epm=None, emsmdb=1234)
    assert cfg.transports.smb.port == 0 and cfg.transports.epm.port == 135 and cfg.transports.emsmdb.port == 1234


def test_overrides_merge_over_the_embedded_lab():
    from emulator.config import default_config_with

    cfg = default_config_with({"policy": {"encryption_required": True}, "server": {"name": "EXCH02"}})
    assert cfg.policy.encryption_required is True
    assert cfg.policy.min_auth_level == default_config().policy.min_auth_level   # other keys kept
    assert cfg.server.name == "EXCH02" and cfg.server.domain == "CORP"
    assert cfg.user("bob") is not None
