"""Every crasher the fuzzers ever found, replayed through the decoder that crashed on it.

Files in corpus/ are named `<target>-<hash>.bin` (raw bytes) or `.hex` (hex text); bench/fuzz.py
and the campaign write them. Each must now be answered with a typed outcome.
"""

from __future__ import annotations

import binascii
import os

from campaign import CORPUS
from fuzzkit import cached_targets
from targets import OUTCOMES


def corpus_files() -> list[str]:
    if not os.path.isdir(CORPUS):
        return []
    return sorted(f for f in os.listdir(CORPUS) if f.endswith((".bin", ".hex")))


def load(name: str) -> bytes:
    with open(os.path.join(CORPUS, name), "rb") as f:
        raw = f.read()
    return binascii.unhexlify(b"".join(raw.split())) if name.endswith(".hex") else raw


def test_corpus_files_name_a_known_decoder():
    targets = cached_targets()
    for name in corpus_files():
        assert name.rsplit("-", 1)[0] in targets, name


def test_every_crasher_is_now_handled():
    """One regression test for the whole corpus: each file through the decoder it crashed."""
    assert os.path.isdir(CORPUS)
    targets = cached_targets()
    for name in corpus_files():
        target = targets[name.rsplit("-", 1)[0]]
        assert target.run(load(name)) in OUTCOMES[:-1], name
