"""The capture reader's public names in one place, for callers that read captures (replay, the
recorder's tests, the fuzz targets). Each lives in the module of its layer:

    fileformat   pcap and pcapng records, CaptureError
    packets      link, IP and TCP headers to segments
    reassembly   per-stream TCP reassembly
    scan         the loop from file to reassembler, with the libpcap fast path
"""

from .fileformat import CaptureError, Packet, ProgressFn, read_packets
from .packets import Endpoint, Segment, endpoint_int, endpoint_text, parse_tcp, tcp_fields
from .reassembly import Reassembler, StreamSink, TcpStream
from .scan import reassemble, read_into

__all__ = ["CaptureError", "Endpoint", "Packet", "ProgressFn", "Reassembler", "Segment",
           "StreamSink", "TcpStream", "endpoint_int", "endpoint_text", "parse_tcp",
           "read_into", "read_packets", "reassemble", "tcp_fields"]
