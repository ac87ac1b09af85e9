"""Captures as a product output: record conversations as pcap, read any pcap/pcapng back into
the event vocabulary, explain it (text, JSON, Mermaid, HTML), compare two captures, and write
the teaching report of a matrix run."""

from typing import Any

from .fileformat import CaptureError
from .streams import Analysis, analyse
from .explain import explain  # noqa: E402  (the function shadows the submodule on purpose)
from .compare import CompareResult, compare
from .report import write_report


def __getattr__(name: str) -> Any:
    # The recorder pulls in scapy, which costs a reader (`rpcauth explain`) a noticeable part
    # of its run; it is imported when first asked for.
    if name in ("CaptureWriter", "StreamRecorder"):
        from . import recorder
        return getattr(recorder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Analysis", "CaptureError", "CaptureWriter", "CompareResult", "StreamRecorder",
           "analyse", "compare", "explain", "write_report"]
