"""Captures as a product output: record conversations as pcap, read any pcap/pcapng back into
the event vocabulary, explain it (text, JSON, Mermaid, HTML), compare two captures, and write
the teaching report of a matrix run."""

from .pcapread import CaptureError

__all__ = ["CaptureError", "CaptureWriter", "StreamRecorder", "analyse", "explain", "compare",
           "write_report"]


def __getattr__(name: str):
    # Lazy imports keep `import emulator.capture` light for the server, which only records.
    if name in ("CaptureWriter", "StreamRecorder"):
        from . import recorder
        return getattr(recorder, name)
    if name == "analyse":
        from .streams import analyse
        return analyse
    if name == "explain":
        from .explain import explain
        return explain
    if name == "compare":
        from .compare import compare
        return compare
    if name == "write_report":
        from .report import write_report
        return write_report
    raise AttributeError(name)
