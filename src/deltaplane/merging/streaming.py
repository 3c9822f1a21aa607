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
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaplane.delta import all_finite
from deltaplane.errors import ConfigError, InvalidUpdate, ShapeMismatch
from deltaplane.merging.base import (
    MergeMethod,
    MergeParams,
    TensorChunk,
    chunk_dtype,
    get_method,
    refuse_non_finite,
    row_ranges,
)
from deltaplane.merging.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, SafetensorsWriter, TensorInfo
from deltaplane.merging.config import MergeConfig, load_config
from deltaplane.merging.output import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    TokenizerPlan,
    plan_tokenizer,
    write_extras,
    write_sources,
)
from deltaplane.merging.plan import Plan, PlannedTensor, plan_tensors
from deltaplane.signals import exit_on_terminate, signals_held
from deltaplane.staging import stage_dir, sweep
from deltaplane.threads import torch_threads

__all__ = ["COPIED_FILES", "MergeResult", "PreparedMerge", "ProgressFn", "merge_files", "prepare_merge"]

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, tensor_name)``, called after each merged tensor (the CLI draws a bar with it)."""

COPIED_FILES = CONFIG_FILES + TOKENIZER_FILES
"""Files copied into the output, as mergekit does: config from the base model (else the first model), tokenizer
from ``tokenizer_source`` (default: the same folder); see :mod:`deltaplane.merging.output`."""

DEFAULT_SHARD_BYTES = 5 * 2**30
DEFAULT_CHUNK_ELEMENTS = 1 << 18
"""Elements per input per chunk (1 MiB in float32): small next to the runtime and cache-friendly, large enough that per-chunk
overhead is negligible."""
DEFAULT_CACHE_BYTES = 32 * 2**20
"""A tensor whose inputs take at most this much (in the compute dtype, all inputs together) is read once and held
for every pass of its method; a larger one is read again on each pass, chunk by chunk."""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_files` wrote."""

    out_dir: Path
    files: tuple[str, ...]
    n_tensors: int
    n_params: int
    nbytes: int
    seconds: float
    notes: tuple[str, ...] = field(default=())
    """Where the merge deliberately differs from mergekit or ignored something mergekit ignores (also in the card)."""


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


def _check_tensor_params(method: MergeMethod, tensors: list[PlannedTensor]) -> None:
    """Every tensor-valued parameter (a Fisher per model) has each merged tensor, with its shape."""
    keys = [p.name for p in method.model_params if p.kind == "tensors"]
    if not keys:
        return
    for t in tensors:
        if not t.in_dtype.is_floating_point:
            continue
        for src, mp in zip(t.inputs, t.params.per_model, strict=True):
            for key in keys:
                f = mp[key]
                if not isinstance(f, Mapping):
                    continue
                where = f.path if isinstance(f, Checkpoint) else f"model {src.label}"
                if src.name not in f:
                    raise ShapeMismatch(
                        f"tensor '{src.name}': missing from {key} '{where}' of model '{src.label}'"
                    )
                fshape = f.infos[src.name].shape if isinstance(f, Checkpoint) else tuple(f[src.name].shape)
                if tuple(fshape) != tuple(t.shape):
                    raise ShapeMismatch(
                        f"tensor '{src.name}': shape {tuple(fshape)} in {key} '{where}' of model '{src.label}' "
                        f"but {t.shape} in '{src.checkpoint.infos[src.name].file}'"
                    )


def _refuse_output_over_inputs(out: Path, cfg: MergeConfig, plan: Plan) -> None:
    """Raise :class:`ConfigError` if ``out`` is, or is a folder above, a file the merge reads (a model's weights, a
    Fisher file, the config itself): with ``overwrite`` the finished merge replaces ``out`` as a whole, which would
    delete those inputs. An output inside an input's folder replaces nothing of it and is allowed."""
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        # the finished merge is swapped in for the whole folder, which cannot be renamed away while it is the
        # working directory (EBUSY, leaving the old folder half moved aside) and would take everything in it
        raise ConfigError(
            f"output folder '{out}' is the working directory or holds it: the merge replaces its output folder "
            "as a whole. Choose a new folder for the merged model (e.g. -o merged)"
        )
    files = [info.file for ck in plan.checkpoints for info in ck.infos.values()]
    files += [ck.path for ck in plan.checkpoints]
    if cfg.source != "config":  # loaded from a file
        files.append(Path(cfg.source))
    for f in dict.fromkeys(files):
        real = f.resolve()
        if real == target or target in real.parents:
            raise ConfigError(
                f"output folder '{out}' holds the input '{f}': replacing it with the merge would delete that input. "
                "Choose an output folder that holds none of the models or the config"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def merge_files(
    config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    exact_accumulation: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    threads: int | None = 1,
) -> MergeResult:
    """Merge the checkpoints a config names into ``out_dir`` (Hugging Face layout), streaming tensor by tensor.

    Example:
        ``merge_files("merge.yaml", "out/")`` with ``merge.yaml`` in mergekit's format (see
        :mod:`deltaplane.merging.config`); the CLI equivalent is ``deltaplane merge merge.yaml -o out/``.

    Args:
        config: path to a YAML file, a dict with the same keys, or a :class:`MergeConfig`.
        out_dir: the folder to create; holds ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
            the donor's ``config.json``, the tokenizer files, ``mergekit_config.yml`` and a ``README.md`` card.
        progress: called as ``progress(done, total, name)`` after each tensor.
        overwrite: replace ``out_dir`` if it exists (only once the new merge is complete).
        max_shard_bytes: split the output into shards of at most this size (a tensor never spans shards).
        chunk_elements: merge large tensors in blocks of whole rows with at most this many elements per input;
            peak memory is about (inputs + a few) × chunk. The result does not depend on it, except for the last
            bits of reductions (norms, dot products, L1 sums; see docs/merging.md).
        exact_accumulation: compute in float32 even when the config's ``dtype`` (or the inputs) are half
            precision, rounding once at the output. Default: mergekit's behaviour (compute in that dtype).
        cache_bytes: a tensor whose inputs take at most this many bytes (in the compute dtype) is read once and
            held for all of its method's passes (TIES makes three); larger ones are re-read chunk by chunk. Peak
            memory is about the larger of this and (inputs + a few) × chunk.
        threads: torch threads while merging (restored afterwards); ``None`` leaves torch's setting. The work is
            elementwise on chunks of about a megabyte, bound by memory rather than arithmetic: one thread is
            fastest, and a thread pool's workers spin-wait between the many short operations, burning CPU on a
            shared machine (at 2 threads the merge took several times the CPU time, not less wall time).

    Raises:
        ConfigError: bad config, unknown method/parameter, missing model path or base, ``out_dir`` exists.
        ShapeMismatch: the models disagree on tensor names, shapes or dtypes; names the file and the tensor.
        DecodeError: an input file is not valid safetensors.
        InvalidUpdate: an input tensor holds NaN or Inf, or overflows the config's ``dtype``, or the merged tensor
            overflows the compute or output dtype; names the file or the tensor (no output is left).
    """
    with prepare_merge(
        config,
        out_dir,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        chunk_elements=chunk_elements,
        exact_accumulation=exact_accumulation,
        cache_bytes=cache_bytes,
        threads=threads,
    ) as job:
        return job.run(progress)


@dataclass
class PreparedMerge:
    """A merge whose config, inputs (headers), parameters and output were all checked: nothing was written yet.

    Made by :func:`prepare_merge`; :meth:`run` does the work and closes the inputs. Use it as a context manager
    (or call :meth:`close`) so the inputs are closed if it never runs. Splitting the checks from the work lets a
    caller refuse a bad config before it shows anything of the work (the CLI's progress bar).
    """

    cfg: MergeConfig
    method: MergeMethod
    plan: Plan
    out: Path
    tok: TokenizerPlan
    notes: list[str]
    labels: list[str]
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]]
    shard_names: list[str]
    chunk_elements: int
    exact_accumulation: bool
    cache_bytes: int
    threads: int | None
    t0: float

    def close(self) -> None:
        """Close every input file (idempotent)."""
        for ck in self.plan.checkpoints:
            ck.close()

    def __enter__(self) -> PreparedMerge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, progress: ProgressFn | None = None) -> MergeResult:
        """Merge into a hidden folder beside the output and rename it into place when complete (see
        :func:`merge_files`); ``progress(done, total, name)`` is called after each tensor."""
        return _run(self, progress)


def prepare_merge(
    config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    exact_accumulation: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    threads: int | None = 1,
) -> PreparedMerge:
    """Every check :func:`merge_files` makes before it reads a tensor's values (same arguments and errors,
    except ``progress``), with nothing written: the config, the method and its parameters for every tensor, the
    inputs' names, shapes and dtypes, the tokenizer, the options, and that ``out_dir`` does not exist (unless
    ``overwrite``). Only what needs the tensors' values (NaN/Inf) is left to :meth:`PreparedMerge.run`."""
    t0 = time.perf_counter()
    cfg = load_config(dict(config) if isinstance(config, Mapping) else config)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(
            f"output folder '{out}' already exists (pass --overwrite to replace it, or overwrite=True from Python)"
        )
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive. Found {max_shard_bytes}")
    if chunk_elements <= 0:
        raise ConfigError(f"chunk_elements must be positive. Found {chunk_elements}")
    if cache_bytes < 0:
        raise ConfigError(f"cache_bytes must be 0 or more. Found {cache_bytes}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1. Found {threads}")
    try:
        method = get_method(cfg.merge_method)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    plan = plan_tensors(cfg, method)
    try:
        return _prepared(cfg, method, plan, out, max_shard_bytes, chunk_elements, exact_accumulation,
                         cache_bytes, threads, t0)  # fmt: skip
    except BaseException:  # the inputs are the caller's to close only once it holds the PreparedMerge
        for ck in plan.checkpoints:
            ck.close()
        raise


def _prepared(
    cfg: MergeConfig,
    method: MergeMethod,
    plan: Plan,
    out: Path,
    max_shard_bytes: int,
    chunk_elements: int,
    exact_accumulation: bool,
    cache_bytes: int,
    threads: int | None,
    t0: float,
) -> PreparedMerge:
    """:func:`prepare_merge`'s checks once the inputs are open, and the job they make."""
    _refuse_output_over_inputs(out, cfg, plan)
    tensors = plan.tensors
    _check_tensor_params(method, tensors)
    tok = plan_tokenizer(cfg, plan.donor.folder, [ck.folder for ck in plan.models])
    notes = list(plan.notes)
    sums = next(
        (w for t in tensors if t.in_dtype.is_floating_point and (w := method.float64_sums_with(t.params))), ""
    )
    if sums:
        notes.append(
            f"{sums} summed in float64, where mergekit sums in the compute dtype: the weights can differ from "
            "mergekit's in the last bits (they are closer to the exact values)"
        )
    halves = {t.in_dtype for t in tensors if t.in_dtype in (torch.float16, torch.bfloat16)}
    if halves and exact_accumulation:
        notes.append(
            f"computed in float32 and rounded once to the output dtype (--exact-accumulation); mergekit computes "
            f"in {', '.join(sorted(str(h).removeprefix('torch.') for h in halves))}, rounding every step"
        )
    shards = _plan_shards([(t.name, t.shape, t.out_dtype) for t in tensors], max_shard_bytes)
    shard_names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    return PreparedMerge(
        cfg=cfg,
        method=method,
        plan=plan,
        out=out,
        tok=tok,
        notes=notes,
        labels=list(dict.fromkeys(s.label for t in tensors for s in t.inputs)),
        shards=shards,
        shard_names=shard_names,
        chunk_elements=chunk_elements,
        exact_accumulation=exact_accumulation,
        cache_bytes=cache_bytes,
        threads=threads,
        t0=t0,
    )


def _run(job: PreparedMerge, progress: ProgressFn | None) -> MergeResult:
    """Do a prepared merge (:meth:`PreparedMerge.run`); closes its inputs when done, whatever happens."""
    cfg, method, plan, out, tensors = job.cfg, job.method, job.plan, job.out, job.plan.tensors
    shards, shard_names = job.shards, job.shard_names
    out.parent.mkdir(parents=True, exist_ok=True)
    n_params = nbytes = done = 0
    with exit_on_terminate(), torch_threads(job.threads):
        sweep(out)  # staging of a killed merge into the same output
        tmp = stage_dir(out)
        try:
            os.chmod(
                tmp, 0o777 & ~_umask()
            )  # mkdtemp makes it 0700; a folder made by mkdir honours the umask
            meta = {"format": "pt", "merged_by": "deltaplane", "merge_method": method.name}
            by_name = {t.name: t for t in tensors}
            for shard, fname in zip(shards, shard_names, strict=True):
                with SafetensorsWriter(tmp / fname, shard, meta) as writer:
                    for name, _shape, out_dtype in shard:
                        planned = by_name[name]
                        for part in _merge_one(
                            method, planned, job.chunk_elements, job.exact_accumulation, job.cache_bytes
                        ):
                            if not job.exact_accumulation:
                                # mergekit's kernels return the compute dtype (linear and slerp compute a half
                                # type in float32 but round back to it); out_dtype is a cast of that
                                part = part.to(planned.in_dtype)
                            part = part.to(out_dtype)
                            _refuse_overflow(planned, part)
                            writer.write(name, part)
                            del part
                        n_params += TensorInfo(Path(), planned.shape, out_dtype).numel
                        done += 1
                        if progress is not None:
                            progress(done, len(tensors), name)
                    nbytes += writer.total_bytes
            files = list(shard_names)
            if len(shards) > 1:
                weight_map = {
                    name: fname
                    for shard, fname in zip(shards, shard_names, strict=True)
                    for name, *_ in shard
                }
                index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
                files.append(INDEX_NAME)
            float_out = next((t.out_dtype for t in tensors if t.out_dtype.is_floating_point), None)
            files += write_extras(
                cfg, method, tmp, plan.donor.folder, job.tok, float_out, plan.n_layers, job.labels, job.notes,
                out.name, untie_head=plan.untie_head,
            )  # fmt: skip
            files.append(write_sources(tmp, plan.models, method.name))
            with signals_held():  # a signal here would leave the old output in a hidden folder, or none
                if out.exists():
                    old = stage_dir(out, aside=True)
                    os.replace(out, old / "x")
                    os.replace(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            job.close()
    return MergeResult(
        out, tuple(files), len(tensors), n_params, nbytes, time.perf_counter() - job.t0, tuple(job.notes)
    )


def _refuse_overflow(planned: PlannedTensor, part: Tensor) -> None:
    """Raise :class:`InvalidUpdate` if a block of the merged tensor (from finite inputs) holds NaN or Inf: the merge
    overflowed its compute or output dtype (float16 tops out at 65504). mergekit writes such a model silently."""
    if part.is_floating_point() and not all_finite(part):
        dtypes = dict.fromkeys(str(d).removeprefix("torch.") for d in (planned.in_dtype, planned.out_dtype))
        largest = min(torch.finfo(planned.in_dtype).max, torch.finfo(planned.out_dtype).max)
        raise InvalidUpdate(
            f"merged tensor '{planned.name}' holds NaN or Inf although its inputs are finite: the merge overflows "
            f"{' / '.join(dtypes)} (largest value {largest:g}). Compute and write it in float32 or bfloat16 "
            "(dtype: / out_dtype:), or lower the weights or lambda"
        )


def _refuse_cast_overflow(planned: PlannedTensor, start: int, stop: int) -> None:
    """Raise :class:`InvalidUpdate` if an input's rows are finite on disk but not once cast to the config's ``dtype``
    (a float32 value above float16's 65504): the input itself is fine, the ``dtype`` is too narrow for it."""
    for src in ([planned.base] if planned.base is not None else []) + planned.inputs:
        raw = src.checkpoint.read_rows(src.name, start, stop)
        if all_finite(raw) and not all_finite(raw.to(planned.in_dtype)):
            raise InvalidUpdate(
                f"{src.checkpoint.infos[src.name].file}: tensor '{src.name}' holds values beyond the range of the "
                f"config's dtype {str(planned.in_dtype).removeprefix('torch.')} (largest "
                f"{torch.finfo(planned.in_dtype).max:g}): cast to it they become Inf. Set dtype: float32 or bfloat16"
            )


def _rows(chunk: TensorChunk, start: int, stop: int) -> TensorChunk:
    """Rows ``[start, stop)`` of a whole-tensor chunk, as views (tensor-valued parameters cut the same way)."""
    per_model = [
        {k: v[start:stop] if isinstance(v, Tensor) and v.dim() else v for k, v in mp.items()}
        for mp in chunk.params.per_model
    ]
    return TensorChunk(
        chunk.name,
        chunk.shape,
        start,
        stop,
        None if chunk.base is None else chunk.base[start:stop],
        [t[start:stop] for t in chunk.tensors],
        MergeParams(chunk.params.shared, per_model),
    )


def _merge_one(
    method: MergeMethod, planned: PlannedTensor, chunk_elements: int, exact: bool, cache_bytes: int
) -> Iterator[Tensor]:
    """The merged tensor, as consecutive blocks of rows (one block for a whole-tensor method or tensor)."""
    name, shape = planned.name, planned.shape
    base, inputs, params = planned.base, planned.inputs, planned.params
    ranges = row_ranges(shape, chunk_elements)
    if not planned.in_dtype.is_floating_point:
        src = base or inputs[0]  # counters and index buffers are copied, not averaged
        for s, e in ranges:
            yield src.checkpoint.read_rows(src.name, s, e)
        return
    cdt = chunk_dtype(method, planned.in_dtype, exact)
    whole = not method.chunked or method.whole_tensor(shape, params)
    if whole:
        ranges = row_ranges(shape, None)
    files = [str(s.checkpoint.infos[s.name].file) if s is not None else "" for s in [base, *inputs]]

    checked: set[int] = set()  # chunks (by first row) already checked for NaN/Inf: the first pass checks each

    def read(start: int, stop: int) -> TensorChunk:
        # inputs are cast to the config dtype first (mergekit's loader does), then to the compute dtype
        b = base.checkpoint.read_rows(base.name, start, stop).to(planned.in_dtype).to(cdt) if base else None
        ts = [s.checkpoint.read_rows(s.name, start, stop).to(planned.in_dtype).to(cdt) for s in inputs]
        if start not in checked:
            try:
                refuse_non_finite(name, [b, *ts], files)
            except InvalidUpdate:
                _refuse_cast_overflow(planned, start, stop)
                raise
            checked.add(start)
        per_model = []
        for src, mp in zip(inputs, params.per_model, strict=True):
            mp = dict(mp)
            for key, value in mp.items():
                if isinstance(value, Checkpoint):
                    mp[key] = value.read_rows(src.name, start, stop).to(cdt)
                elif isinstance(value, Mapping):
                    t = value[src.name]
                    mp[key] = (t if not shape else t[start:stop]).to(cdt)
            per_model.append(mp)
        return TensorChunk(name, shape, start, stop, b, ts, MergeParams(params.shared, per_model))

    if not method.chunked:
        c = read(*ranges[0])
        yield method.merge_tensor(name, c.base, c.tensors, c.params)
        return
    # A tensor whose inputs fit in the read cache is read once and every pass walks row views of it: prepare()
    # only reads, merge_chunk() then modifies each chunk once, in order. Larger tensors are read chunk by chunk
    # on every pass (a method with statistics reads them two or three times).
    n_inputs = len(inputs) + (base is not None)
    cached = (
        read(0, shape[0] if shape else 1)
        if len(ranges) == 1 or n_inputs * math.prod(shape) * cdt.itemsize <= cache_bytes
        else None
    )

    def chunks() -> Iterator[TensorChunk]:
        if cached is None:
            for s, e in ranges:
                yield read(s, e)
        elif len(ranges) == 1:
            yield cached
        else:
            for s, e in ranges:
                yield _rows(cached, s, e)

    state = method.prepare(name, shape, chunks, params)
    for chunk in chunks():
        yield method.merge_chunk(chunk, state)
