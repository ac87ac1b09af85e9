"""Samba's own test suite, smbtorture (Debian package samba-testsuite), against the emulator.

The runs, the subtests each must report and what the emulator should score on each come from
one catalogue, scripts/conformance.py, which also writes docs/conformance.md. Each smbtorture
run is made once per module, against a lab on ephemeral ports, with a bounded run time; every
subtest it reports becomes its own pytest case. A subtest that fails today because of the SMB
engine is an xfail(strict) naming the exact cause, so fixing that cause turns it red here and
the mark has to go.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import conformance as C

pytestmark = pytest.mark.skipif(not C.have_smbtorture(),
                                reason="smbtorture is not installed (Debian package samba-testsuite; "
                                       "scripts/bootstrap.sh installs it)")

RUNS = {r.id: r for r in C.catalogue()}


class _Results:
    """Runs smbtorture lazily, each run once, one lab per lab kind at a time."""

    def __init__(self) -> None:
        self.done: dict[str, C.RunResult | str] = {}
        self.spent = 0.0

    def get(self, run: C.Run) -> C.RunResult | str:
        if run.id not in self.done:
            # Every run of this run's lab kind (and port-135 need) in one lab: cheaper than
            # one lab per run, and the runs of a kind follow each other in the parameter list.
            group = [r for r in RUNS.values() if r.lab == run.lab and r.needs_135 == run.needs_135
                     and r.id not in self.done]
            start = time.monotonic()
            self.done.update(C.run_on_emulator(group))
            self.spent += time.monotonic() - start
        return self.done[run.id]


@pytest.fixture(scope="module")
def results():
    r = _Results()
    yield r
    ran = [x for x in r.done.values() if isinstance(x, C.RunResult)]
    print(f"\nsmbtorture: {len(ran)} runs, {sum(x.elapsed for x in ran):.1f} s in smbtorture, "
          f"{r.spent:.1f} s with lab start and stop")


def _cases():
    for run in RUNS.values():
        for name in run.subtests:
            expect = C.EXPECT.get(name, C.Expect())
            marks = [pytest.mark.needs_root] if run.needs_135 else []
            if expect.smb_cause:
                marks.append(pytest.mark.xfail(strict=True, reason=f"SMB side: {expect.smb_cause}"))
            yield pytest.param(run.id, name, id=f"{run.id}::{name}", marks=marks)


def _explain(result: C.RunResult, name: str) -> str:
    o = result.outcome(name)
    return (f"smbtorture {o.result} on {name}\n  {o.detail}\ncommand: {' '.join(result.argv)}\n"
            f"--- output ---\n{C.excerpt(result.output)}")


@pytest.mark.parametrize("run_id, name", list(_cases()))
def test_smbtorture(results, run_id, name):
    run = RUNS[run_id]
    result = results.get(run)
    if isinstance(result, str):
        pytest.skip(result)
    assert result.returncode is not None, f"smbtorture timed out\n{C.excerpt(result.output)}"
    expect = C.EXPECT.get(name, C.Expect())
    outcome = result.outcome(name)
    want = "success" if expect.smb_cause else expect.result
    assert outcome.result == want, _explain(result, name)
    if expect.detail:
        # A failure Windows gives too: it must fail for that reason and no other.
        assert expect.detail in outcome.detail, _explain(result, name)


def test_every_subtest_reported_is_in_the_catalogue(results):
    """A subtest smbtorture reports that the catalogue does not list would go unchecked."""
    extra = {}
    for run in RUNS.values():
        result = results.get(run)
        if isinstance(result, C.RunResult):
            unknown = set(result.outcomes) - set(run.subtests)
            if unknown:
                extra[run.id] = sorted(unknown)
    assert not extra, extra


# Which (authentication type, level) the binding options must reach the server as. On TCP,
# with credentials and no auth option, Samba's client binds with SPNEGO at integrity; on a pipe,
# below integrity, it binds with no RPC authentication (the SMB session's identity).
_AUTH_TYPE = ("ntlm", "spnego")
_LEVEL = {"connect": "connect", "sign": "integrity", "seal": "privacy"}


def wanted_auth(run: C.Run) -> tuple[str, str]:
    opts = set(filter(None, run.options.split(",")))
    kind = next((t for t in _AUTH_TYPE if t in opts), None)
    level = next((lvl for o, lvl in _LEVEL.items() if o in opts), None)
    if run.transport == "tcp":
        return kind or "spnego", level or "integrity"
    if level in (None, "connect"):
        return "none", "none"
    return kind or "spnego", level or "integrity"


@pytest.mark.parametrize("run_id", [r.id for r in RUNS.values() if not r.needs_135])
def test_the_run_reached_the_server_as_asked(results, run_id):
    """smbtorture ignores an option it does not know; check, from the lab's events, that each
    run negotiated the dialect it forces and bound with its binding options' protection."""
    run = RUNS[run_id]
    result = results.get(run)
    if isinstance(result, str):
        pytest.skip(result)
    if run.family == "smb2.ioctl":
        # The test opens a second connection of its own choosing, SMB 3 in any case.
        assert C.SEEN_DIALECT[run.dialect] in result.dialects, result.dialects
        assert result.dialects <= {"3.0", "3.0.2", "3.1.1"}, result.dialects
    elif run.transport != "tcp" and run.dialect:
        assert result.dialects == {C.SEEN_DIALECT[run.dialect]}, result.dialects
    iface = {"epmapper": "epm", "srvsvc": "srvsvc", "": "epm"}.get(run.endpoint)
    if run.family.startswith(("rpc.epmapper", "rpc.countcalls")):
        binds = {(t, lvl) for i, t, lvl in result.binds if i == iface}
        assert binds == {wanted_auth(run)}, result.binds
    elif run.family == "rpc.srvsvc":
        # The anonymous-access cases bind on an anonymous session of their own.
        binds = {(t, lvl) for i, t, lvl in result.binds if i == "srvsvc"}
        assert wanted_auth(run) in binds, result.binds
