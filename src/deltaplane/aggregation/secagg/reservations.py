"""Who reserved a run of device ids in an enrollment folder, and whether that run can still be alive.

``fleet enroll`` reserves its ids (``enrollment.reserved``) while the service issues their tokens outside the
folder's lock; a run killed then leaves them reserved. Each line names the run that made it::

    device-5..device-9 pid=4242 host=ops-1 boot=6f1c…-… pidns=4026531836 start=918273 at=1765000000

(its process id, host, the kernel's boot id, its pid namespace, its start time in clock ticks since boot as
``/proc/PID/stat`` gives it, and when it reserved), so ``fleet enroll --recover`` can tell a dead run's
reservation from a live one's (:func:`run_state`). A line of an earlier release (the range alone) names no
run: it reads, and is never taken for dead. Fields this release does not know are ignored, so a later one may
add some.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass

from deltaplane.processes import boot_id, pid_namespace, process_state, start_ticks

__all__ = ["Owner", "Reservation", "format_line", "parse_fields", "run_state", "this_run"]

#: a field's value as written: no space, no '=' (hostnames outside it are written with '_' in its place)
_VALUE = re.compile(r"[A-Za-z0-9._:-]{1,253}")


@dataclass(frozen=True)
class Owner:
    """The process that reserved a run of ids: enough to tell later whether it still runs (:func:`run_state`).

    ``boot``, ``pidns`` and ``start`` are None where the system does not tell them (no ``/proc``)."""

    pid: int
    host: str
    boot: str | None
    pidns: str | None
    start: int | None
    at: int

    def describe(self) -> str:
        """The owner as the operator reads it: ``pid 4242 on ops-1, reserved 2026-12-07 07:31 UTC``."""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.at))
        return f"pid {self.pid} on {self.host}, reserved {when}"


@dataclass(frozen=True)
class Reservation:
    """Ids ``first`` … ``last`` (both included) reserved by ``owner`` (None: a line of an earlier release)."""

    first: int
    last: int
    owner: Owner | None

    @property
    def span(self) -> str:
        """Its ids as the file, the command and ``--abandoned`` write them: ``device-5..device-9``."""
        return f"device-{self.first}" + ("" if self.first == self.last else f"..device-{self.last}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "_", socket.gethostname())[:253] or "_"


def _boot() -> str | None:
    boot = boot_id()
    return boot if boot is not None and _VALUE.fullmatch(boot) else None


def this_run() -> Owner:
    """The running process as a reservation's owner."""
    pid = os.getpid()
    return Owner(pid, _host(), _boot(), pid_namespace(), start_ticks(pid), int(time.time()))


def format_line(r: Reservation) -> str:
    """``r`` as a line of the reservations file (with its newline)."""
    o = r.owner
    if o is None:
        return r.span + "\n"
    fields = {"pid": o.pid, "host": o.host, "boot": o.boot, "pidns": o.pidns, "start": o.start, "at": o.at}
    return r.span + "".join(f" {k}={v}" for k, v in fields.items() if v is not None) + "\n"


def parse_fields(text: str) -> Owner | None:
    """The owner the fields after a line's range name (``" pid=… host=…"``), None for none (an earlier
    release's line); a :class:`ValueError` for fields that are not ``key=value`` or lack ``pid``, ``host`` or
    ``at``."""
    if not text:
        return None
    fields: dict[str, str] = {}
    for item in text.split(" ")[1:] if text.startswith(" ") else [text]:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[a-z]{1,16}", key) or not _VALUE.fullmatch(value):
            raise ValueError(item)
        fields[key] = value
    try:
        return Owner(
            pid=int(fields["pid"]),
            host=fields["host"],
            boot=fields.get("boot"),
            pidns=fields.get("pidns"),
            start=int(fields["start"]) if "start" in fields else None,
            at=int(fields["at"]),
        )
    except (KeyError, ValueError):
        raise ValueError(text) from None


def run_state(owner: Owner | None) -> tuple[str, str]:
    """Whether the run ``owner`` names is ``"dead"`` (provably: this host, and it rebooted since, or the pid has
    ended, or the pid is another process now, started at another time), ``"live"`` (that very process still
    runs) or ``"unknown"`` (another host or pid namespace, an earlier release's line, or a system that does not
    tell); with the reason, for the operator."""
    if owner is None:
        return "unknown", "an earlier release's reservation, which names no run"
    if owner.host != _host():
        return "unknown", f"reserved on host {owner.host}, not this one ({_host()})"
    boot = _boot()
    if owner.boot is not None and boot is not None and owner.boot != boot:
        return "dead", f"{owner.describe()}: this host has restarted since"
    if owner.pidns is not None and owner.pidns != pid_namespace():
        return "unknown", f"{owner.describe()}, in another pid namespace (container) than this one"
    # a start time means something within one boot only (a line without a boot id is taken as this boot's)
    start = owner.start if owner.boot is None or owner.boot == boot else None
    state, why = process_state(owner.pid, start)
    if state == "gone":
        return "dead", f"{owner.describe()}: {why}"
    if state == "running":
        return "live", f"{owner.describe()}: that run is still going"
    return "unknown", f"{owner.describe()}: {why}, so this system cannot tell if it is that run"
