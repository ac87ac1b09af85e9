"""Server cost from /proc: CPU and memory of a process and all its descendants.

CPU is utime+stime+cutime+cstime (proc(5), fields 14-17) summed over the tree, so work
done by children that were already reaped (smbd forks one child per connection) is
still counted in the parent's cutime/cstime. Sampling before and after a workload and
dividing by completed logons gives server CPU per logon.
"""

from __future__ import annotations

import os

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields start after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(pid: int) -> list[int]:
    """pid and every live descendant."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo and len(out) < 100_000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of pid's whole tree, in seconds."""
    ticks = 0
    for p in tree(pid):
        f = _stat_fields(p)
        if f is None:
            continue
        # after 'comm': state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of pid's whole tree (sum of each process's RSS)."""
    total = 0
    for p in tree(pid):
        f = _stat_fields(p)
        if f is not None:
            total += int(f[21]) * PAGE
    return total


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a single process (its high-water RSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
