"""The KB's decision logic, with no I/O: for a protocol sequence, is the credential prompt
shown, and whose credentials reach the wire?

KB Q146188, STATUS: over raw IP there is no authenticated session, so the client prompts and
passes the typed credentials on the RPC calls. Over named pipes it already runs inside an
authenticated SMB session and uses that session; the prompt (shown only when Use Network
Security is off) is answered but its answer is never used.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profile import Credentials, Profile


@dataclass(frozen=True)
class Attempt:
    protseq: str
    prompt_shown: bool
    # Credentials the SMB session is set up with (named pipes), or None.
    smb_credentials: Credentials | None
    # Credentials put into the RPC bind's NTLM exchange (raw TCP), or None for a bind without auth.
    rpc_credentials: Credentials | None
    auth_layer: str          # "smb_session_setup" | "rpc_bind"
    mech: str = "ntlm"       # how the authenticating layer proves the user: "ntlm" | "kerberos"


def prompt_shown(protseq: str, use_network_security: bool) -> bool:
    if protseq == "ncacn_ip_tcp":
        return True          # no session exists on raw TCP: always ask
    return not use_network_security


def plan(profile: Profile, protseq: str) -> Attempt:
    shown = prompt_shown(protseq, profile.use_network_security)
    typed = profile.prompt_answer if shown else None
    ticket = profile.kerberos is not None
    if protseq == "ncacn_np":
        # The redirector's session wins: an explicit IPC$ session if one exists, else the
        # logged-on user. What was typed at the prompt is not used. The redirector negotiates
        # Kerberos for the logged-on user's own session when a ticket can be had.
        smb = profile.ipc_session or profile.logged_on
        mech = "kerberos" if ticket and profile.ipc_session is None else "ntlm"
        return Attempt(protseq, shown, smb, None, "smb_session_setup", mech)
    if protseq == "ncacn_ip_tcp":
        if profile.logon_security == "kerberos" or (profile.logon_security == "negotiate" and ticket):
            # Beyond the KB: Kerberos uses the logged-on user's ticket, so nothing is asked and
            # nothing typed reaches the wire (lab policy: no public source describes the dialog).
            return Attempt(protseq, False, None, profile.logged_on, "rpc_bind", "kerberos")
        # Password Authentication, or Negotiate without a ticket: NTLM with what was typed.
        return Attempt(protseq, shown, None, typed, "rpc_bind")
    raise ValueError(f"{protseq} is not served by this emulator")
