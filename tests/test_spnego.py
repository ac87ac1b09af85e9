"""The SPNEGO acceptor (RFC 4178, MS-SPNG) with tokens built by impacket.spnego around impacket
NTLM messages, sans network."""

from __future__ import annotations

from dataclasses import replace

import pytest
from Cryptodome.Cipher import ARC4
from hypothesis import given, settings, strategies as st
from impacket import ntlm
from impacket.spnego import SPNEGO_NegTokenInit, SPNEGO_NegTokenResp, TypesMech

from emulator.auth.acceptor import PacketParts
from emulator.auth.context import authenticated_identity
from emulator.config import default_config
from emulator.directory import Directory
from emulator.identity import SMB_SESSION
from emulator.auth import AuthFactory
from emulator.ntlm import NtlmAcceptor, SpnegoAcceptor
from emulator.ntlm import der
from emulator.ntlm.spnego import NTLMSSP_OID
from harness.ntlm_messages import PASSWORDS, authenticate_with_mic

CFG = default_config()
DIRECTORY = Directory(CFG)
NTLMSSP = TypesMech["NTLMSSP - Microsoft NTLM Security Support Provider"]
MS_KRB5 = TypesMech["MS KRB5 - Microsoft Kerberos 5"]
KRB5 = TypesMech["KRB5 - Kerberos 5"]
REJECT = bytes.fromhex("a1073005a0030a0102")
ACCEPT_COMPLETED_NO_MIC = bytes.fromhex("a1073005a0030a0100")


def factory(**policy) -> AuthFactory:
    return AuthFactory(DIRECTORY, replace(CFG.policy, **policy), CFG.server)


def init_token(mechs, mech_token=None) -> bytes:
    blob = SPNEGO_NegTokenInit()
    blob["MechTypes"] = list(mechs)
    if mech_token is not None:
        blob["MechToken"] = mech_token
    return blob.getData()


def mech_list_der(mechs) -> bytes:
    return der.tlv(der.SEQUENCE, b"".join(der.tlv(der.OID, m) for m in mechs))


def resp_token(token: bytes, mic: bytes | None = None) -> bytes:
    r = SPNEGO_NegTokenResp()
    r["ResponseToken"] = token
    if mic is not None:
        r["mechListMIC"] = mic
    return r.getData()


def parse_resp(token: bytes) -> dict[int, bytes]:
    """negTokenResp fields by tag number, each as the inner primitive's value."""
    seq = der.read_exact(der.read_exact(token, 0xA1).value, der.SEQUENCE)
    return {n: der.read(el.value)[0].value for n, el in der.fields(seq.value).items()}


class Client:
    """The initiator's NTLM keys for the mechListMIC, computed with impacket's primitives."""

    def __init__(self, key: bytes, flags: int) -> None:
        self.flags = flags
        self.sign_key = ntlm.SIGNKEY(flags, key, "Client")
        self.seal_key = ntlm.SEALKEY(flags, key, "Client")
        self.srv_sign_key = ntlm.SIGNKEY(flags, key, "Server")
        self.srv_seal_key = ntlm.SEALKEY(flags, key, "Server")

    def mic(self, data: bytes, seq: int = 0) -> bytes:
        return ntlm.SIGN(self.flags, self.sign_key, data, seq, ARC4.new(self.seal_key).encrypt).getData()

    def server_mic(self, data: bytes, seq: int = 0) -> bytes:
        return ntlm.SIGN(self.flags, self.srv_sign_key, data, seq,
                         ARC4.new(self.srv_seal_key).encrypt).getData()


# ---------------------------------------------------------------- the impacket SMB client's exchange

def test_impacket_style_exchange():
    acc = factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    first = acc.step(init_token([NTLMSSP], t1.getData()))
    assert not first.complete
    parsed = SPNEGO_NegTokenResp(first.token)          # impacket's own parser accepts it
    assert parsed["NegState"] == b"\x01" and parsed["SupportedMech"] == NTLMSSP
    assert parsed["ResponseToken"].startswith(b"NTLMSSP\x00\x02")
    t3, key = ntlm.getNTLMSSPType3(t1, parsed["ResponseToken"], "alice", PASSWORDS["alice"], "CORP")
    final = acc.step(resp_token(t3.getData()))
    assert final.complete and final.ok and final.token == ACCEPT_COMPLETED_NO_MIC
    assert acc.result.mech == "spnego" and acc.result.user == "alice"
    assert authenticated_identity(acc.result, SMB_SESSION).user == "alice"
    assert acc.session_key == key
    assert [e.kind for e in final.events] == ["ntlm.authenticate", "spnego.accept"]


def test_wrong_password_is_rejected_with_reject_token():
    acc = factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    chal = SPNEGO_NegTokenResp(acc.step(init_token([NTLMSSP], t1.getData())).token)["ResponseToken"]
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "alice", "nope", "CORP")
    final = acc.step(resp_token(t3.getData()))
    assert final.complete and not final.ok and final.token == REJECT
    assert acc.result.reason == "wrong_password" and acc.result.mech == "spnego"
    assert acc.session_key == b""


def test_token_after_completion_is_bad_state():
    acc = factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    chal = SPNEGO_NegTokenResp(acc.step(init_token([NTLMSSP], t1.getData())).token)["ResponseToken"]
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "alice", PASSWORDS["alice"], "CORP")
    assert acc.step(resp_token(t3.getData())).ok
    again = acc.step(resp_token(t3.getData()))
    assert again.complete and not again.ok and acc.result.reason == "bad_state"
    assert acc.session_key == b""


# ---------------------------------------------------------------- mechListMIC (MS-SPNG 3.1.5.1)

def _mic_exchange(acc: SpnegoAcceptor, mechs, optimistic: bool = True):
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True).getData()
    if optimistic:
        chal = parse_resp(acc.step(init_token(mechs, t1)).token)[2]
    else:
        first = acc.step(init_token(mechs, b"\x60\x00optimistic-kerberos"))
        assert parse_resp(first.token) == {0: b"\x03", 1: NTLMSSP_OID}   # request-mic, no token
        second = parse_resp(acc.step(resp_token(t1)).token)
        assert second[0] == b"\x01" and 1 not in second
        chal = second[2]
    auth, exported, flags = authenticate_with_mic(t1, chal, "bob", PASSWORDS["bob"])
    return auth, Client(exported, flags)


def test_mech_list_mic_verified_and_answered():
    acc = factory().spnego()
    auth, client = _mic_exchange(acc, [NTLMSSP])
    mech_list = mech_list_der([NTLMSSP])
    final = acc.step(resp_token(auth, client.mic(mech_list)))
    assert final.ok and acc.result.mic
    fields = parse_resp(final.token)
    assert fields[0] == b"\x00" and set(fields) == {0, 3}
    # Our mechListMIC is the server-to-client signature over the same list, at sequence 0.
    assert fields[3] == client.server_mic(mech_list, 0)
    # MS-SPNG 3.3.5.1: the RC4 state is restored for the first application message, whose
    # sequence number follows the mechListMIC's.
    pdu = b"first signed pdu"
    assert acc.check_packet(PacketParts(b"", pdu, b""), client.mic(pdu, 1))
    assert acc.sign_packet(PacketParts(b"", pdu, b"")) == client.server_mic(pdu, 1)


def test_bad_mech_list_mic_is_rejected():
    acc = factory().spnego()
    auth, client = _mic_exchange(acc, [NTLMSSP])
    wrong = client.mic(mech_list_der([KRB5, NTLMSSP]))    # a list the attacker rewrote
    final = acc.step(resp_token(auth, wrong))
    assert not final.ok and final.token == REJECT and acc.result.reason == "bad_mic"
    assert acc.session_key == b"" and authenticated_identity(acc.result, SMB_SESSION).user is None


def test_ntlm_mic_without_mech_list_mic_is_rejected():
    acc = factory().spnego()
    auth, _ = _mic_exchange(acc, [NTLMSSP])
    final = acc.step(resp_token(auth))
    assert not final.ok and acc.result.reason == "bad_mic"


def test_kerberos_first_gets_request_mic_and_needs_the_mic():
    mechs = [MS_KRB5, KRB5, NTLMSSP]
    acc = factory().spnego()
    auth, client = _mic_exchange(acc, mechs, optimistic=False)
    final = acc.step(resp_token(auth, client.mic(mech_list_der(mechs))))
    assert final.ok and parse_resp(final.token)[0] == b"\x00"


def test_kerberos_first_without_mic_fails():
    acc = factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    acc.step(init_token([KRB5, NTLMSSP]))
    chal = parse_resp(acc.step(resp_token(t1.getData())).token)[2]
    t3, _ = ntlm.getNTLMSSPType3(t1, chal, "bob", PASSWORDS["bob"], "CORP")
    final = acc.step(resp_token(t3.getData()))
    assert not final.ok and acc.result.reason == "bad_mic"


def test_kerberos_only_is_rejected():
    acc = factory().spnego()
    r = acc.step(init_token([MS_KRB5, KRB5], b"\x60\x00"))
    assert r.complete and not r.ok and r.token == REJECT
    assert acc.result.reason == "unsupported_mech"


# ---------------------------------------------------------------- raw NTLMSSP and the factory

def test_raw_ntlmssp_through_the_spnego_acceptor():
    acc = factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    chal = acc.step(t1.getData())
    assert chal.token.startswith(b"NTLMSSP\x00\x02")
    t3, _ = ntlm.getNTLMSSPType3(t1, chal.token, "bob", PASSWORDS["bob"], "CORP")
    final = acc.step(t3.getData())
    assert final.ok and final.token == b"" and acc.result.mech == "ntlm"


def test_factory_maps_rpc_auth_types():
    f = factory()
    assert isinstance(f.acceptor(10), NtlmAcceptor)
    assert isinstance(f.acceptor(9), SpnegoAcceptor)
    assert f.acceptor(16) is None and f.acceptor(0) is None
    assert isinstance(f.spnego(), SpnegoAcceptor)


def test_neg_token_init2_for_negotiate_responses():
    token = factory().spnego_init_token()
    parsed = SPNEGO_NegTokenInit(token)
    assert parsed["MechTypes"] == [NTLMSSP]
    assert token.startswith(bytes.fromhex("604806062b0601050502a03e303ca00e300c060a2b06010401823702020a"))
    assert b"not_defined_in_RFC4178@please_ignore" in token


# ---------------------------------------------------------------- bad input never raises

@pytest.mark.parametrize("token", [
    b"", b"\x60", b"\x60\x80\x00\x00", b"\x60\x05\x06\x03\x2a\x03\x04", b"\xa1\x00", b"\x30\x00",
    b"\x60\x84\xff\xff\xff\xff", init_token([NTLMSSP], b"NTLMSSP\x00garbage"),
    b"\xa0\x02\x30\x00",
])
def test_malformed_first_tokens(token):
    acc = factory().spnego()
    r = acc.step(token)
    assert r.complete and not r.ok
    assert acc.result.reason in ("malformed", "bad_state")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_fuzzed_tokens_never_raise(data, after_first):
    acc = factory().spnego()
    if after_first:
        acc.step(init_token([NTLMSSP], ntlm.getNTLMSSPType1("WS01", "CORP", True).getData()))
    r = acc.step(data)
    assert isinstance(r.token, bytes)
    assert not r.ok


def test_repr_hides_keys():
    acc = factory().spnego()
    auth, client = _mic_exchange(acc, [NTLMSSP])
    final = acc.step(resp_token(auth, client.mic(mech_list_der([NTLMSSP]))))
    key = acc.session_key
    text = repr(acc) + str(acc) + repr(acc.result) + repr(final) + repr(final.events)
    assert key and key.hex() not in text and repr(key)[2:-1] not in text


# ---------------------------------------------------------------- with a realm: Kerberos offered

def kerberos_factory(**policy) -> AuthFactory:
    """A factory whose labs have a realm. Nothing here reaches Kerberos itself (its keys are
    read on the first Kerberos token), so no KDC is needed for what SPNEGO offers and refuses."""
    pytest.importorskip("gssapi")
    from emulator.kerberos.acceptor import KerberosService

    service = KerberosService(keytab="/nonexistent/lab.keytab", rcache="none:", realm="CORP.TEST",
                              domain="CORP")
    return AuthFactory(DIRECTORY, replace(CFG.policy, **policy), CFG.server, kerberos=service)


def offered(init2: bytes) -> list[bytes]:
    outer = der.read_exact(init2, der.APPLICATION_0)
    _, pos = der.read(outer.value)
    init = der.read_exact(outer.value[pos:], der.context(0))
    seq = der.fields(der.read_exact(init.value, der.SEQUENCE).value)
    return [el.value for el in der.children(der.read_exact(seq[0].value, der.SEQUENCE).value)]


def test_a_realm_adds_both_kerberos_oids_before_ntlm():
    assert offered(factory().spnego_init_token()) == [NTLMSSP_OID]
    assert offered(kerberos_factory().spnego_init_token()) == [MS_KRB5, KRB5, NTLMSSP_OID]
    assert offered(kerberos_factory(require_kerberos=True).spnego_init_token()) == [MS_KRB5, KRB5]


def test_ntlm_still_works_beside_kerberos():
    acc = kerberos_factory().spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True)
    r1 = acc.step(init_token([NTLMSSP, KRB5], t1.getData()))
    assert not r1.complete
    t3, _ = ntlm.getNTLMSSPType3(t1, parse_resp(r1.token)[2], "alice", PASSWORDS["alice"], "CORP")
    final = acc.step(resp_token(t3.getData()))
    assert final.ok and acc.result.user == "alice" and acc.result.mech == "spnego"


@pytest.mark.parametrize("how", ["spnego", "raw"])
def test_ntlm_is_a_downgrade_when_kerberos_is_required(how):
    acc = kerberos_factory(require_kerberos=True).spnego()
    t1 = ntlm.getNTLMSSPType1("WS01", "CORP", True).getData()
    r = acc.step(init_token([NTLMSSP], t1) if how == "spnego" else t1)
    assert r.complete and not r.ok and acc.result.reason == "downgrade"
    assert [(e.kind, e.get("result")) for e in r.events][-1] == ("spnego.accept", "downgrade")
    assert acc.session_key == b""


def test_plain_ntlm_rpc_auth_is_refused_when_kerberos_is_required():
    assert kerberos_factory(require_kerberos=True).acceptor(10) is None
    assert kerberos_factory().acceptor(10) is not None
    assert factory().acceptor(16) is None          # no realm, no Kerberos
