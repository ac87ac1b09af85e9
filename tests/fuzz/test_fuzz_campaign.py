"""The CI fuzz campaign: mutated real PDUs into every decoder, sans-IO and in process.

Each decoder gets its share of about 17,000 inputs; none may raise anything but our typed
errors, and no engine's catch-all may fire (that would hide a decoder raising an untyped
exception). Each test also checks the campaign reached past the first length check, so a
mutator that only ever produced garbage would fail here rather than pass vacuously.
"""

from __future__ import annotations

import pytest

import campaign
from fuzzkit import CI_SANS_IO_INPUTS, CI_SEED, cached_targets
from seeds import cached_seeds
from targets import new_engine

TARGETS = ["smb2_engine", "smb1_engine", "netbios", "smb2_wire", "smb1_wire", "rpc_pdu", "rpc_connection",
           "ntlm", "spnego", "emsmdb", "epm", "epm_tower", "pcap"]


def test_every_decoder_has_seeds_from_real_traffic():
    targets = cached_targets()
    assert sorted(targets) == sorted(TARGETS)
    for name, target in targets.items():
        assert target.seeds, f"{name} has no seed inputs"
    services = {c.service for c in cached_seeds().conversations}
    assert services == {"smb", "epm", "emsmdb"}


@pytest.mark.parametrize("service, expect", [("smb", {"smb.pipe_open", "emsmdb.connect"}),
                                              ("emsmdb", {"rpc.bind", "emsmdb.connect"}),
                                              ("epm", {"epm.map", "epm.lookup"})])
def test_recorded_conversations_replay_to_the_same_depth(service, expect):
    """The seeded replay reaches the states the live server reached, so a mutated message k is
    decoded in the state message k really arrived in."""
    convs = [c for c in cached_seeds().conversations if c.replayable and c.service == service]
    assert convs
    for conv in convs:
        engine = new_engine(conv)
        kinds = set()
        for message in conv.messages:
            out = engine.receive(message)
            kinds |= {e.kind for e in out.events}
            assert not out.close, conv.name
        wanted = expect if service != "smb" or "emsmdb" in conv.name else {"smb.pipe_open"}
        assert wanted <= kinds, (conv.name, sorted(kinds))


@pytest.mark.parametrize("name", TARGETS)
def test_campaign_share_raises_nothing_untyped(name):
    targets = cached_targets()
    share = campaign.plan(targets, CI_SANS_IO_INPUTS)[name]
    report = campaign.run({name: targets[name]}, share, seed=CI_SEED)
    counts = report.counts[name]
    assert sum(counts.values()) == share
    details = "\n\n".join(c.detail for c in report.crashes[:3])
    assert counts["crash"] == 0, f"{counts['crash']} crashes in {name}:\n{details}"
    # Past the first check: some inputs are still accepted, some refused.
    assert counts["ok"] > 0, counts
    assert counts["ok"] < share, counts
