"""Sans-IO SMB server for IPC$ named pipes (SMB2 2.0.2-3.1.1 and SMB1 NT LM 0.12)."""
