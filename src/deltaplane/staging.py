"""Hidden staging beside an output, named after its owner, so staging left by a dead process can be removed.

Every command that writes an output builds it in a hidden sibling (a folder, or a ``.NAME.….tmp`` file) and
renames it into place at the end; an error, Ctrl-C or SIGTERM removes the stage (:mod:`deltaplane.signals`). A
process that cannot clean up — SIGKILL, the OOM killer, a power cut — leaves it behind, and nothing else would
ever remove it. So a stage's name says who made it::

    .OUT.dp1-<place>-<boot>-<pid>-<start>.<random>        (a file stage ends in .tmp; an aside, old-dp1-…)

``place`` is a hash of the host name, ``/etc/machine-id`` and the PID namespace (the space a pid is meaningful
in), ``boot`` a hash of the kernel's boot id, ``start`` the process's start time in clock ticks since boot
(``/proc/PID/stat`` field 22). The name is made with the stage in one ``mkdtemp``/``mkstemp``, so there is no
moment when a stage exists without its owner's name (a marker file written inside would have one, and would
have to be taken out before the stage becomes the output).

:func:`sweep` (run by each stage maker before it makes a new stage for the same output) removes a stage only when
its owner is certainly gone: same place, and an earlier boot, or no process with that pid, or one started at
another time (the pid was reused), or a zombie. A stage made elsewhere (another host or container on a shared
file system), or whose owner cannot be checked (no ``/proc``, a pid hidden from us), is left, with a
``warning`` saying so, as is a stage named the old way (by a deltaplane before this, or by another program). A
live writer's stage is never touched, concurrent runs included. An *aside* folder holds the output being
replaced during the swap; it is removed only when the output exists again (else it holds the only copy, and the
warning says how to move it back).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from deltaplane.processes import place_and_boot, process_state, start_ticks

__all__ = ["stage_dir", "stage_file", "sweep"]

_VERSION = "dp1"
_NAME_MAX = 255
_OURS = re.compile(
    rf"(?P<aside>old-)?{_VERSION}-(?P<place>[0-9a-f]{{8}})-(?P<boot>[0-9a-f]{{8}})-(?P<pid>\d+)-(?P<start>\d+)"
    r"\.[a-z0-9_]{8}(?:\.tmp)?"
)
#: how a stage was named before owners were recorded (mkdtemp/mkstemp's eight random characters)
_LEGACY = re.compile(r"(?:tmp-|old-)?[a-z0-9_]{8}(?:\.tmp)?")


def _me() -> tuple[str, str, int, int]:
    """This process's (place, boot, pid, start), as a stage name records them."""
    return _owner(os.getpid())  # keyed by pid: a forked child names its stages after itself, not its parent


@functools.cache
def _owner(pid: int) -> tuple[str, str, int, int]:
    place, boot = place_and_boot()
    return place, boot, pid, start_ticks(pid) or 0


def _prefix(target: Path, aside: bool) -> str:
    place, boot, pid, start = _me()
    owner = f"{'old-' if aside else ''}{_VERSION}-{place}-{boot}-{pid}-{start}."
    name = f".{target.name}."
    if len(name) + len(owner) + 8 + len(".tmp") > _NAME_MAX:
        # too long to carry the owner: a name sweep() never matches (so never removes), as before this module
        name = f".{target.name[: _NAME_MAX - len(owner) - 16]}~."
    return name + owner


def stage_dir(target: str | os.PathLike[str], *, aside: bool = False) -> Path:
    """A new empty hidden folder beside ``target`` (same file system, so it can be renamed into place), named
    after this process; mode 0700 as ``mkdtemp`` makes it. ``aside``: the folder an existing output is moved
    into while the new one takes its place.

    Call :func:`sweep` first (the makers of outputs do) so staging of dead writers does not pile up.
    """
    t = Path(target)
    return Path(tempfile.mkdtemp(prefix=_prefix(t, aside), dir=t.parent))


def stage_file(target: str | os.PathLike[str]) -> tuple[int, Path]:
    """A new hidden file beside ``target`` named after this process (``mkstemp``: an open descriptor, mode
    0600), for writing ``target`` whole and renaming it into place."""
    t = Path(target)
    fd, name = tempfile.mkstemp(prefix=_prefix(t, False), suffix=".tmp", dir=t.parent)
    return fd, Path(name)


def _owner_gone(place: str, boot: str, pid: int, start: int) -> bool | str:
    """True if the stage's owner is certainly not running; False if it is; else why we cannot tell."""
    my_place, my_boot, _, _ = _me()
    if place != my_place:
        return "made on another host or in another container (its process cannot be checked from here)"
    if boot != my_boot:
        return True if my_boot != "0" * 8 else "its process cannot be checked without /proc"
    state, why = process_state(pid, start or None)  # 0: its maker could not read its own start time
    return True if state == "gone" else False if state == "running" else why


def sweep(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the stages beside ``target`` whose owner is certainly gone (see the module docstring); returns
    them. What is left unsure is named in one ``warning`` each; nothing here raises (a stage that cannot be
    removed is a warning too), so a sweep never stops the command that runs it."""
    t = Path(target)
    head = f".{t.name}."
    try:
        entries = [e for e in os.scandir(t.parent) if e.name.startswith(head)]
    except OSError:
        return []
    removed = []
    for e in entries:
        rest, path = e.name[len(head) :], Path(e.path)
        try:
            if e.is_symlink() or not (e.is_dir() or e.is_file()):
                continue
            uid = e.stat(follow_symlinks=False).st_uid
        except OSError:  # gone meanwhile (its writer renamed it into place, or another sweep removed it)
            continue
        m = _OURS.fullmatch(rest)
        if m is not None and hasattr(os, "getuid") and uid != os.getuid():
            # another user's process may be hidden from us (/proc with hidepid): not ours to judge
            warnings.warn(f"left {path}: staging of '{t.name}' made by another user", stacklevel=2)
            continue
        if m is None:
            if _LEGACY.fullmatch(rest):
                warnings.warn(
                    f"left {path}: staging of '{t.name}' with no owner recorded (from an older deltaplane, or "
                    "another program); remove it if nothing is writing there",
                    stacklevel=2,
                )
            continue
        gone = _owner_gone(m["place"], m["boot"], int(m["pid"]), int(m["start"]))
        if gone is False:
            continue
        if gone is not True:
            warnings.warn(
                f"left {path}: staging of '{t.name}' by process {m['pid']}, {gone}; remove it if that run is over",
                stacklevel=2,
            )
            continue
        if m["aside"] and not os.path.lexists(t):
            warnings.warn(
                f"left {path}: it holds the previous '{t.name}', moved aside by a run that was killed before "
                f"the new one took its place; move it back with: mv {path / 'x'} {t}",
                stacklevel=2,
            )
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another sweep took it first
            continue
        except OSError as exc:
            warnings.warn(f"could not remove {path}, staging left by a killed run: {exc}", stacklevel=2)
            continue
        removed.append(path)
    return removed
