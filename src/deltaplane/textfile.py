"""Reading a user- or disk-supplied file whole, bounded: :func:`read_bounded_text` (and its bytes,
:func:`read_bounded_bytes`); writing a secret (a key, a token) with :func:`write_secret_file`.

A config, manifest or settings file is read into memory in one piece and parsed; a path that names a multi-GiB
file, ``/dev/zero`` or a FIFO nobody writes to would exhaust memory or hang the reader. Every such file goes
through this one function: it opens without blocking (``O_NONBLOCK``: a FIFO with no writer opens at once
instead of waiting), checks with ``fstat`` on the open descriptor (no race with a rename) that it is a regular
file, and reads at most ``limit`` bytes, refusing a larger file with the limit named. Each kind of file has its
own limit below, far above any real one.

A file that one command reads, changes and writes back (a revocation list) is changed under
:func:`exclusive_lock`, so two runs of the command cannot both build on the same old contents.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

from deltaplane.errors import ConfigError, DeltaplaneError
from deltaplane.staging import stage_file, sweep

__all__ = [
    "CONFIG_LIMIT",
    "KEY_LIMIT",
    "MANIFEST_LIMIT",
    "REPORT_LIMIT",
    "SETTINGS_LIMIT",
    "TOKENIZER_LIMIT",
    "atomic_write_bytes",
    "exclusive_lock",
    "read_bounded_bytes",
    "read_bounded_text",
    "read_config_text",
    "require_regular_file",
    "safetensors_path",
    "write_secret_file",
]

MIB = 1 << 20
#: YAML run and merge configs (a merge config with per-layer parameters is kilobytes)
CONFIG_LIMIT = 16 * MIB
#: tokenizer files (tokenizer.json of a 250k-token vocabulary with merges is ~20 MB)
TOKENIZER_LIMIT = 64 * MIB
#: bundle manifests, model configs and shard indexes (an index of a 1000-shard model is a few MB)
MANIFEST_LIMIT = 16 * MIB
#: a run's report.json (every round of every run; tens of MB for long sweeps)
REPORT_LIMIT = 256 * MIB
#: a registry's settings file (a handful of keys)
SETTINGS_LIMIT = 1 * MIB
#: key, certificate, trusted-key and token files (a PEM key or a list of public keys is kilobytes)
KEY_LIMIT = 1 * MIB


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n:,} bytes"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def require_regular_file(
    path: str | os.PathLike[str], *, what: str, error: type[DeltaplaneError] = ConfigError
) -> Path:
    """``path`` if it names a regular file (after symlinks); ``error`` naming what it is otherwise.

    For files another library opens itself (safetensors memory-maps them, numpy and OpenSSL read them): a FIFO
    with no writer would block that open for good, so it is refused first, with the file's kind named.

    Raises:
        error: the path does not exist, or is a directory, FIFO, device or socket.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{p}: a {what} must be a regular file, not a {_kind(mode)}; give the file's path")
    return p


def safetensors_path(path: str | os.PathLike[str], *, what: str) -> str:
    """``path`` as the text the safetensors library opens, refusing a name that is not UTF-8.

    The library takes its path as UTF-8 text only; a file or folder named in another encoding (Linux allows
    any bytes) would come back as its "Path ... is not valid UTF-8", which reads like a corrupt file.

    Raises:
        ConfigError: the path is not UTF-8, saying to rename it.
    """
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{os.fsdecode(path)!r}: the safetensors library cannot open a {what} whose path is not UTF-8; "
            "rename the file (or a folder above it) to a UTF-8 name"
        ) from None
    return os.fsdecode(path)


@overload
def read_bounded_bytes(
    path: str | os.PathLike[str],
    *,
    limit: int,
    what: str,
    error: type[DeltaplaneError] = ...,
    missing_ok: Literal[False] = ...,
) -> bytes: ...


@overload
def read_bounded_bytes(
    path: str | os.PathLike[str],
    *,
    limit: int,
    what: str,
    error: type[DeltaplaneError] = ...,
    missing_ok: Literal[True],
) -> bytes | None: ...


def read_bounded_bytes(
    path: str | os.PathLike[str],
    *,
    limit: int,
    what: str,
    error: type[DeltaplaneError] = ConfigError,
    missing_ok: bool = False,
) -> bytes | None:
    """The bytes of the regular file ``path``, refusing anything larger than ``limit`` bytes.

    Args:
        path: the file.
        limit: the most bytes accepted (one of this module's ``*_LIMIT`` constants).
        what: what the file is, for messages ("run config", "tokenizer file").
        error: the :class:`~deltaplane.errors.DeltaplaneError` subclass raised (default
            :class:`~deltaplane.errors.ConfigError`).
        missing_ok: return None when the file does not exist (a file another process may delete meanwhile)
            instead of raising ``error``.

    Raises:
        error: the file cannot be opened, is not a regular file (a FIFO, a device, a directory) or is larger
            than ``limit``; the message names the file and what to do.
    """
    p = Path(path)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(p, flags)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{p}: a {what} must be a regular file, not a {_kind(st.st_mode)}; give the file's path"
            )
        if st.st_size > limit:
            raise error(
                f"{p}: {what} is {st.st_size:,} bytes, over the {_size(limit)} limit for a {what}; "
                "check that this is the right file"
            )
        chunks, got = [], 0
        while got <= limit:  # the size may have grown since fstat: read at most one byte past the limit
            chunk = os.read(fd, min(limit + 1 - got, MIB))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if got > limit:
        raise error(f"{p}: {what} grew past the {_size(limit)} limit for a {what} while being read")
    return b"".join(chunks)


def read_bounded_text(
    path: str | os.PathLike[str],
    *,
    limit: int,
    what: str,
    error: type[DeltaplaneError] = ConfigError,
) -> str:
    """The UTF-8 text of the regular file ``path``, refusing anything larger than ``limit`` bytes: the arguments
    and refusals of :func:`read_bounded_bytes` ("run config", "bundle manifest" for ``what``), and ``error``
    also when the file is not UTF-8, naming the byte."""
    data = read_bounded_bytes(path, limit=limit, what=what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{Path(path)}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def read_config_text(path: str | os.PathLike[str], *, what: str = "config file") -> str:
    """The text of a YAML config file, at most :data:`CONFIG_LIMIT` (16 MiB); see :func:`read_bounded_text`."""
    return read_bounded_text(path, limit=CONFIG_LIMIT, what=what)


#: link(2)'s errors on a filesystem without hard links (vfat, exFAT, some FUSE and SMB mounts)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _appeared(path: Path) -> ConfigError:
    """The refusal of a no-overwrite write whose target exists: another run wrote it after the caller checked."""
    return ConfigError(f"{path} already exists (it appeared while this command ran); left as it is")


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (0600 from its creation, ``O_EXCL``: never over an existing file, ``FileExistsError``)
    holding ``data``, fsynced; a failed write removes the file it created. :func:`write_secret_file`'s temp
    file, and its no-overwrite write where hard links are refused (a reader may then see it part-written for a
    moment, never an existing file replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_secret_file(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> None:
    """Write a secret atomically with mode 0600 *from its creation* (never briefly world-readable).

    The temp file is created with ``O_EXCL`` and mode 0600 in the target folder, fsynced, then renamed over
    ``path``; the folder is fsynced so the rename survives a crash. With ``replace=False`` it is hard-linked to
    ``path`` instead, which fails if ``path`` exists, so a file that appeared after the caller checked (another
    run of the command writing the same key) is never written over: a :class:`ConfigError` naming it, and
    nothing written. Where the filesystem refuses hard links, the file is created in place with ``O_EXCL``
    instead (:func:`_write_new_file`): as safe against overwriting, though not atomic for a reader.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_new_file(tmp, data)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            # link(2) refuses an existing target atomically, where an existence check then a rename would not
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _appeared(path) from None
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                try:
                    _write_new_file(path, data)
                except FileExistsError:
                    raise _appeared(path) from None
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created, mode 0600, never removed), waiting for it.

    For a read-modify-write of a file beside it: every writer takes the lock around its whole read, change and
    write, so the second of two concurrent writers reads what the first wrote. ``flock`` belongs to the open file
    description, so it excludes threads of one process as well as other processes, and the kernel releases it when
    the process dies (a killed writer blocks nobody). The lock file stays: removing it would let a waiter lock
    the removed file while a newcomer locks a new one. (The service's registry lock,
    :mod:`deltaplane.serve.registry_lock`, is another kind: held by a process for its life and refused, not
    waited for, when taken by another.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once at import, not while other threads create files
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)  # a temp file left by a killed writer of the same file
    fd, tmp = stage_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 less the umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
