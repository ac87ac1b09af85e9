"""Sans-IO connection-oriented DCE/RPC (MS-RPCE, C706 chapter 12)."""
