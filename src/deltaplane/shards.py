"""Strict reading of a sharded safetensors checkpoint: ``model.safetensors.index.json`` + the shards it names.

``deltaplane merge --max-shard-size`` (like mergekit and Hugging Face ``save_pretrained``) writes a folder of
``model-0000i-of-0000n.safetensors`` shards and an index whose ``weight_map`` maps each tensor name to the shard
holding it. ``deploy`` and ``registry register`` read such a folder through :func:`load_sharded`, so an index is
checked the same way wherever it is read. An index is a file a stranger may hand over, so it is trusted for
nothing: it is at most :data:`INDEX_LIMIT` bytes; every shard it names is a bare ``.safetensors`` file name in the
folder (no ``..``, no ``/``, no absolute path, no symlink leading out); every named shard exists; every tensor it
lists is in the shard it names; and a shard holding a tensor the index does not assign to it (a tensor duplicated
across shards, or one the index forgot) is refused rather than silently dropped or overwritten. Shards are read
with ``safetensors`` only (never pickle), one at a time, so memory is the state dict plus one shard's read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from deltaplane.errors import DecodeError
from deltaplane.textfile import read_bounded_text, require_regular_file, safetensors_path

if TYPE_CHECKING:
    import torch

__all__ = ["INDEX_LIMIT", "INDEX_NAME", "load_sharded", "read_shard_index"]

INDEX_NAME = "model.safetensors.index.json"
INDEX_LIMIT = 16 * 2**20
"""Largest index accepted: a 10⁶-tensor index is ~100 MB smaller than this; a larger one is hostile or broken."""


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


def load_sharded(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every tensor of ``folder``'s sharded checkpoint, and the shard files in index order.

    Raises:
        DecodeError: what :func:`read_shard_index` refuses; a shard that is not readable safetensors; a tensor
            the index assigns to a shard that lacks it; a shard holding a tensor the index does not assign to it
            (duplicated across shards or left out of the index). Nothing is returned half-read.
    """
    from safetensors import SafetensorError, safe_open

    index = Path(folder) / INDEX_NAME
    shards = read_shard_index(folder)
    state: dict[str, torch.Tensor] = {}
    for f, claimed in shards.items():
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
                for t in claimed:
                    state[t] = sf.get_tensor(t)
        except (SafetensorError, OSError, ValueError) as e:
            raise DecodeError(f"{f} is not a readable safetensors file: {e}") from e
    return state, list(shards)
