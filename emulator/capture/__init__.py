"""Captures as a product output: record conversations as pcap, read any pcap/pcapng back into
the event vocabulary, explain it (text, JSON, Mermaid, HTML), compare two captures, and write
the teaching report of a matrix run."""

from .pcapread import CaptureError
from .recorder import CaptureWriter, StreamRecorder
from .streams import Analysis, analyse
from .explain import explain  # noqa: E402  (the function shadows the submodule on purpose)
from .compare import CompareResult, compare
from .report import write_report

__all__ = ["Analysis", "CaptureError", "CaptureWriter", "CompareResult", "StreamRecorder",
           "analyse", "compare", "explain", "write_report"]
