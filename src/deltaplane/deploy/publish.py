"""Publishing a deploy's output folder all at once: ``OUT`` is always the old complete deploy or the new one.

Every deploy (:func:`~deltaplane.deploy.pipeline.deploy_classifier`,
:func:`~deltaplane.deploy.tokens.deploy_token_model`, :func:`~deltaplane.deploy.onnx_input.deploy_onnx_model`)
checks ``OUT`` before any work (:func:`check_out_dir`), builds its whole output in a hidden sibling folder
(:func:`staging_dir`) and swaps that folder in with one rename (:func:`publish_dir`). Moving files one by one
would leave a mix of old and new files on a failure half way, and files of an earlier deploy that this one does
not write (an old ``model.onnx`` beside a ``--format weights`` manifest) would survive next to the new manifest.

The manifest records the SHA-256 of every model file, so a manifest and the artifact it describes can be matched.
A deploy passes :func:`publish_dir` the SHA-256 of the bytes it evaluated: a staged model file that differs from
them (changed or swapped after the gates ran) is refused, so the recorded hashes and numbers are the shipped file's.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError, ExportError
from deltaplane.shards import file_sha256
from deltaplane.staging import stage_dir, sweep
from deltaplane.textfile import _UMASK

__all__ = [
    "DEPLOY_FILES",
    "bytes_sha256",
    "check_out_dir",
    "check_writable_dir",
    "file_sha256",
    "is_deploy_output",
    "manifest_json",
    "publish_dir",
    "replace_dir",
    "staging_dir",
]

#: the files a deploy writes; a folder holding only these (and a manifest) is a previous deploy's output
DEPLOY_FILES = frozenset({"model.dpla", "model.onnx", "manifest.json", "MODEL_CARD.md"})
#: the model files whose SHA-256 the manifest records (the card and the manifest describe them)
MODEL_FILES = ("model.dpla", "model.onnx")


def is_deploy_output(folder: Path) -> bool:
    """Whether ``folder`` holds exactly what a deploy writes: a ``manifest.json`` and otherwise only deploy files.

    Such a folder is replaced by the next deploy into it without ``overwrite``; anything else in it (a user's
    file, a sub-folder) means it is not ours to replace silently.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = {p.name for p in entries}
    return (
        "manifest.json" in names
        and names <= DEPLOY_FILES
        and all(p.is_file() and not p.is_symlink() for p in entries)
    )


def _target(out_dir: Path) -> Path:
    # a symlinked OUT is published into the folder it points at, so the link itself stays as the user made it
    return Path(os.path.realpath(out_dir)) if out_dir.is_symlink() else out_dir


def check_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse an output folder the deploy could not or should not replace, before any work runs.

    Accepted: a path that does not exist yet (under a folder that exists or can be created), an empty folder, a
    previous deploy's output (:func:`is_deploy_output`), or with ``overwrite`` any folder. A file, a path under
    a file, and a non-empty folder that is not a deploy output (without ``overwrite``) raise
    :class:`~deltaplane.errors.ConfigError` saying what to change.
    """
    out = Path(out_dir)
    target = check_writable_dir(out, hint="pass -o a folder path (new or a deploy's)")
    if target.is_dir() and not overwrite and any(target.iterdir()) and not is_deploy_output(target):
        raise ConfigError(
            f"output folder '{out}' already holds files that are not a deploy's output "
            f"({', '.join(sorted(p.name for p in target.iterdir())[:5])}); pass --overwrite (overwrite=True "
            "from Python) to replace it, or choose another folder"
        )
    return out


def check_writable_dir(out_dir: str | os.PathLike[str], *, hint: str = "give a folder path") -> Path:
    """The folder a command will create or replace for ``out_dir`` (a symlink: the folder it points at), or
    :class:`~deltaplane.errors.ConfigError` if it cannot: a file (``hint`` says what to pass instead), a path
    under a file, or a folder without write permission. What is in the folder is the caller's to judge."""
    out = Path(out_dir)
    target = _target(out)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output '{out}' is a file, not a folder; {hint}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output '{out}' cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output '{out}' cannot be written: no write permission in {parent}")
    return target


def staging_dir(out_dir: str | os.PathLike[str]) -> Path:
    """A new hidden folder beside ``out_dir`` (same file system, so it can be renamed into place), named after
    this process; staging beside it left by a killed run is removed first (:mod:`deltaplane.staging`)."""
    target = _target(Path(out_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = stage_dir(target)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; the published folder gets a plain mkdir's mode
    return tmp


def bytes_sha256(data: bytes) -> str:
    """SHA-256 of bytes in memory (what a deploy evaluated), comparable with :func:`file_sha256`."""
    return hashlib.sha256(data).hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc older than glibc 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(
    tmp: Path,
    out_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    render_card: Callable[[dict[str, Any]], str],
    *,
    overwrite: bool = False,
    evaluated: Mapping[str, str] | None = None,
) -> list[str]:
    """Record the model files' SHA-256 in ``manifest``, write it and its card (``render_card(manifest)``) into
    ``tmp``, and make ``tmp`` the new ``out_dir`` in one rename. Returns the file names published.

    ``evaluated``: the SHA-256 of every model file (:data:`MODEL_FILES`) as the deploy read it back and measured
    it. A staged model file whose bytes differ, or one not among them, raises
    :class:`~deltaplane.errors.ExportError` and nothing is published: the manifest's numbers and gates describe
    the bytes that were evaluated, and a file changed or swapped in after the gates ran would ship under them.

    ``out_dir`` is checked again (:func:`check_out_dir`: it may have changed while the deploy ran). An existing
    folder is exchanged with ``tmp`` atomically where the OS can (Linux); elsewhere it is moved aside first, so for
    an instant ``out_dir`` is absent (never half old, half new). The old output is then deleted.
    """
    out = check_out_dir(out_dir, overwrite=overwrite)
    target = _target(out)
    staged = {n: file_sha256(tmp / n) for n in MODEL_FILES if (tmp / n).is_file()}
    if evaluated is not None:
        changed = sorted(n for n in staged.keys() | evaluated.keys() if staged.get(n) != evaluated.get(n))
        if changed:
            raise ExportError(
                f"refusing to publish: the staged {', '.join(changed)} no longer hold(s) the bytes that were "
                "evaluated (changed, swapped in or removed after the quality gates ran); nothing was published "
                "— deploy again, and let nothing else write into the deploy's staging folder"
            )
    manifest["sha256"] = staged
    (tmp / "manifest.json").write_text(manifest_json(manifest))
    (tmp / "MODEL_CARD.md").write_text(render_card(manifest))
    files = sorted(p.name for p in tmp.iterdir())
    try:
        replace_dir(tmp, target)
    except OSError as e:
        raise ConfigError(f"could not publish into '{out}': {e}; nothing was changed there") from e
    return files


def replace_dir(tmp: Path, target: Path) -> None:
    """Make the folder ``tmp`` the folder ``target`` (a sibling) and delete what ``target`` held.

    An existing ``target`` is exchanged with ``tmp`` atomically where the OS can (Linux); elsewhere it is moved
    aside first, so for an instant ``target`` is absent (never half old, half new).

    Raises:
        OSError: the rename failed; ``target`` is then as it was.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = stage_dir(target, aside=True)
    os.rename(target, old / "x")
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old / "x", target)  # put the old output back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _non_finite_key(obj: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN/Inf float in a JSON-like ``obj``, or ``None``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for k, v in items:
        found = _non_finite_key(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def manifest_json(manifest: dict[str, Any]) -> str:
    """The manifest as strict JSON (``allow_nan=False``: ``NaN`` is not JSON, and a NaN metric means a broken
    measurement, never a number to ship); :class:`~deltaplane.errors.ExportError` names the key if one is."""
    bad = _non_finite_key(manifest)
    if bad is not None:
        raise ExportError(f"manifest value {bad} is NaN or Inf; refusing to publish a non-finite metric")
    return json.dumps(manifest, indent=2, allow_nan=False) + "\n"
