"""What the user sees. The ecLoginPerm text is quoted from KB Q146188."""

from __future__ import annotations

from ..directory import EC_LOGIN_FAILURE, EC_LOGIN_PERM, EC_NOT_ENCRYPTED, EC_SUCCESS, EC_UNKNOWN_USER

LOGIN_PERM = "The set of folders could not be opened. You do not have permission to log on."
LOGON_FAILED = ("The set of folders could not be opened. The logon to the Microsoft Exchange Server "
                "computer failed.")
UNKNOWN_USER = ("The set of folders could not be opened. The name could not be matched to a name in "
                "the address list.")
NOT_ENCRYPTED = ("The set of folders could not be opened. The Microsoft Exchange Server computer "
                 "requires encrypted connections.")
UNREACHABLE = ("The set of folders could not be opened. The Microsoft Exchange Server computer is not "
               "available. Either there are network problems or the Microsoft Exchange Server "
               "computer is down for maintenance.")
PROMPT = "Enter Password: User name, Domain name, Password (Windows NT credentials)"


def for_status(status: int | None) -> str | None:
    if status == EC_SUCCESS:
        return None
    if status == EC_LOGIN_PERM:
        return LOGIN_PERM
    if status == EC_UNKNOWN_USER:
        return UNKNOWN_USER
    if status == EC_NOT_ENCRYPTED:
        return NOT_ENCRYPTED
    if status == EC_LOGIN_FAILURE or status is None:
        return LOGON_FAILED
    return f"The set of folders could not be opened. (MAPI error 0x{status:08x})"
