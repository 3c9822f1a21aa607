"""LoRA extraction: the best rank-r adapter for a full fine-tune, one layer at a time.

For each linear weight, ``ΔW = W_ft − W_base`` is factored by a truncated SVD, ``ΔW ≈ U_k Σ_k V_kᵀ``, which is the
best rank-k approximation in Frobenius norm (Eckart–Young). The factors split the singular values evenly,
``B = U_k Σ_k^½``, ``A = Σ_k^½ V_kᵀ`` with ``α = k`` (scaling 1), as ``mergekit-extract-lora`` writes them, so
both factors have comparable magnitudes (good for further training and for quantizing them).

Layers whose smaller side is large next to the rank (≥ 256 and ≥ 4 (r + 10)) use a randomized SVD (Halko,
Martinsson & Tropp 2011, "Finding structure with randomness", https://arxiv.org/abs/0909.4061;
``torch.svd_lowrank``, 10 extra columns, 4 power iterations), which costs ``O(m n k)`` instead of
``O(m n min(m, n))``; on MiniLM's fine-tuned layers its error is within 0.1 % of the exact truncation's. The rank is fixed (``rank``) or chosen per layer as the smallest k
whose singular values hold an ``energy`` fraction of ``‖ΔW‖²_F`` (capped by ``rank`` when both are given).

Weights stored (in, out) — ``transformers``' ``Conv1D``, GPT-2's attention and MLP — are factored as ``ΔWᵀ`` into
``fan_in_fan_out`` layers, the layout PEFT gives those modules (found from a folder's ``config.json``, or named).

Streamed: the two checkpoints are read tensor by tensor (:class:`~deltaplane.merging.checkpoint.Checkpoint`), so
peak memory is one pair of weights plus the factors found so far. Every layer's relative reconstruction error
``‖ΔW − B A‖_F / ‖ΔW‖_F`` is computed exactly, and what a LoRA cannot hold (changed norms, embeddings left out)
is reported rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from deltaplane.adapters.lora import LoRADelta, LoRALayer, module_of
from deltaplane.errors import AdapterMismatch, ConfigError, InvalidUpdate
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text

__all__ = ["CONV1D", "DEFAULT_EXCLUDE", "Extraction", "LayerReport", "extract_lora", "low_rank_factors"]

DEFAULT_EXCLUDE = (r"(^|\.)embeddings?(\.|$)|embed_tokens|wte|wpe|lm_head",)
"""Embeddings and tied output heads are not linear layers a LoRA adapts by default (mergekit saves them in full)."""

CONV1D = r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$"
"""The weights ``transformers`` stores (in, out) in ``Conv1D`` modules: GPT-2's family (``model_type`` in
:data:`CONV1D_MODEL_TYPES`). PEFT adapts those with ``fan_in_fan_out=True``, so their factors must be taken from
``ΔWᵀ``; other architectures' ``c_fc`` / ``c_proj`` (GPT-Neo's) are ``nn.Linear``."""

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})


@dataclass(frozen=True)
class LayerReport:
    """One extracted layer: its rank, the exact relative error and the share of ‖ΔW‖² it keeps."""

    name: str
    shape: tuple[int, int]
    rank: int
    rel_error: float
    energy: float
    randomized: bool


@dataclass
class Extraction:
    """What :func:`extract_lora` found: the adapter, a report per layer, and changes the adapter cannot hold."""

    lora: LoRADelta
    layers: list[LayerReport] = field(default_factory=list)
    uncaptured: dict[str, float] = field(default_factory=dict)
    """Changed tensors outside the adapter → relative change ``‖Δ‖ / ‖W_base‖``."""

    def mean_error(self) -> float:
        """Mean relative error over the extracted layers."""
        return sum(r.rel_error for r in self.layers) / max(1, len(self.layers))


def _svd(
    delta: Tensor, k_max: int, randomized: bool, oversample: int, n_iter: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    if not randomized:
        return torch.linalg.svd(delta, full_matrices=False)
    q = min(k_max + oversample, min(delta.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=n_iter)
    return u, s, v.T


def low_rank_factors(
    delta: Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    randomized_above: int = 256,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float, float, bool]:
    """Truncated SVD of one matrix: ``(A, B, rel_error, energy_kept, randomized)`` with ``B @ A ≈ delta``.

    ``randomized_above``: use the randomized SVD when ``min(shape)`` is at least this and the rank wanted is small
    next to it (``4 (k + oversample) ≤ min(shape)``); the full SVD otherwise, and always for ``energy`` without a
    ``rank`` cap (it needs the whole spectrum). Computed in float32 (float64 for float64 input).
    """
    work = delta.to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(work).all()):  # before the SVD, which would fail with a bare linalg error
        raise InvalidUpdate(f"cannot factor a change holding NaN or Inf values (shape {tuple(work.shape)})")
    small = min(work.shape)
    k_max = min(rank if rank is not None else small, small)
    randomized = small >= randomized_above and (k_max + oversample) * 4 <= small
    u, s, vh = _svd(work, k_max, randomized, oversample, n_iter, seed)
    total = float(work.pow(2).sum())
    if total == 0:
        raise InvalidUpdate("cannot factor an all-zero change")
    k = k_max
    if energy is not None:
        cum = torch.cumsum(s.double().pow(2), 0) / total
        k = min(k_max, int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype)).item()) + 1)
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    A = root[:, None] * vh[:k]
    B = u[:, :k] * root[None, :]
    err = math.sqrt(max(0.0, float((work - B @ A).pow(2).sum()))) / math.sqrt(total)
    kept = float(s[:k].double().pow(2).sum()) / total
    return A.to(delta.dtype), B.to(delta.dtype), err, min(kept, 1.0), randomized


def _matches(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def _conv1d_patterns(*models: str | os.PathLike[str] | Mapping[str, Tensor]) -> tuple[str, ...]:
    """``(CONV1D,)`` if a model is a checkpoint (in a folder) whose ``config.json`` names a GPT-2-family
    ``model_type``, else ``()``: the module types that decide PEFT's layout are not in the weights themselves."""
    for model in models:
        if isinstance(model, Mapping):
            continue
        path = Path(model)
        config = (path if path.is_dir() else path.parent) / "config.json"
        if not config.is_file():
            continue
        try:
            text = read_bounded_text(config, limit=MANIFEST_LIMIT, what="model config", error=ConfigError)
            model_type = json.loads(text).get("model_type")
        except (OSError, ValueError, AttributeError, ConfigError):
            continue  # not a transformers config: nothing says the layers are Conv1D
        if model_type in CONV1D_MODEL_TYPES:
            return (CONV1D,)
    return ()


def _open(model: str | os.PathLike[str] | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model, Mapping):
        return model
    from deltaplane.merging.checkpoint import Checkpoint

    return Checkpoint(Path(model))


def extract_lora(
    finetuned: str | os.PathLike[str] | Mapping[str, Tensor],
    base: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    bias: bool = True,
    randomized_above: int = 256,
    seed: int = 0,
    fan_in_fan_out: Sequence[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Extraction:
    """Extract a LoRA adapter from a full fine-tune (checkpoint folders/files or state dicts).

    Args:
        finetuned, base: Hugging Face–layout folders, ``.safetensors`` files or in-memory state dicts.
        rank: the rank of every layer (the cap when ``energy`` is given too).
        energy: choose each layer's rank as the smallest keeping this fraction of ``‖ΔW‖²_F`` (0 < energy ≤ 1).
        include, exclude: regular expressions on weight names; by default every 2-D ``*.weight`` except
            embeddings and output heads (:data:`DEFAULT_EXCLUDE`).
        bias: carry the change of an extracted layer's bias as PEFT's ``lora_B.bias`` (``lora_bias=True``).
        randomized_above: layers whose smaller side exceeds this use a randomized SVD (when the rank is small).
        seed: seed of the randomized SVD.
        fan_in_fan_out: regular expressions on weight names stored (in, out), as ``transformers``' ``Conv1D``
            stores them: their layers get ``fan_in_fan_out=True`` and factors of ``ΔWᵀ``, the layout PEFT gives
            these modules (plain factors of ``ΔW`` would not load in PEFT, or be transposed there when square).
            By default :data:`CONV1D` when either model is a folder whose ``config.json`` names a GPT-2-family
            ``model_type`` (:data:`CONV1D_MODEL_TYPES`), else none (a state dict does not say its modules' types).
        progress: ``progress(done, total, name)`` after each tensor.

    Raises:
        ConfigError: neither ``rank`` nor ``energy``, a value out of range, or an include/exclude pattern that
            is not a regular expression.
        AdapterMismatch: the two models disagree on a tensor's presence or shape.
        InvalidUpdate: a change holds NaN or Inf.
    """
    if rank is None and energy is None:
        raise ConfigError("extract_lora needs a rank (rank=16) or an energy fraction (energy=0.9), or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer. Found {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1]. Found {energy!r}")
    conv1d = tuple(fan_in_fan_out) if fan_in_fan_out is not None else _conv1d_patterns(finetuned, base)
    for pattern in (*(include or ()), *exclude, *conv1d):  # before any file is opened, not on the first name
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"include/exclude/fan_in_fan_out {pattern!r} is not a regular expression: {exc}"
            ) from None
    ft, bs = _open(finetuned), _open(base)
    # non-floating tensors (buffers such as BERT's position_ids, which a newer transformers no longer saves) are
    # never extracted, so only the floating-point ones must match
    missing = sorted(n for n in set(bs) - set(ft) if _is_float(bs, n))
    extra = sorted(n for n in set(ft) - set(bs) if _is_float(ft, n))
    if missing or extra:
        raise AdapterMismatch(
            f"the fine-tuned model lacks {missing[:5]} and has extra {extra[:5]} tensors compared with the base"
        )
    names = [n for n in bs if n in ft or _is_float(bs, n)]
    targets = {
        n
        for n in names
        if n.endswith(".weight")
        and len(_shape(bs, n)) == 2
        and _is_float(bs, n)
        and _matches(n, include, exclude)
    }
    for name in (n for n in names if n in targets):  # shapes only, before any tensor is read; in file order
        _check_orientation(bs, name, any(re.search(p, name) for p in conv1d))
    layers: dict[str, LoRALayer] = {}
    reports: list[LayerReport] = []
    uncaptured: dict[str, float] = {}
    bias_of = {module_of(n) + ".bias": n for n in targets}
    pending_bias: dict[str, Tensor] = {}
    for done, name in enumerate(names, start=1):
        if not _is_float(bs, name):
            continue
        if _shape(bs, name) != _shape(ft, name):
            raise AdapterMismatch(
                f"tensor '{name}': shape {_shape(ft, name)} in the fine-tuned model but {_shape(bs, name)} in the base"
            )
        if name in targets or (name in bias_of and bias):
            b = bs[name]
            delta = ft[name].float() - b.float() if b.dtype != torch.float64 else ft[name] - b
            changed = _check_finite(delta, name) > 0  # unchanged: no adapter layer, nothing lost
            if changed and name in targets:
                fifo = any(re.search(p, name) for p in conv1d)
                A, B, err, kept, rnd = low_rank_factors(
                    delta.T if fifo else delta,
                    rank=rank,
                    energy=energy,
                    randomized_above=randomized_above,
                    seed=seed,
                )
                layers[name] = LoRALayer(
                    A.to(b.dtype), B.to(b.dtype), alpha=float(A.shape[0]), fan_in_fan_out=fifo
                )
                shape = (int(delta.shape[0]), int(delta.shape[1]))  # a target is a 2-D weight
                reports.append(LayerReport(name, shape, int(A.shape[0]), err, kept, rnd))
            elif changed:
                pending_bias[bias_of[name]] = delta.to(b.dtype)
            del delta, b
        else:
            rel = _relative_change(ft, bs, name)
            if rel:
                uncaptured[name] = rel
        if progress is not None:
            progress(done, len(names), name)
    for weight, d in pending_bias.items():
        if weight in layers:
            layers[weight] = replace(layers[weight], bias=d)
        else:  # the weight did not change but its bias did: nothing to attach it to
            uncaptured[module_of(weight) + ".bias"] = float(d.norm()) / max(
                float(bs[module_of(weight) + ".bias"].float().norm()), 1e-30
            )
    ordered = {n: layers[n] for n in names if n in layers}
    return Extraction(LoRADelta(ordered), reports, uncaptured)


def _check_orientation(base: Mapping[str, Tensor], name: str, fan_in_fan_out: bool) -> None:
    """Raise :class:`AdapterMismatch` when the layer's bias proves the weight is laid out the other way: a bias as
    long as the weight's second side (not its first) is a ``Conv1D`` weight stored (in, out), whose plain factors
    PEFT would refuse (or transpose, were it square), and the reverse for a layer named in ``fan_in_fan_out``."""
    bias_name = module_of(name) + ".bias"
    shape = _shape(base, name)
    if bias_name not in base or shape[0] == shape[1] or len(_shape(base, bias_name)) != 1:
        return
    n = _shape(base, bias_name)[0]
    out = shape[1] if fan_in_fan_out else shape[0]
    if n != out and n == shape[int(not fan_in_fan_out)]:
        fix = (
            "it is stored (in, out), as transformers' Conv1D stores it (GPT-2): name it in fan_in_fan_out "
            "(--fan-in-fan-out REGEX)"
            if not fan_in_fan_out
            else "it is stored (out, in), as nn.Linear stores it: leave it out of fan_in_fan_out (--fan-in-fan-out)"
        )
        raise AdapterMismatch(f"weight '{name}' has shape {shape} but its bias has {n} values: {fix}")


_ROW_CHUNK = 1 << 18


def _relative_change(ft: Mapping[str, Tensor], bs: Mapping[str, Tensor], name: str) -> float:
    """``‖ft − base‖ / ‖base‖`` of a tensor outside the adapter, read in row chunks (embeddings are large)."""
    from deltaplane.merging.base import row_ranges

    num = den = 0.0
    for s, e in row_ranges(_shape(bs, name), _ROW_CHUNK):
        b = _rows(bs, name, s, e)
        d = _rows(ft, name, s, e) - b
        num += _check_finite(d, name)
        den += float(b.pow(2).sum(dtype=torch.float64))
    if num == 0:
        return 0.0
    return math.sqrt(num / den) if den > 0 else math.inf


def _check_finite(delta: Tensor, name: str) -> float:
    """``‖delta‖²``; raise :class:`InvalidUpdate` if ``delta`` holds NaN or Inf (one reduction when it does not)."""
    sq = float(delta.pow(2).sum(dtype=torch.float64))
    if not math.isfinite(sq) and not bool(torch.isfinite(delta).all()):
        raise InvalidUpdate(f"tensor '{name}': the fine-tuned model minus the base holds NaN or Inf")
    return sq


def _rows(model: Mapping[str, Tensor], name: str, start: int, stop: int) -> Tensor:
    read_rows = getattr(model, "read_rows", None)
    if read_rows is not None:
        return read_rows(name, start, stop)
    t = model[name]
    return t if t.dim() == 0 else t[start:stop]


def _shape(model: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    infos = getattr(model, "infos", None)
    return tuple(infos[name].shape) if infos is not None else tuple(model[name].shape)


def _is_float(model: Mapping[str, Tensor], name: str) -> bool:
    infos = getattr(model, "infos", None)
    dtype = infos[name].dtype if infos is not None else model[name].dtype
    return dtype.is_floating_point
