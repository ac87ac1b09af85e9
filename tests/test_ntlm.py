"""The NTLM acceptor driven by impacket's NTLM initiator (MS-NLMP 3.1 client side), sans network."""

from __future__ import annotations

import itertools
import struct
from dataclasses import replace

import pytest
from Cryptodome.Cipher import ARC4
from hypothesis import given, settings, strategies as st
from impacket import ntlm

from emulator.auth.context import authenticated_identity
from emulator.config import default_config
from emulator.directory import Directory
from emulator.identity import ANONYMOUS, RPC_AUTH
from emulator.auth import AuthFactory, KeyUnavailable
from emulator.ntlm import NtlmAcceptor, SessionSecurity
from emulator.ntlm.messages import MIC_OFFSET
from harness.ntlm_messages import PASSWORDS, authenticate_with_mic

CFG = default_config()
DIRECTORY = Directory(CFG)
def factory(**policy) -> AuthFactory:
    return AuthFactory(DIRECTORY, replace(CFG.policy, **policy), CFG.server)


def counter_random():
    """Deterministic, distinct bytes for every call."""
    counter = itertools.count(1)

    def random_bytes(n: int) -> bytes:
        return next(counter).to_bytes(4, "big") * (n // 4) + b"\x07" * (n % 4)
    return random_bytes


def type1(v2: bool = True, signing: bool = True):
    return ntlm.getNTLMSSPType1("WS01", "CORP", signingRequired=signing, use_ntlmv2=v2)


def logon(acceptor: NtlmAcceptor, user: str, password: str, domain: str = "CORP", *,
          v2: bool = True, signing: bool = True):
    """One full handshake; returns (final StepResult, client's exported key, AUTHENTICATE, flags)."""
    t1 = type1(v2, signing)
    challenge = acceptor.step(t1.getData())
    assert not challenge.complete and challenge.token.startswith(b"NTLMSSP\x00\x02")
    t3, key = ntlm.getNTLMSSPType3(t1, challenge.token, user, password, domain, use_ntlmv2=v2)
    return acceptor.step(t3.getData()), key, t3, t3["flags"]


# ---------------------------------------------------------------- an initiator that sends a MIC

def mic_handshake(acceptor, user="bob", **kw):
    t1 = type1().getData()
    chal = acceptor.step(t1).token
    auth, exported, flags = authenticate_with_mic(t1, chal, user, PASSWORDS.get(user, "x"), **kw)
    return t1, chal, auth, exported, flags


# ---------------------------------------------------------------- logon outcomes

@pytest.mark.parametrize("signing", [True, False])
def test_ntlmv2_logon_succeeds_with_identity_and_matching_key(signing):
    acc = factory().acceptor(10)
    final, key, _, _ = logon(acc, "Bob", PASSWORDS["bob"], signing=signing)
    assert final.complete and final.ok and final.token == b""
    assert acc.result.reason == "ok" and acc.result.ntlm_version == "NTLMv2"
    assert acc.result.user == "bob" and acc.result.domain == "CORP" and acc.result.workstation == "WS01"
    ident = authenticated_identity(acc.result, RPC_AUTH)
    assert (ident.user, ident.domain, ident.source) == ("bob", "CORP", RPC_AUTH)
    assert acc.session_key == key
    ev = final.events[0]
    assert (ev.layer, ev.kind, ev.get("result"), ev.get("user"), ev.get("mic")) == \
        ("ntlm", "ntlm.authenticate", "ok", "bob", False)


def test_negotiate_and_challenge_events_and_flags():
    acc = factory().acceptor(10)
    t1 = type1()
    r = acc.step(t1.getData())
    assert [e.kind for e in r.events] == ["ntlm.negotiate", "ntlm.challenge"]
    chal = ntlm.NTLMAuthChallenge(r.token)
    for flag in (ntlm.NTLMSSP_NEGOTIATE_UNICODE, ntlm.NTLMSSP_NEGOTIATE_NTLM,
                 ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY, ntlm.NTLMSSP_NEGOTIATE_128,
                 ntlm.NTLMSSP_NEGOTIATE_KEY_EXCH, ntlm.NTLMSSP_NEGOTIATE_SIGN,
                 ntlm.NTLMSSP_NEGOTIATE_SEAL, ntlm.NTLMSSP_NEGOTIATE_TARGET_INFO):
        assert chal["flags"] & flag
    assert not chal["flags"] & ntlm.NTLMSSP_NEGOTIATE_LM_KEY
    assert r.events[1].get("flags") == f"0x{chal['flags']:08x}"
    av = ntlm.AV_PAIRS(chal["TargetInfoFields"])
    assert av[ntlm.NTLMSSP_AV_DOMAINNAME][1].decode("utf-16-le") == "CORP"
    assert av[ntlm.NTLMSSP_AV_HOSTNAME][1].decode("utf-16-le") == "EXCH01"
    assert av[ntlm.NTLMSSP_AV_DNS_DOMAINNAME] is not None and av[ntlm.NTLMSSP_AV_DNS_HOSTNAME] is not None
    assert len(av[ntlm.NTLMSSP_AV_TIME][1]) == 8


def test_timestamp_comes_from_now():
    f = AuthFactory(DIRECTORY, CFG.policy, CFG.server, now=lambda: 0.0)
    chal = ntlm.NTLMAuthChallenge(f.ntlm().step(type1().getData()).token)
    ts = struct.unpack("<Q", ntlm.AV_PAIRS(chal["TargetInfoFields"])[ntlm.NTLMSSP_AV_TIME][1])[0]
    assert ts == 116444736000000000   # 1970-01-01 as FILETIME


def test_wrong_password():
    acc = factory().ntlm()
    final, *_ = logon(acc, "bob", "not-it")
    assert final.complete and not final.ok and acc.result.reason == "wrong_password"
    assert authenticated_identity(acc.result, RPC_AUTH) == ANONYMOUS and acc.session_key == b""
    with pytest.raises(KeyUnavailable):
        acc.sign(b"x")
    assert acc.verify(b"x", b"\x01" + b"\x00" * 15) is False


@pytest.mark.parametrize("user,domain", [("nobody", "CORP"), ("bob", "OTHERDOM")])
def test_unknown_user_or_foreign_domain(user, domain):
    acc = factory().ntlm()
    final, *_ = logon(acc, user, "whatever", domain)
    assert not final.ok and acc.result.reason == "unknown_user"
    assert final.events[0].get("result") == "unknown_user"


def test_guest_only_when_policy_allows():
    acc = factory(guest_allowed=True).ntlm()
    final, *_ = logon(acc, "nobody", "whatever")
    assert final.ok and acc.result.ntlm_version == "guest"
    assert acc.session_key == b""
    # A known user with the wrong password is never mapped to guest.
    acc = factory(guest_allowed=True).ntlm()
    final, *_ = logon(acc, "bob", "wrong")
    assert not final.ok and acc.result.reason == "wrong_password"


def test_disabled_user_with_right_password():
    acc = factory().ntlm()
    final, *_ = logon(acc, "mallory", PASSWORDS["mallory"])
    assert not final.ok and acc.result.reason == "disabled"


def test_ntlmv1_refused_by_default():
    acc = factory().ntlm()
    final, *_ = logon(acc, "bob", PASSWORDS["bob"], v2=False)
    assert not final.ok and acc.result.reason == "ntlmv1_forbidden"
    assert acc.result.ntlm_version == "NTLMv1"


@pytest.mark.parametrize("signing", [True, False])
def test_ntlmv1_verified_when_allowed(signing):
    acc = factory(ntlmv1_allowed=True).ntlm()
    final, key, _, _ = logon(acc, "bob", PASSWORDS["bob"], v2=False, signing=signing)
    assert final.ok and acc.result.ntlm_version == "NTLMv1"
    assert acc.session_key == key
    acc = factory(ntlmv1_allowed=True).ntlm()
    final, *_ = logon(acc, "bob", "wrong", v2=False)
    assert not final.ok and acc.result.reason == "wrong_password"


def _lm_only(acceptor, password):
    t1 = ntlm.getNTLMSSPType1("WS01", "", use_ntlmv2=False)
    t1["flags"] &= ~ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY
    chal = ntlm.NTLMAuthChallenge(acceptor.step(t1.getData()).token)
    msg = ntlm.NTLMAuthChallengeResponse()
    msg["flags"] = chal["flags"]
    msg["user_name"] = "bob".encode("utf-16-le")
    msg["domain_name"] = "CORP".encode("utf-16-le")
    msg["lanman"] = ntlm.get_ntlmv1_response(ntlm.compute_lmhash(password), chal["challenge"])
    msg["ntlm"] = b""
    return acceptor.step(msg.getData())


def test_lm_only_response():
    acc = factory().ntlm()
    assert not _lm_only(acc, PASSWORDS["bob"]).ok and acc.result.reason == "lm_forbidden"
    acc = factory(ntlmv1_allowed=True).ntlm()
    assert _lm_only(acc, PASSWORDS["bob"]).ok and acc.result.ntlm_version == "LM"
    acc = factory(ntlmv1_allowed=True).ntlm()
    assert not _lm_only(acc, "wrong").ok and acc.result.reason == "wrong_password"


def test_anonymous_refused_then_allowed():
    acc = factory().ntlm()
    final, *_ = logon(acc, "", "", "")
    assert not final.ok and acc.result.reason == "anonymous_forbidden"
    acc = factory(anonymous_allowed=True).ntlm()
    final, *_ = logon(acc, "", "", "")
    assert final.ok and acc.result.ntlm_version == "anonymous" and acc.result.user is None
    assert authenticated_identity(acc.result, RPC_AUTH) == ANONYMOUS
    assert acc.session_key == b""


def test_handshake_expires():
    clock = [1000.0]
    f = AuthFactory(DIRECTORY, CFG.policy, CFG.server, now=lambda: clock[0])
    acc = f.ntlm()
    t1 = type1()
    chal = acc.step(t1.getData()).token
    clock[0] += CFG.policy.limits.handshake_timeout + 1
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")
    assert not acc.step(t3.getData()).ok and acc.result.reason == "expired"


# ---------------------------------------------------------------- replay and freshness

def test_challenges_are_fresh_per_acceptor():
    f = factory()
    t1 = type1().getData()
    chals = {ntlm.NTLMAuthChallenge(f.ntlm().step(t1).token)["challenge"] for _ in range(5)}
    assert len(chals) == 5


def test_seeded_random_is_deterministic():
    def chal(seed_factory):
        return ntlm.NTLMAuthChallenge(seed_factory.ntlm().step(type1().getData()).token)["challenge"]
    a = AuthFactory(DIRECTORY, CFG.policy, CFG.server, random_bytes=counter_random(), now=lambda: 5.0)
    b = AuthFactory(DIRECTORY, CFG.policy, CFG.server, random_bytes=counter_random(), now=lambda: 5.0)
    assert chal(a) == chal(b)


def test_authenticate_replayed_to_another_acceptor_fails():
    f = factory()
    first = f.ntlm()
    final, _, t3, _ = logon(first, "bob", PASSWORDS["bob"])
    assert final.ok
    second = f.ntlm()
    second.step(type1().getData())
    replay = second.step(t3.getData())
    assert replay.complete and not replay.ok
    assert second.result.reason in ("wrong_password", "bad_target_info")


def test_authenticate_twice_on_one_acceptor_is_bad_state_and_drops_keys():
    acc = factory().ntlm()
    final, _, t3, _ = logon(acc, "bob", PASSWORDS["bob"])
    assert final.ok
    again = acc.step(t3.getData())
    assert again.complete and not again.ok and acc.result.reason == "bad_state"
    assert acc.session_key == b"" and authenticated_identity(acc.result, RPC_AUTH) == ANONYMOUS
    with pytest.raises(KeyUnavailable):
        acc.seal(b"data")


def test_out_of_order_messages_are_bad_state():
    acc = factory().ntlm()
    t1 = type1()
    other = factory().ntlm()
    t3, _ = ntlm.getNTLMSSPType3(t1, other.step(t1.getData()).token, "bob", PASSWORDS["bob"], "CORP")
    r = acc.step(t3.getData())
    assert r.complete and not r.ok and acc.result.reason == "bad_state"
    acc = factory().ntlm()
    acc.step(t1.getData())
    r = acc.step(t1.getData())
    assert r.complete and not r.ok and acc.result.reason == "bad_state"


# ---------------------------------------------------------------- tampering and the MIC

def _with_nt_response(t3, transform):
    t3["ntlm"] = transform(t3["ntlm"])
    return t3.getData()


@pytest.mark.parametrize("where", [0, 5, 16 + 20, -6])   # NTProofStr, NTProofStr, client challenge, AV pairs
def test_tampered_ntproofstr_or_blob_is_wrong_password(where):
    acc = factory().ntlm()
    t1 = type1()
    chal = acc.step(t1.getData()).token
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")

    def flip(nt: bytes) -> bytes:
        b = bytearray(nt)
        b[where] ^= 0x01
        return bytes(b)
    r = acc.step(_with_nt_response(t3, flip))
    assert not r.ok and acc.result.reason in ("wrong_password", "malformed")
    if where in (0, 5, 36):
        assert acc.result.reason == "wrong_password"


def test_mic_valid():
    acc = factory().ntlm()
    *_, auth, exported, _ = mic_handshake(acc)
    r = acc.step(auth)
    assert r.ok and acc.result.mic and r.events[0].get("mic") is True
    assert acc.session_key == exported


def test_tampered_mic_is_bad_mic():
    acc = factory().ntlm()
    *_, auth, _, _ = mic_handshake(acc)
    bad = bytearray(auth)
    bad[MIC_OFFSET] ^= 0xFF
    assert not acc.step(bytes(bad)).ok and acc.result.reason == "bad_mic"


def test_tampered_encrypted_session_key_with_mic_is_bad_mic():
    acc = factory().ntlm()
    *_, auth, _, _ = mic_handshake(acc)
    off = struct.unpack_from("<HHI", auth, 52)[2]
    bad = bytearray(auth)
    bad[off] ^= 0x01
    assert not acc.step(bytes(bad)).ok and acc.result.reason == "bad_mic"


def test_mic_over_another_negotiate_is_bad_mic():
    acc = factory().ntlm()
    t1 = type1().getData()
    chal = acc.step(t1).token
    other_negotiate = type1(signing=False).getData()
    auth, _, _ = authenticate_with_mic(other_negotiate, chal, "bob", PASSWORDS["bob"])
    assert not acc.step(auth).ok and acc.result.reason == "bad_mic"


def test_tampered_encrypted_session_key_without_mic_breaks_signing():
    acc = factory().ntlm()
    t1 = type1()
    chal = acc.step(t1.getData()).token
    t3, key = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")
    t3["session_key"] = bytes(b ^ 0x55 for b in t3["session_key"])
    assert acc.step(t3.getData()).ok   # nothing in NTLM covers the key without a MIC...
    assert acc.session_key != key
    client = SessionSecurity(key, t3["flags"], "client")
    assert not acc.verify(b"message", client.sign(b"message"))   # ...but it cannot be used


def test_blob_computed_for_other_target_info_is_bad_target_info():
    acc = factory().ntlm()
    t1 = type1().getData()
    chal = acc.step(t1).token
    auth, _, _ = authenticate_with_mic(t1, chal, "bob", PASSWORDS["bob"],
                                       timestamp=struct.pack("<Q", 1234))
    assert not acc.step(auth).ok and acc.result.reason == "bad_target_info"


# ---------------------------------------------------------------- sign and seal interop

def _client_handles(key: bytes, flags: int):
    sign_key = ntlm.SIGNKEY(flags, key, "Client")
    seal_key = ntlm.SEALKEY(flags, key, "Client")
    srv_sign = ntlm.SIGNKEY(flags, key, "Server")
    srv_seal = ntlm.SEALKEY(flags, key, "Server")
    return (sign_key, seal_key, ARC4.new(seal_key).encrypt), (srv_sign, srv_seal, ARC4.new(srv_seal).encrypt)


def test_sign_and_seal_interoperate_with_impacket_both_ways():
    acc = factory().ntlm()
    final, key, _, flags = logon(acc, "alice", PASSWORDS["alice"])
    assert final.ok and flags & ntlm.NTLMSSP_NEGOTIATE_KEY_EXCH
    (c_sign, c_seal, c_rc4), (s_sign, s_seal, s_rc4) = _client_handles(key, flags)
    for seq in range(3):
        # client -> server: impacket seals and signs, we unseal and verify
        plain = b"request %d" % seq
        sealed, sig = ntlm.SEAL(flags, c_sign, c_seal, plain, plain, seq, c_rc4)
        assert acc.unseal(sealed) == plain
        assert acc.verify(plain, sig.getData())
        # server -> client: we seal and sign, impacket reproduces the same signature
        reply = b"reply %d" % seq
        ours = acc.seal(reply)
        our_sig = acc.sign(reply)
        theirs = s_rc4(ours)                     # impacket's RC4 handle decrypts in place
        assert theirs == reply
        expected = ntlm.SIGN(flags, s_sign, reply, seq, s_rc4)
        assert our_sig == expected.getData()


def test_sign_only_interop_and_sequence_enforced():
    acc = factory().ntlm()
    final, key, _, flags = logon(acc, "alice", PASSWORDS["alice"])
    (c_sign, _c_seal, c_rc4), _ = _client_handles(key, flags)
    sig0 = ntlm.SIGN(flags, c_sign, b"pdu-0", 0, c_rc4).getData()
    assert acc.verify(b"pdu-0", sig0)
    # The client's second PDU is replaced by a replay of the first: refused, since the
    # sequence number has moved on (and the RC4 state with it).
    ntlm.SIGN(flags, c_sign, b"pdu-1", 1, c_rc4)
    assert not acc.verify(b"pdu-0", sig0)
    sig2 = ntlm.SIGN(flags, c_sign, b"pdu-2", 2, c_rc4).getData()
    assert acc.verify(b"pdu-2", sig2)


def test_signature_over_other_message_fails():
    acc = factory().ntlm()
    _, key, _, flags = logon(acc, "alice", PASSWORDS["alice"])
    client = SessionSecurity(key, flags, "client")
    assert not acc.verify(b"tampered", client.sign(b"original"))


@pytest.mark.parametrize("flags", [
    ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY | ntlm.NTLMSSP_NEGOTIATE_128,          # no KEY_EXCH
    ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY | ntlm.NTLMSSP_NEGOTIATE_KEY_EXCH | ntlm.NTLMSSP_NEGOTIATE_56,
    ntlm.NTLMSSP_NEGOTIATE_56,                                                            # no ESS
])
def test_session_security_round_trip_between_roles(flags):
    key = bytes(range(16))
    server, client = SessionSecurity(key, flags, "server"), SessionSecurity(key, flags, "client")
    for i in range(3):
        msg = b"m%d" % i
        sealed = client.seal(msg)
        sig = client.sign(msg)
        assert server.unseal(sealed) == msg and server.verify(msg, sig)
        if flags & ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY:
            sealed = server.seal(msg)
            sig = server.sign(msg)
            assert client.unseal(sealed) == msg and client.verify(msg, sig)


# ---------------------------------------------------------------- secrets stay out of text

def test_no_secret_in_repr_str_events_or_exceptions():
    acc = factory().ntlm()
    final, key, t3, _ = logon(acc, "bob", PASSWORDS["bob"])
    user = DIRECTORY.user("bob")
    secrets = [key, user.nt_hash, t3["ntlm"], t3["ntlm"][:16], acc._security._out.sign_key,
               acc._security._in.seal_key]
    texts = [repr(acc), str(acc), repr(acc.result), str(acc.result), repr(final),
             repr(acc._security), repr(final.events), repr(authenticated_identity(acc.result, RPC_AUTH))]
    wrong = factory().ntlm()
    wrong.step(b"NTLMSSP\x00\x03\x00\x00\x00" + key)
    texts += [repr(wrong), repr(wrong.result), repr(wrong.result)]
    try:
        wrong.sign(b"x")
    except KeyUnavailable as exc:
        texts += [str(exc), repr(exc)]
    blob = "\n".join(texts)
    for s in secrets:
        assert s.hex() not in blob and s.hex().upper() not in blob
        assert repr(s)[2:-1] not in blob and str(s) not in blob
    assert PASSWORDS["bob"] not in blob


# ---------------------------------------------------------------- bad input never raises

def _assert_malformed(acc, r):
    assert r.complete and not r.ok and acc.result.reason in ("malformed", "bad_state")
    if acc.result.reason == "malformed":
        assert any(e.kind == "malformed" and e.layer == "ntlm" for e in r.events)


@pytest.mark.parametrize("token", [
    b"", b"NTLM", b"NTLMSSP\x00", b"XTLMSSP\x00\x01\x00\x00\x00" + b"\x00" * 24,
    b"NTLMSSP\x00\x09\x00\x00\x00" + b"\x00" * 24, b"NTLMSSP\x00\x01\x00\x00\x00",
    b"NTLMSSP\x00\x01\x00\x00\x00" + b"\x00" * 4 + b"\xff\xff\xff\xff\xff\xff\x00\x00" * 2,
])
def test_malformed_negotiate(token):
    acc = factory().ntlm()
    r = acc.step(token)
    _assert_malformed(acc, r)
    assert acc.result.reason == "malformed"


def test_malformed_authenticate_offsets_and_truncation():
    acc_factory = factory()
    t1 = type1()
    for mutate in (
        lambda d: d[:40],                                                    # truncated
        lambda d: d[:20] + struct.pack("<HHI", 24, 24, 0xFFFF) + d[28:],     # NT response off the end
        lambda d: d[:12] + struct.pack("<HHI", 24, 24, 8) + d[20:],          # LM inside the header
        lambda d: d[:36] + struct.pack("<HHI", 3, 3, 100) + d[44:],          # odd UTF-16 user
        lambda d: d[:52] + struct.pack("<HHI", 5, 5, 64) + d[60:],           # 5-byte session key
        lambda d: d[:8] + b"\x07\x00\x00\x00" + d[12:],                      # unknown message type
    ):
        acc = acc_factory.ntlm()
        chal = acc.step(t1.getData()).token
        t3, _ = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")
        r = acc.step(mutate(t3.getData()))
        _assert_malformed(acc, r)
        assert acc.result.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=299))
def test_fuzzed_authenticate_never_raises(noise, cut):
    acc = factory().ntlm()
    t1 = type1()
    chal = acc.step(t1.getData()).token
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")
    data = t3.getData()
    data = data[:cut % len(data)] + noise + data[cut % len(data) + len(noise):]
    r = acc.step(data)
    assert r.complete
    if r.ok:
        # Noise can at most leave the logon intact; it can never produce another identity.
        assert authenticated_identity(acc.result, RPC_AUTH).user == "bob"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_first_token_never_raises(data):
    acc = factory().ntlm()
    r = acc.step(b"NTLMSSP\x00" + data)
    assert not r.ok
