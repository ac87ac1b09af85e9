"""Pieces of the reference captures that tests feed to the decoders, read with tshark (the
truth for captures) rather than with our own reader."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from .cast import REFERENCE

MAPI_PCAP = Path(REFERENCE).resolve() / "mapi.pcap"


def mapi_connect_stub_from_pcap() -> bytes:
    """The EcDoConnect request stub a real Outlook sent (frame 715 of mapi.pcap)."""
    if not MAPI_PCAP.exists():
        pytest.skip(f"reference capture absent: {MAPI_PCAP}")
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    out = subprocess.run(["tshark", "-r", str(MAPI_PCAP), "-Y", "mapi.opnum==0 && dcerpc.pkt_type==0",
                          "-T", "fields", "-e", "tcp.payload"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    pdu = bytes.fromhex(out[0])
    frag_len, auth_len = struct.unpack_from("<HH", pdu, 8)
    trailer = frag_len - auth_len - 8          # sec_trailer start (MS-RPCE 2.2.2.11)
    pad = pdu[trailer + 2] if auth_len else 0
    return pdu[24: trailer - pad] if auth_len else pdu[24:frag_len]
