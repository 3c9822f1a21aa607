"""Streaming merge of checkpoints on disk: tensor by tensor and, inside a tensor, row chunk by row chunk.

:func:`merge_files` reads each input lazily (headers first, then only the rows being merged, with ``pread``),
merges with the same :class:`~deltaplane.merging.base.MergeMethod` code as the in-memory
:func:`~deltaplane.merging.merge`, and writes the result as safetensors chunk by chunk (sharded with a
``model.safetensors.index.json`` when large).

Memory model: every built-in method is a :class:`~deltaplane.merging.base.ChunkedMergeMethod`, so a tensor is
merged in blocks of whole rows of at most ``chunk_elements`` elements per input. Peak memory is about
``(inputs + a few scratch buffers) × chunk`` on top of the Python/torch runtime — independent of the model and
of its largest tensor. Methods with per-tensor statistics make read-only passes over the chunks first (TIES:
two passes for the exact top-k thresholds). A method that only implements ``merge_tensor`` is merged a whole
tensor at a time: ``(inputs + a few) × largest tensor``. Chunks of a tensor that fits in one chunk are read once
and reused by every pass.

Everything that can be checked from headers is checked before any tensor is read — names, shapes, dtypes,
parameters — and the output is built in a temporary folder next to ``out_dir`` and renamed into place only when
complete, so a failed merge never leaves a partial model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaplane.errors import ConfigError, ShapeMismatch
from deltaplane.merging.base import (
    MergeMethod,
    MergeParams,
    TensorChunk,
    compute_dtype_for,
    get_method,
    refuse_non_finite,
    resolve_params,
    row_ranges,
)
from deltaplane.merging.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, SafetensorsWriter, TensorInfo
from deltaplane.merging.config import MergeConfig, load_config

__all__ = ["COPIED_FILES", "MergeResult", "ProgressFn", "merge_files"]

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, tensor_name)``, called after each merged tensor (the CLI draws a bar with it)."""

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files copied from the base model's folder (else the first model's) into the output, as mergekit does."""

DEFAULT_SHARD_BYTES = 5 * 2**30
DEFAULT_CHUNK_ELEMENTS = 1 << 18
"""Elements per input per chunk (1 MiB in float32): small next to the runtime and cache-friendly, large enough that per-chunk
overhead is negligible."""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_files` wrote."""

    out_dir: Path
    files: tuple[str, ...]
    n_tensors: int
    n_params: int
    nbytes: int
    seconds: float


def _uses_base(method: MergeMethod) -> bool:
    # methods whose formula has a θ₀ term; linear/fisher average only the listed models
    return method.needs_base or method.name == "slerp"


def _check_layout(ref: Checkpoint, other: Checkpoint, cast: bool) -> None:
    if ref.infos.keys() != other.infos.keys():
        missing = sorted(set(ref.infos) - set(other.infos))
        extra = sorted(set(other.infos) - set(ref.infos))
        parts = []
        if missing:
            parts.append(f"lacks tensor(s) {missing[:5]} that '{ref.path}' has")
        if extra:
            parts.append(f"has extra tensor(s) {extra[:5]} that '{ref.path}' lacks")
        raise ShapeMismatch(f"model '{other.path}' " + " and ".join(parts))
    for name, info in ref.infos.items():
        o = other.infos[name]
        if o.shape != info.shape:
            raise ShapeMismatch(
                f"tensor '{name}': shape {o.shape} in '{o.file}' but {info.shape} in '{info.file}'"
            )
        if o.dtype != info.dtype and not (
            cast and o.dtype.is_floating_point and info.dtype.is_floating_point
        ):
            raise ShapeMismatch(
                f"tensor '{name}': dtype {o.dtype} in '{o.file}' but {info.dtype} in '{info.file}' "
                "(set `dtype:` in the config to cast every input to one dtype)"
            )


def _plan_shards(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for e in entries:
        n = TensorInfo(Path(), e[1], e[2]).nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _copy_model_files(src: Path, dst: Path, out_dtype: torch.dtype | None) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        f = src / name
        if not f.is_file():
            continue
        if name == "config.json" and out_dtype is not None:
            try:
                cfg = json.loads(f.read_text())
            except ValueError:
                cfg = None
            if isinstance(cfg, dict):
                # keep the advertised dtype truthful when the merge changes it
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = str(out_dtype).removeprefix("torch.")
                (dst / name).write_text(json.dumps(cfg, indent=2) + "\n")
                copied.append(name)
                continue
        shutil.copyfile(f, dst / name)
        copied.append(name)
    return copied


def merge_files(
    config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergeResult:
    """Merge the checkpoints a config names into ``out_dir`` (Hugging Face layout), streaming tensor by tensor.

    Example:
        ``merge_files("merge.yaml", "out/")`` with ``merge.yaml`` in mergekit's format (see
        :mod:`deltaplane.merging.config`); the CLI equivalent is ``deltaplane merge merge.yaml -o out/``.

    Args:
        config: path to a YAML file, a dict with the same keys, or a :class:`MergeConfig`.
        out_dir: the folder to create; holds ``model.safetensors`` (or shards + ``model.safetensors.index.json``)
            and the base model's ``config.json`` / tokenizer files.
        progress: called as ``progress(done, total, name)`` after each tensor.
        overwrite: replace ``out_dir`` if it exists (only once the new merge is complete).
        max_shard_bytes: split the output into shards of at most this size (a tensor never spans shards).
        chunk_elements: merge large tensors in blocks of whole rows with at most this many elements per input;
            peak memory is about (inputs + a few) × chunk. The result does not depend on it, except for the last
            bits of SLERP's and Model Stock's reductions (see docs/merging.md).

    Raises:
        ConfigError: bad config, unknown method/parameter, missing model path or base, ``out_dir`` exists.
        ShapeMismatch: the models disagree on tensor names, shapes or dtypes; names the file and the tensor.
        DecodeError: an input file is not valid safetensors.
        InvalidUpdate: an input tensor holds NaN or Inf; names the file and the tensor (no output is left).
    """
    t0 = time.perf_counter()
    cfg = load_config(dict(config) if isinstance(config, Mapping) else config)
    where = cfg.source
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(
            f"output folder '{out}' already exists (pass --overwrite to replace it, or overwrite=True from Python)"
        )
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive. Found {max_shard_bytes}")
    if chunk_elements <= 0:
        raise ConfigError(f"chunk_elements must be positive. Found {chunk_elements}")
    method = get_method(cfg.merge_method)
    uses_base = _uses_base(method)
    entries = list(cfg.models)
    if uses_base and cfg.base_model is not None:
        base_path = cfg.resolve(cfg.base_model)
        # mergekit lists the base under models too; its entry carries no task vector
        entries = [e for e in entries if cfg.resolve(e.model).resolve() != base_path.resolve()]
    if uses_base and cfg.base_model is None and method.needs_base:
        raise ConfigError(f"{where}: merge method '{method.name}' needs base_model")
    names = [e.model for e in entries]
    method.check_models(len(entries), uses_base and cfg.base_model is not None)
    params = resolve_params(
        method, len(entries), cfg.parameters, [e.parameters for e in entries], where=where, model_names=names
    )
    base = Checkpoint(cfg.resolve(cfg.base_model)) if uses_base and cfg.base_model else None
    models = [Checkpoint(cfg.resolve(e.model)) for e in entries]
    inputs = ([base] if base is not None else []) + models
    for ck in inputs:
        ck.check_index()
    cast = cfg.compute_dtype is not None
    for ck in inputs[1:]:
        _check_layout(inputs[0], ck, cast)
    # tensor-valued parameters given as files (a Fisher per model) are opened lazily like the models
    tensor_keys = [p.name for p in method.model_params if p.kind == "tensors"]
    for mp in params.per_model:
        for key in tensor_keys:
            if isinstance(mp[key], str):
                mp[key] = Checkpoint(cfg.resolve(mp[key]))
    ref = inputs[0]
    plan = []
    for name, info in ref.infos.items():
        dtype = info.dtype
        if info.dtype.is_floating_point and cfg.output_dtype is not None:
            dtype = cfg.output_dtype
        plan.append((name, info.shape, dtype))
        for i, mp in enumerate(params.per_model):
            for key in tensor_keys:
                f = mp[key]
                if not (info.dtype.is_floating_point and isinstance(f, Mapping)):
                    continue
                src = f.path if isinstance(f, Checkpoint) else f"model {names[i]}"
                if name not in f:
                    raise ShapeMismatch(f"tensor '{name}': missing from {key} '{src}' of model '{names[i]}'")
                fshape = f.infos[name].shape if isinstance(f, Checkpoint) else tuple(f[name].shape)
                if tuple(fshape) != tuple(info.shape):
                    raise ShapeMismatch(
                        f"tensor '{name}': shape {tuple(fshape)} in {key} '{src}' of model '{names[i]}' but "
                        f"{info.shape} in '{info.file}'"
                    )
    shards = _plan_shards(plan, max_shard_bytes)
    shard_names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    n_params = nbytes = done = 0
    try:
        meta = {"format": "pt", "merged_by": "deltaplane", "merge_method": method.name}
        for shard, fname in zip(shards, shard_names, strict=True):
            with SafetensorsWriter(tmp / fname, shard, meta) as writer:
                for name, _shape, out_dtype in shard:
                    for part in _merge_one(
                        method, params, name, base, models, cfg.compute_dtype, chunk_elements
                    ):
                        writer.write(name, part.to(out_dtype))
                        del part
                    n_params += ref.infos[name].numel
                    done += 1
                    if progress is not None:
                        progress(done, len(plan), name)
                nbytes += writer.total_bytes
        files = list(shard_names)
        if len(shards) > 1:
            weight_map = {
                name: fname for shard, fname in zip(shards, shard_names, strict=True) for name, *_ in shard
            }
            index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX_NAME)
        src = (base or models[0]).folder
        files += _copy_model_files(src, tmp, cfg.output_dtype)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for ck in inputs:
            ck.close()
    return MergeResult(out, tuple(files), len(plan), n_params, nbytes, time.perf_counter() - t0)


def _merge_one(
    method: MergeMethod,
    params: MergeParams,
    name: str,
    base: Checkpoint | None,
    models: list[Checkpoint],
    compute_dtype: torch.dtype | None,
    chunk_elements: int,
) -> Iterator[Tensor]:
    """The merged tensor ``name``, as consecutive blocks of rows (one block for a whole-tensor method)."""
    first = models[0]
    info = first.infos[name]
    ranges = row_ranges(info.shape, chunk_elements)
    if not info.dtype.is_floating_point:
        src = base or first  # counters and index buffers are copied, not averaged
        for s, e in ranges:
            yield src.read_rows(name, s, e)
        return
    cdt = compute_dtype_for(compute_dtype or info.dtype)
    if not method.chunked:
        ranges = row_ranges(info.shape, None)

    def read(start: int, stop: int) -> TensorChunk:
        b = base.read_rows(name, start, stop).to(cdt) if base is not None else None
        ts = [m.read_rows(name, start, stop).to(cdt) for m in models]
        refuse_non_finite(name, [b, *ts], [str(c.infos[name].file) for c in [base or first, *models]])
        per_model = []
        for mp in params.per_model:
            mp = dict(mp)
            for key, value in mp.items():
                if isinstance(value, Checkpoint):
                    mp[key] = value.read_rows(name, start, stop).to(cdt)
                elif isinstance(value, Mapping):
                    t = value[name]
                    mp[key] = (t if not info.shape else t[start:stop]).to(cdt)
            per_model.append(mp)
        return TensorChunk(name, info.shape, start, stop, b, ts, MergeParams(params.shared, per_model))

    if not method.chunked:
        whole = read(*ranges[0])
        yield method.merge_tensor(name, whole.base, whole.tensors, whole.params)
        return
    # a tensor that fits in one chunk is read once: prepare() only reads, merge_chunk() may then modify it
    cached = read(*ranges[0]) if len(ranges) == 1 else None

    def chunks() -> Iterator[TensorChunk]:
        if cached is not None:
            yield cached
            return
        for s, e in ranges:
            yield read(s, e)

    state = method.prepare(name, info.shape, chunks, params)
    for chunk in chunks():
        yield method.merge_chunk(chunk, state)
