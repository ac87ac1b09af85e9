"""rpcauth-emulator: a lab emulator of Microsoft KB Q146188.

Exchange RPC reached over a named pipe runs as the SMB session's user; reached over
raw TCP it must authenticate in the RPC bind, and the typed credentials are used.
"""

__version__ = "0.1.0"
