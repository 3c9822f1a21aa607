"""Whether a process named by its pid and start time still runs on this host: the one check behind removing a
killed command's staging (:mod:`deltaplane.staging`) and taking back a killed ``fleet enroll``'s reserved ids
(:mod:`deltaplane.aggregation.secagg.reservations`).

A pid alone does not name a process: the kernel reuses pids. A pid with its start time (clock ticks since boot,
``/proc/PID/stat`` field 22) does, within one boot of one host's pid namespace, so a record of a process keeps
all four (the host and namespace are the caller's to compare; :func:`boot_id` and :func:`pid_namespace` read
them here). Where the system does not tell (no ``/proc``, a process hidden from this user), the answer is
"unknown", never "gone": both callers then leave what the process made, and say why.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from typing import Literal

__all__ = ["State", "boot_id", "pid_namespace", "place_and_boot", "proc_stat", "process_state", "start_ticks"]

#: ``gone``: certainly not running (no such pid, a zombie, or the pid is another process now); ``running``: that
#: very process runs; ``unknown``: this system cannot tell
State = Literal["gone", "running", "unknown"]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096).strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """The kernel's boot id (a new one at every boot), None where the system does not give it."""
    return _read("/proc/sys/kernel/random/boot_id") or None


def place_and_boot() -> tuple[str, str]:
    """Where a pid means this process: a short hash of this host's name, machine id and pid namespace (two
    machines or containers that share a host name still differ), and one of its boot id (``"0" * 8`` where the
    system does not give one). A record of a process keeps both beside its pid and start time."""

    def short(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]

    place = short(socket.gethostname(), _read("/etc/machine-id") or "", pid_namespace() or "")
    boot = boot_id()
    return place, short(boot) if boot else "0" * 8


def pid_namespace() -> str | None:
    """This process's pid namespace (the space its pids mean something in: a container has its own), as the
    digits of ``/proc/self/ns/pid``'s inode; None where the system does not tell."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or None
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of process ``pid`` from ``/proc``; None if there is
    no such process.

    Raises:
        PermissionError: the process is hidden from this user (``/proc`` mounted with ``hidepid``).
        OSError: no ``/proc`` to read.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        if not os.path.isdir("/proc/self"):
            raise OSError("no /proc on this system") from None
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in (…) may hold spaces and parentheses
    return fields[0], int(fields[19])


def start_ticks(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks since boot), None if there is none or the system does not tell."""
    try:
        stat = proc_stat(pid)
    except OSError:
        return None
    return None if stat is None else stat[1]


def process_state(pid: int, start: int | None) -> tuple[State, str]:
    """Whether process ``pid``, started at ``start`` (None: not recorded), still runs in this boot of this pid
    namespace (the caller has compared host, namespace and boot), with the reason when it cannot tell."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        try:
            stat = proc_stat(pid)
        except OSError:
            return "unknown", f"process {pid} cannot be checked (hidden from this user)"
        if stat is None or stat[0] in ("Z", "X"):
            return "gone", "that process has ended"
        if start is None:
            return "unknown", f"process {pid} runs, and its start time was not recorded"
        if stat[1] != start:
            return "gone", f"that process has ended (pid {pid} is another one now)"
        return "running", f"process {pid} still runs"
    if os.name != "posix":
        return "unknown", "its process cannot be checked on this system"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone", "that process has ended"
    except OSError:
        pass  # it exists, another user's
    return "unknown", f"process {pid} is running and may be a reused pid (no /proc to check its start time)"
