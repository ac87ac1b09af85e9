"""Hostile inputs over real loopback sockets: the live lab answers each with an error or a
close, keeps serving a connection opened before the batch, and still logs bob on afterwards."""

from __future__ import annotations

import pytest

from emulator.lab import Lab

import live
from fuzzkit import CI_LIVE_INPUTS
from seeds import cached_seeds, fuzz_config

CATCH_ALL = {"internal_error", "interface_error", "interface_close_error", "close_failed"}


@pytest.mark.parametrize("config", ["default", "open"])
def test_live_lab_survives_hostile_batches(config):
    with Lab(None if config == "default" else fuzz_config()) as lab:
        report = live.run_live(lab, cached_seeds().conversations, CI_LIVE_INPUTS // 2, seed=len(config))
        assert report.total == CI_LIVE_INPUTS // 2
        # Every hostile connection got bytes back, was closed, or is waiting for bytes it was
        # promised by a length field (a truncated frame); nothing else is possible.
        assert set(report.outcomes) <= {"answered", "closed", "answered_then_closed", "waiting"}
        assert report.outcomes["closed"] + report.outcomes["answered_then_closed"] > 0
        caught = [r for r in lab.records("malformed") if r.get("reason") in CATCH_ALL]
        assert caught == []
        assert lab.records("malformed"), "hostile input must be reported as malformed"
        assert lab.records("emsmdb.connect", status_name="ecSuccess", acting_user="CORP\\bob")
