"""The CHALLENGE_MESSAGE and its AV pairs, built with struct, against impacket's encoding.

The acceptor lays these out itself (emulator/ntlm/messages.py) because it builds one per
logon; impacket's NTLMAuthChallenge and AV_PAIRS stay the reference the bytes must equal.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from impacket import ntlm as imp

from emulator.ntlm import messages as m

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7FF), max_size=30)


def impacket_target_info(nb_domain, nb_computer, dns_domain, dns_computer, filetime) -> bytes:
    av = imp.AV_PAIRS()
    av[imp.NTLMSSP_AV_DOMAINNAME] = nb_domain.encode("utf-16-le")
    av[imp.NTLMSSP_AV_HOSTNAME] = nb_computer.encode("utf-16-le")
    av[imp.NTLMSSP_AV_DNS_DOMAINNAME] = dns_domain.encode("utf-16-le")
    av[imp.NTLMSSP_AV_DNS_HOSTNAME] = dns_computer.encode("utf-16-le")
    av[imp.NTLMSSP_AV_TIME] = struct.pack("<Q", filetime)
    return av.getData()


def impacket_challenge(flags, challenge, target_name, target_info) -> bytes:
    msg = imp.NTLMAuthChallenge()
    msg["flags"] = flags
    msg["challenge"] = challenge
    msg["reserved"] = b"\x00" * 8
    version = m.SERVER_VERSION if flags & imp.NTLMSSP_NEGOTIATE_VERSION else b""
    msg["Version"] = version
    msg["domain_name"] = target_name
    msg["domain_offset"] = 48 + len(version)
    msg["TargetInfoFields"] = target_info
    msg["TargetInfoFields_offset"] = 48 + len(version) + len(target_name)
    return msg.getData()


@settings(max_examples=200, deadline=None)
@given(names, names, names, names, st.integers(0, 2**64 - 1))
def test_target_info_is_impackets_encoding(nb_domain, nb_computer, dns_domain, dns_computer, when):
    ours = m.build_target_info(nb_domain, nb_computer, dns_domain, dns_computer, when)
    assert ours == impacket_target_info(nb_domain, nb_computer, dns_domain, dns_computer, when)
    pairs = m.parse_av_pairs(ours)
    assert m.av_lookup(pairs, m.AV_TIMESTAMP) == struct.pack("<Q", when)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.binary(min_size=8, max_size=8), st.binary(max_size=40),
       st.binary(max_size=200))
def test_challenge_is_impackets_encoding(flags, challenge, target_name, target_info):
    ours = m.build_challenge(flags, challenge, target_name, target_info)
    assert ours == impacket_challenge(flags, challenge, target_name, target_info)
    parsed = imp.NTLMAuthChallenge(ours)
    assert parsed["challenge"] == challenge and parsed["flags"] == flags
    assert parsed["TargetInfoFields"] == target_info


def test_version_is_sent_only_when_negotiated():
    info = m.build_target_info("CORP", "EXCH01", "corp.example", "exch01.corp.example", 1)
    with_version = m.build_challenge(imp.NTLMSSP_NEGOTIATE_VERSION, b"12345678", b"C\x00", info)
    without = m.build_challenge(0, b"12345678", b"C\x00", info)
    assert len(with_version) - len(without) == 8
    assert with_version[48:56] == m.SERVER_VERSION
