"""Strict reading of a sharded safetensors checkpoint: ``model.safetensors.index.json`` + the shards it names.

``deltaplane merge --max-shard-size`` (like mergekit and Hugging Face ``save_pretrained``) writes a folder of
``model-0000i-of-0000n.safetensors`` shards and an index whose ``weight_map`` maps each tensor name to the shard
holding it. ``deploy`` and ``registry register`` read such a folder through :func:`load_sharded`, so an index is
checked the same way wherever it is read. An index is a file a stranger may hand over, so it is trusted for
nothing: it is at most :data:`INDEX_LIMIT` bytes; every shard it names is a bare ``.safetensors`` file name in the
folder (no ``..``, no ``/``, no absolute path, no symlink leading out); every named shard exists; every tensor it
lists is in the shard it names; and a shard holding a tensor the index does not assign to it (a tensor duplicated
across shards, or one the index forgot) is refused rather than silently dropped or overwritten. Shards are read
with ``safetensors`` only (never pickle), one at a time, so memory is the state dict plus one shard's read;
:func:`shard_shapes` makes the same checks on the shards' headers alone, for ``deploy``, which copies the
weights into the model it built shard by shard. Which of a folder's ``model.safetensors`` and its index is
read is chosen by :func:`folder_weights`, the same way for every reader (merging's included); a folder holding
both, the index not naming that file, is refused as ambiguous.

The files a checkpoint folder holds besides its weights and ``config.json`` — the tokenizer's, the generation
config — are read by :func:`read_companion_files` under the same distrust: only the names in
:data:`COMPANION_FILES` (fixed names, so nothing is read from outside the folder by name), regular files only, no
symlink leading out, each at most :data:`~deltaplane.textfile.TOKENIZER_LIMIT` bytes and all together at most
:data:`COMPANION_LIMIT`. ``registry register`` stores them beside a version so ``registry pull`` gives back a
folder that ``deploy`` tokenizes from, as it did the registered one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaplane.errors import AmbiguousCheckpoint, ConfigError, DecodeError, DeltaplaneError
from deltaplane.textfile import (
    MANIFEST_LIMIT,
    TOKENIZER_LIMIT,
    read_bounded_bytes,
    read_bounded_text,
    require_regular_file,
    safetensors_path,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPANION_FILES",
    "COMPANION_LIMIT",
    "INDEX_LIMIT",
    "INDEX_NAME",
    "SENTENCEPIECE_FILES",
    "TOKENIZER_FILES",
    "WEIGHTS_NAME",
    "file_sha256",
    "folder_weights",
    "load_sharded",
    "pull_manifest",
    "read_companion_files",
    "read_shard_index",
    "shard_shapes",
]

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_LIMIT = 16 * 2**20
"""Largest index accepted: a 10⁶-tensor index is ~100 MB smaller than this; a larger one is hostile or broken."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""A Hugging Face tokenizer's files (mergekit's list plus the vocab files of WordPiece/BPE): what ``merge`` copies
from its tokenizer source and what the registry carries with a version."""
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model")
"""The SentencePiece models some tokenizers are made of (T5's, XLM-R's), besides :data:`TOKENIZER_FILES`."""
COMPANION_FILES = (*TOKENIZER_FILES, *SENTENCEPIECE_FILES, "generation_config.json")
"""The files of a checkpoint folder read by :func:`read_companion_files` (``config.json`` is read on its own)."""
COMPANION_LIMIT = 2 * TOKENIZER_LIMIT
"""Most bytes of all companion files together: a large BPE tokenizer's files are a few tens of MiB."""


def folder_weights(folder: str | os.PathLike[str]) -> Path | None:
    """The weights file of a Hugging Face-layout checkpoint folder: its :data:`WEIGHTS_NAME` or its
    :data:`INDEX_NAME` (a sharded checkpoint, read by :func:`load_sharded`); None when it holds neither.

    The one choice every reader of a folder makes — ``deploy``, ``registry register``, the codecs commands, and
    merging's :class:`~deltaplane.merging.checkpoint.Checkpoint` (``merge``, ``extract-lora``) — so no two
    commands read one folder from different files. A folder holding both is two checkpoints unless the index
    names ``model.safetensors`` among its shards (then the index is the checkpoint, and that file a part of
    it): typically a sharded save written over a single-file one, or the reverse, by a tool that did not remove
    the other. Which is meant cannot be told from the files, and Hugging Face's own loaders disagree —
    transformers' ``PreTrainedModel.from_pretrained`` takes ``model.safetensors`` first (transformers 5.25,
    ``modeling_utils._get_resolved_checkpoint_files``), huggingface_hub's ``load_torch_model`` the index first
    (``serialization/_torch.py``) — so such a folder is refused, naming what to remove, rather than read from a
    file that may be the stale one.

    A name is there when anything bears it (:func:`os.path.lexists`), so a FIFO, a folder or a dangling link
    named ``model.safetensors`` is refused with its name and kind rather than passed over for the index (or the
    folder called empty). A link is followed, as any path the user gives is (a Hugging Face cache snapshot links
    its files into ``../../blobs``); what it leads to must be a regular file. Shards named by the index are
    read under the stricter rules of :func:`read_shard_index`: those names come from the file, not the user.

    Raises:
        ConfigError: the chosen name is not a regular file (after links): a FIFO (which would block the reader
            for good), a directory, a device, a dangling link; the message names the file and what it is.
        AmbiguousCheckpoint: the folder holds both files and the index does not name ``model.safetensors``
            (or cannot be read); the message names both and what to remove for each choice.
    """
    p = Path(folder)
    found = [
        require_regular_file(p / name, what=what, error=ConfigError)
        for name, what in ((WEIGHTS_NAME, "weights file"), (INDEX_NAME, "safetensors index"))
        if os.path.lexists(p / name)
    ]
    if len(found) < 2:
        return found[0] if found else None
    single, index = found
    try:
        shards = read_shard_index(p)
    except DecodeError as e:
        unreadable: DecodeError | None = e
        shards = {}
    else:
        unreadable = None
        if single in shards:
            return index
    named = ", ".join(f.name for f in list(shards)[:3]) + (", ..." if len(shards) > 3 else "")
    raise AmbiguousCheckpoint(
        f"{p} holds two checkpoints, {WEIGHTS_NAME} and {INDEX_NAME}"
        + (f" (whose shards are {named})" if shards else f" (unreadable: {unreadable})")
        + f", and deltaplane will not guess which is meant: remove {WEIGHTS_NAME} to use the sharded "
        f"checkpoint, or remove {INDEX_NAME} and its shards to use {WEIGHTS_NAME}"
    ) from unreadable


def read_shard_index(folder: str | os.PathLike[str]) -> dict[Path, list[str]]:
    """The shards ``folder``'s index names, each with the tensor names the index assigns to it (index order).

    Checks the index alone (names, sizes, shards present); :func:`load_sharded` also checks the shards' contents.

    Raises:
        DecodeError: the index is over :data:`INDEX_LIMIT`, not JSON, has no ``weight_map`` object of
            string → string, names a shard outside the folder (``..``, a path, an absolute path, a symlink out)
            or not ending in ``.safetensors``, or a shard that is missing or not a regular file.
    """
    p = Path(folder)
    index = p / INDEX_NAME
    text = read_bounded_text(index, limit=INDEX_LIMIT, what="safetensors index", error=DecodeError)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DecodeError(f"{index} is not valid JSON: {e}; write the index again (deltaplane merge)") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DecodeError(
            f"{index} needs a non-empty 'weight_map' object mapping tensor names to shard files"
        )
    root = p.resolve()
    shards: dict[Path, list[str]] = {}
    checked: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise DecodeError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a shard file name")
        if shard not in checked:
            bare = shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard
            if not bare or os.path.isabs(shard) or not shard.endswith(".safetensors"):
                raise DecodeError(
                    f"{index} names shard {shard!r}: a shard must be a bare .safetensors file name inside {p} "
                    "(no directories, '..' or absolute paths); fix the index's weight_map"
                )
            f = p / shard
            if not f.resolve().is_relative_to(root):
                raise DecodeError(
                    f"{index} names shard {shard!r}, a link leading outside {p}; copy the file in"
                )
            if not os.path.lexists(f):
                raise DecodeError(f"{index} names shard {shard!r}, which is missing from {p}; copy it in")
            require_regular_file(f, what="shard", error=DecodeError)
            checked[shard] = f
        shards.setdefault(checked[shard], []).append(tensor)
    return shards


@contextlib.contextmanager
def _open_checked(index: Path, f: Path, claimed: list[str]) -> Iterator[Any]:
    """``safe_open`` of shard ``f`` once its tensors are exactly those the index assigns to it (``claimed``);
    its errors, and the library's, as :class:`DecodeError` naming the file."""
    from safetensors import SafetensorError, safe_open

    name = safetensors_path(f, what="shard")
    try:
        with safe_open(name, "pt") as sf:
            held = set(sf.keys())
            lacking = [t for t in claimed if t not in held]
            if lacking:
                raise DecodeError(
                    f"{index} puts tensor(s) {lacking[:5]} in {f.name}, which does not hold them; "
                    "the index does not belong to these shards (write the checkpoint again)"
                )
            extra = sorted(held - set(claimed))
            if extra:
                raise DecodeError(
                    f"{f.name} holds tensor(s) {extra[:5]} that {index.name} assigns to another shard or "
                    "not at all (a tensor duplicated across shards, or an index that left it out); "
                    "write the checkpoint again"
                )
            yield sf
    except (SafetensorError, OSError, ValueError) as e:
        raise DecodeError(f"{f} is not a readable safetensors file: {e}") from e


def shard_shapes(folder: str | os.PathLike[str]) -> tuple[dict[str, tuple[int, ...]], dict[Path, list[str]]]:
    """Every tensor's shape in ``folder``'s sharded checkpoint, and the shards with the tensors each holds
    (index order), read from the shards' headers only: the checks of :func:`load_sharded`, no weights read.

    For a reader that copies the weights into a model it built, shard by shard (``deploy``), so the state dict
    is never held whole beside the model.

    Raises:
        DecodeError: what :func:`load_sharded` refuses.
    """
    index = Path(folder) / INDEX_NAME
    shards = read_shard_index(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for f, claimed in shards.items():
        with _open_checked(index, f, claimed) as sf:
            shapes |= {t: tuple(sf.get_slice(t).get_shape()) for t in claimed}
    return shapes, shards


def load_sharded(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every tensor of ``folder``'s sharded checkpoint, and the shard files in index order.

    Raises:
        DecodeError: what :func:`read_shard_index` refuses; a shard that is not readable safetensors; a tensor
            the index assigns to a shard that lacks it; a shard holding a tensor the index does not assign to it
            (duplicated across shards or left out of the index). Nothing is returned half-read.
    """
    index = Path(folder) / INDEX_NAME
    shards = read_shard_index(folder)
    state: dict[str, torch.Tensor] = {}
    for f, claimed in shards.items():
        with _open_checked(index, f, claimed) as sf:
            state |= {t: sf.get_tensor(t) for t in claimed}
    return state, list(shards)


def read_companion_files(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    """The :data:`COMPANION_FILES` present in ``folder`` (name → bytes, in that order), read strictly.

    Raises:
        DecodeError: a companion file that is not a regular file (a FIFO named ``vocab.txt``), is a symlink
            leading outside ``folder``, is over :data:`~deltaplane.textfile.TOKENIZER_LIMIT`, or that brings all
            of them over :data:`COMPANION_LIMIT`.
    """
    p = Path(folder)
    root = p.resolve()
    out: dict[str, bytes] = {}
    total = 0
    for name in COMPANION_FILES:
        f = p / name
        if not os.path.lexists(f):
            continue
        if not f.resolve().is_relative_to(root):
            raise DecodeError(f"{f} is a link leading outside {p}; copy the file in")
        data = read_bounded_bytes(f, limit=TOKENIZER_LIMIT, what="tokenizer file", error=DecodeError)
        total += len(data)
        if total > COMPANION_LIMIT:
            raise DecodeError(
                f"the tokenizer and generation files of {p} are over {COMPANION_LIMIT // 2**20} MiB together "
                f"(at {name}); check that the folder holds one model's files"
            )
        out[name] = data
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB blocks: what ``registry register`` records as a file's
    ``source.sha256``, a deploy manifest as its ``source_sha256`` and a merge as each input's ``sha256``, so
    the registry can tell which version a file holds."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` a ``registry pull`` wrote into a folder (``path``: the folder, or a file in it),
    or ``None``: no manifest, one that does not read as a JSON object, or another command's (a deploy
    output's, which names no ``consent``). Not a signed record: it says where a folder came from, for warnings
    and refusals made in the user's favour, never to vouch for the weights."""
    p = Path(path)
    manifest = (p if p.is_dir() else p.parent) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        doc = json.loads(read_bounded_text(manifest, limit=MANIFEST_LIMIT, what="pull manifest"))
    except (DeltaplaneError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("consent"), dict) else None
