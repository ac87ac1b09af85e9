"""Sans-IO connection-oriented DCE/RPC (MS-RPCE, C706 chapter 12).

- pdu.py: framing (`FrameBuffer`) and typed, bounds-checked PDU decoding (`decode`), shared
  with the capture reader; encoders for the PDUs a server sends.
- verifier.py: the auth verifier of requests and responses (sign, seal, verify, unseal).
- (the rule of KB Q146188 lives in emulator/auth/context.py, `SecurityContext.acting_identity`)
- connection.py: `RpcConnection`, binds, alter_context, auth3, reassembly, dispatch, faults.
- interface.py: the contract between the core and the interfaces it serves.
"""
