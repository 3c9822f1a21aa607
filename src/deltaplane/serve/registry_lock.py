"""One service process per registry: ``<home>/service.lock``, held for as long as the process lives.

The service keeps each open round's state in its memory: a plain round's running aggregate, a SecAgg round's
keys, shares and masked inputs. A second service process on the same registry would not see them, and its own
start would do harm at once: it records every SecAgg round open in the database as ``lost`` (a restart's
rule: their state died with the process) and replays the plain rounds' uploads into an aggregate of its own,
so each process would close rounds the other is still running. :func:`hold_service_lock` refuses that start.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<home>/service.lock``: the kernel releases it when the
process dies, however it dies, so a killed service never blocks its restart; and it belongs to the process, so
several apps over one registry inside one process (a restart simulated in a test, ``deltaplane run
--transport http``) do not refuse each other. It is held while an app over that registry lives in the process
(the one descriptor is kept open: closing any descriptor of the file would drop the lock). The dashboard (``deltaplane ui``)
and the registry commands take no such lock: they read, or write through the registry's own transactions.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import weakref
from pathlib import Path

from deltaplane.errors import ConfigError, RegistryInUse

__all__ = ["LOCK_NAME", "ServiceLock", "hold_service_lock"]

LOCK_NAME = "service.lock"

#: (device, inode) of each lock file this process holds -> [its open descriptor, how many apps hold it]
_HELD: dict[tuple[int, int], list[int]] = {}
_GUARD = threading.Lock()
#: owners gone whose release is not applied yet (see :func:`_release`)
_PENDING: list[tuple[int, int]] = []


class ServiceLock:
    """A hold on a registry's service lock (:func:`hold_service_lock`): the lock is held while this object
    lives; keep it with the service's app."""

    __slots__ = ("__weakref__",)


def hold_service_lock(home: str | os.PathLike[str]) -> ServiceLock:
    """Hold the service lock of the registry at ``home``; returns the hold, which keeps it while it lives.

    Several holds in one process share the lock; it is released when the last of them is garbage-collected
    (or the process ends), so a process that built many apps over many registries keeps no descriptor open
    for those it dropped.

    Raises:
        RegistryInUse: another process serves this registry; names its pid (``deltaplane serve`` exits 1).
        ConfigError: the lock file cannot be created or locked (a read-only registry cannot be served).
    """
    path = Path(home) / LOCK_NAME
    with _GUARD:
        _drain()
        key = _held_key(path)
        if key is None:
            key = _acquire(path, home)
        _HELD[key][1] += 1
        _drain()
    hold = ServiceLock()
    weakref.finalize(hold, _release, key)
    return hold


def _held_key(path: Path) -> tuple[int, int] | None:
    """The key of ``path`` if this process holds its lock (without opening it: closing a second descriptor of
    the file would release the lock)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    return key if key in _HELD else None


def _acquire(path: Path, home: str | os.PathLike[str]) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot create {path} ({exc.strerror or exc}): the service locks the registry it serves, so it "
            "needs a registry folder it can write"
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"cannot lock {path} ({exc.strerror or exc})") from None
        raise RegistryInUse(
            f"another process (pid {holder or 'unknown'}) already serves the registry at {Path(home)}: one "
            "service process per registry, since each open round lives in its memory (a second one would "
            "mark that process's SecAgg rounds lost and close its plain rounds on its own). Stop that "
            "service first, or serve another --home"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    _HELD[key] = [fd, 0]
    return key


def _release(key: tuple[int, int]) -> None:
    """One owner of ``key`` is gone (a finalizer: it may run inside a garbage collection triggered while this
    thread holds the guard, so it never waits for the guard; a release it cannot make now waits for the next
    call here or to :func:`hold_service_lock`, keeping the lock a little longer, never dropping it early)."""
    _PENDING.append(key)
    if _GUARD.acquire(blocking=False):
        try:
            _drain()
        finally:
            _GUARD.release()


def _drain() -> None:
    """Apply the pending releases (the guard held): the last owner of a lock closes its descriptor, which
    releases the lock."""
    while _PENDING:
        key = _PENDING.pop()
        held = _HELD.get(key)
        if held is None:
            continue
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[key]
            os.close(held[0])
