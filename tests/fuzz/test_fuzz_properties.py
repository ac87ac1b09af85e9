"""Property-based fuzzing (hypothesis): arbitrary bytes, and real PDUs with arbitrary edits,
into every decoder. Bounded example counts keep the file fast; the invariant is the same as the
mutation campaign's: only our typed errors, and engines never raise."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.capture.pcapread import CaptureError
from emulator.interfaces.epm import TowerError, parse_tower
from emulator.rpc import pdu as P
from emulator.sansio import ProtocolError

import targets as T
from fuzzkit import cached_targets
from seeds import cached_seeds

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def edited(seed_list):
    """A real seed with a window overwritten by arbitrary bytes (hypothesis shrinks the window)."""
    return st.tuples(st.sampled_from(seed_list), st.integers(0, 4096), st.binary(max_size=64)).map(
        lambda t: t[0][:t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) + len(t[2]):])


def run_target(name, data):
    outcome = cached_targets()[name].run(data)      # raises Crash on any untyped failure
    assert outcome in T.OUTCOMES[:-1]
    return outcome


@SETTINGS
@given(st.binary(max_size=512))
def test_rpc_pdu_decode_arbitrary_bytes(data):
    try:
        pdu = P.decode(data)
    except ProtocolError as exc:
        assert exc.layer == "rpc"
    else:
        assert pdu.header.frag_length == len(data)


@SETTINGS
@given(st.data())
def test_rpc_pdu_decode_edited_real_fragments(data):
    run_target("rpc_pdu", data.draw(edited(cached_targets()["rpc_pdu"].seeds)))


@SETTINGS
@given(st.binary(max_size=300))
def test_epm_tower_arbitrary_bytes(data):
    try:
        tower = parse_tower(data)
    except (TowerError, ProtocolError):
        return
    assert tower.interface and len(tower.syntax) >= 4


@SETTINGS
@given(st.data())
def test_smb_wire_edited_real_messages(data):
    run_target("smb2_wire", data.draw(edited(cached_targets()["smb2_wire"].seeds)))
    run_target("smb1_wire", data.draw(edited(cached_targets()["smb1_wire"].seeds)))


@SETTINGS
@given(st.integers(0, 40), st.integers(0, 40), st.binary(max_size=400))
def test_smb_engines_never_raise_at_any_state(conversation, k, body):
    """Any bytes as message k of a replayed conversation, in SMB1 and SMB2 alike."""
    for name in ("smb2_engine", "smb1_engine"):
        framed = b"\x00" + len(body).to_bytes(3, "big") + body
        run_target(name, T.encode_case(conversation, k, framed))


@SETTINGS
@given(st.binary(max_size=600))
def test_netbios_framing_arbitrary_stream(data):
    run_target("netbios", data)


@SETTINGS
@given(st.integers(0, 40), st.integers(0, 10), st.data())
def test_rpc_connection_edited_fragment_at_any_state(conversation, k, data):
    t = cached_targets()["rpc_connection"]
    frag = data.draw(edited(t.seeds))
    run_target("rpc_connection", T.encode_case(conversation, k, frag))


@SETTINGS
@given(st.booleans(), st.binary(max_size=400))
def test_ntlm_and_spnego_steps_arbitrary_tokens(after_negotiate, token):
    stage = b"\x01" if after_negotiate else b"\x00"
    run_target("ntlm", stage + token)
    run_target("spnego", stage + token)
    run_target("spnego", stage + b"NTLMSSP\x00" + token)


@SETTINGS
@given(st.data())
def test_ntlm_edited_real_authenticate(data):
    run_target("ntlm", b"\x01" + data.draw(edited([T.NTLM_TYPE3])))
    run_target("spnego", b"\x01" + data.draw(edited([T.SPNEGO_RESP])))


@SETTINGS
@given(st.sampled_from([0, 1, 2, 6, 10, 11]), st.data())
def test_emsmdb_stubs_edited_or_arbitrary(opnum, data):
    seeds = [s[1:] for s in cached_targets()["emsmdb"].seeds if s[:1] == bytes([opnum])] or [b""]
    stub = data.draw(st.one_of(edited(seeds), st.binary(max_size=200)))
    run_target("emsmdb", bytes([opnum]) + stub)


@SETTINGS
@given(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.data())
def test_epm_stubs_edited_or_arbitrary(opnum, data):
    seeds = [s[1:] for s in cached_targets()["epm"].seeds] or [b""]
    stub = data.draw(st.one_of(edited(seeds), st.binary(max_size=200)))
    run_target("epm", bytes([opnum]) + stub)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=32))
def test_pcap_reader_edited_captures(at, blob):
    pcaps = cached_seeds().pcaps
    pcap = pcaps[at % len(pcaps)]
    pos = at % len(pcap)
    data = pcap[:pos] + blob + pcap[pos + len(blob):]
    try:
        run_target("pcap", data)
    except CaptureError:
        raise AssertionError("CaptureError should have been classified") from None
