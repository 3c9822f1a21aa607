"""Merge LoRA adapters into one adapter, with PEFT's ``add_weighted_adapter`` combination types.

Every combination that merges tensors runs through deltaplane's merge engine (:func:`deltaplane.merging.merge`
with its task-arithmetic methods); this module only decides *which* tensors are merged and how the result is
factored again:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` merge the factors: all ``A`` together
  and all ``B`` together, adapter ``i`` weighted by ``√|wᵢ sᵢ|`` (the sign of ``wᵢ`` on ``A`` only; ``sᵢ`` its
  scaling). Cheap, but ``(Σ Bᵢ)(Σ Aᵢ)`` is not ``Σ BᵢAᵢ``: cross terms ``BᵢAⱼ`` appear (PEFT calls ``linear`` "a very
  rough approximation"). All adapters need the same rank.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` merge the full changes
  ``ΔWᵢ = sᵢ BᵢAᵢ`` with weights ``wᵢ``, then factor the result by a truncated SVD to ``svd_rank`` (default: the
  largest input rank): ``B = U_r Σ_r``, ``A = V_rᵀ``. Exact up to the truncation.
- ``cat`` concatenates ``A = [w₁s₁A₁; w₂s₂A₂; …]`` and ``B = [B₁ B₂ …]``: ``B A = Σ wᵢ sᵢ BᵢAᵢ`` exactly, at the
  sum of the ranks.

Bias changes (``lora_B.bias``) are vectors: ``wᵢ sᵢ bᵢ`` are combined like the full changes (exactly summed by
``linear``, ``svd`` and ``cat``), never dropped.

The merged adapter has ``α = r`` (scaling 1), as PEFT writes it. Where PEFT's numbers and ours can differ, by
design: TIES elects the sign on the *weighted* trimmed vectors (as mergekit and our full-model merge do) while
PEFT elects on the unweighted ones — identical whenever the adapters' weights × scalings are equal; DARE's random
masks come from deltaplane's seeded per-tensor generators (reproducible, streaming-safe), not torch's global RNG.

References: Yadav et al. 2023 (TIES, https://arxiv.org/abs/2306.01708), Yu et al. 2023 (DARE,
https://arxiv.org/abs/2311.03099), PEFT's ``LoraModel.add_weighted_adapter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaplane.adapters.lora import LoRADelta, LoRALayer
from deltaplane.delta import Delta
from deltaplane.errors import AdapterError, AdapterMismatch, ConfigError, UnsupportedAdapter
from deltaplane.merging import GeneralizedTaskArithmetic, MergeMethod, get_method, merge

__all__ = ["COMBINATION_TYPES", "merge_adapters"]

_FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*_FACTOR, *_SVD, "cat")
"""The combination types, named as PEFT's ``add_weighted_adapter`` names them."""


def _method(kind: str, majority_sign_method: str) -> tuple[MergeMethod, dict]:
    """The merge-engine method (and keywords) computing PEFT's ``kind`` on pre-weighted task vectors."""
    consensus = {"total": "sum", "frequency": "count"}[majority_sign_method]
    if kind == "linear":
        return get_method("task_arithmetic"), {}
    if kind == "magnitude_prune":
        # Σᵢ prune(τᵢ): TIES' trim without the sign election (no registered mergekit name; built, not registered)
        return GeneralizedTaskArithmetic(
            name="magnitude_prune", sparsification="magnitude", consensus=None, default_normalize=False,
            default_rescale=False, paper="PEFT magnitude_prune", url="https://github.com/huggingface/peft",
        ), {}  # fmt: skip
    sparsification = "magnitude" if kind == "ties" else "random"
    if kind == "dare_linear":
        # PEFT rescales DARE's survivors by 1/density (mergekit's default rescale keeps the L1 norm instead)
        return get_method("dare_linear"), {"rescale": True, "rescale_norm": "density"}
    method = (
        get_method(kind)
        if consensus == "sum"
        else GeneralizedTaskArithmetic(
            name=f"{kind}_frequency", sparsification=sparsification, consensus="count", default_normalize=True,
            default_rescale=kind == "dare_ties", paper="TIES with a majority-count sign election",
            url="https://arxiv.org/abs/2306.01708",
        )
    )  # fmt: skip
    # the disjoint mean over agreeing entries: with pre-weighted inputs and unit weights, the divisor is the count
    return method, {"normalize": True, "rescale": kind == "dare_ties", "rescale_norm": "density"}


def _combine(
    name: str, tensors: list[Tensor], kind: str, density: float | None, sign_method: str, seed: int
) -> Tensor:
    """Merge pre-weighted task vectors through the merge engine."""
    method, kwargs = _method(kind, sign_method)
    if kind != "linear":
        if density is None:
            raise ConfigError(f"combination_type '{kind}' needs a density (0 < density ≤ 1)")
        kwargs["density"] = density
    if kind.startswith("dare"):
        kwargs["seed"] = seed
    models = [Delta({name: t}) for t in tensors]
    out = merge(method, None, models, weights=[1.0] * len(models), **kwargs)
    return out[name]


def _ranks_equal(layers: list[LoRALayer], name: str, kind: str) -> None:
    ranks = [layer.rank for layer in layers]
    if len(set(ranks)) > 1:
        raise AdapterMismatch(
            f"layer '{name}': combination_type '{kind}' merges the factors and needs equal ranks. Found {ranks}; "
            "use 'svd' or 'cat' for adapters of different ranks"
        )


def _svd_factors(delta: Tensor, rank: int, clamp: float | None) -> tuple[Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(delta.float() if delta.dtype != torch.float64 else delta, full_matrices=False)
    rank = min(rank, s.numel())
    B = u[:, :rank] * s[:rank]
    A = vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.to(delta.dtype), B.to(delta.dtype)


def _merged_bias(
    name: str,
    present: list[tuple[LoRALayer, float]],
    kind: str,
    density: float | None,
    sign_method: str,
    seed: int,
) -> Tensor | None:
    """The merged layer's ``lora_B.bias`` (``lora_bias``), or ``None`` when no adapter changes the bias.

    A bias change ``sᵢ bᵢ`` is a plain vector, not a product of factors, so the changes ``wᵢ sᵢ bᵢ`` are combined
    as the full changes are (``cat`` and ``svd`` sum them exactly; ``ties``/``dare``/``magnitude_prune`` and
    their ``_svd`` forms trim them the same way); an adapter that leaves the bias alone counts as zero. The
    merged layer has scaling 1, so the result is the bias change itself."""
    if all(layer.bias is None for layer, _ in present):
        return None
    out_rows = present[0][0].B.shape[0]
    changes: list[Tensor] = []
    for layer, w in present:
        bias = layer.delta_bias()  # None exactly when layer.bias is
        changes.append(w * bias if bias is not None else torch.zeros(out_rows, dtype=layer.B.dtype))
    bias_kind = "linear" if kind in ("cat", "svd") else kind.removesuffix("_svd")
    return _combine(name + ".bias", changes, bias_kind, density, sign_method, seed).contiguous()


def merge_adapters(
    adapters: Sequence[LoRADelta],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> LoRADelta:
    """Merge ``adapters`` with ``weights`` into one adapter (PEFT's ``add_weighted_adapter``, see module docs).

    A layer present in only some adapters is merged from those (as PEFT does). Weights may be negative.

    Raises:
        ConfigError: unknown combination type, weights not one per adapter, missing density, bad svd_rank.
        AdapterMismatch: factor-merging types on adapters of different ranks, or layers of different shapes.
        UnsupportedAdapter: an adapter carries ``modules_to_save`` (full tensors have no factors to merge; merge
            them with :func:`deltaplane.merging.merge` and drop them with ``adapter.replace(modules_to_save={})``).
    """
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(
            f"unknown combination_type '{combination_type}'. Known: {', '.join(COMBINATION_TYPES)}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(
            f"majority_sign_method must be 'total' or 'frequency'. Found {majority_sign_method!r}"
        )
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("merge_adapters: no adapters given")
    if len(weights) != len(adapters):
        raise ConfigError(f"merge_adapters: {len(weights)} weights for {len(adapters)} adapters")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a positive integer. Found {svd_rank!r}")
    for i, a in enumerate(adapters):
        if a.modules_to_save:
            raise UnsupportedAdapter(
                f"adapter {i} carries full tensors {sorted(a.modules_to_save)[:3]} (modules_to_save); merge them "
                "with deltaplane.merging.merge and pass adapter.replace(modules_to_save={}) here"
            )
    kind = "linear" if len(adapters) == 1 and combination_type in _FACTOR else combination_type
    names = list(dict.fromkeys(n for a in adapters for n in a))
    out: dict[str, LoRALayer] = {}
    for name in names:
        present = [(a[name], float(w)) for a, w in zip(adapters, weights, strict=True) if name in a]
        layers = [layer for layer, _ in present]
        shapes = {layer.shape for layer in layers}
        if len(shapes) > 1 or len({(la.embedding, la.fan_in_fan_out) for la in layers}) > 1:
            raise AdapterMismatch(
                f"layer '{name}': the adapters disagree on its shape or layout: {sorted(shapes)}"
            )
        ref = layers[0]
        if kind == "cat":
            A = torch.cat([w * la.scaling * la.A for la, w in present], dim=0)
            B = torch.cat([la.B for la, _ in present], dim=1)
        elif kind in _FACTOR:
            _ranks_equal(layers, name, kind)
            wa, wb = [], []
            for la, w in present:
                ws = w * la.scaling
                wa.append(math.copysign(math.sqrt(abs(ws)), ws))
                wb.append(math.sqrt(abs(ws)))
            A = _combine(name + ".A", [w * la.A for (la, _), w in zip(present, wa, strict=True)], kind, density,
                         majority_sign_method, seed)  # fmt: skip
            B = _combine(name + ".B", [w * la.B for (la, _), w in zip(present, wb, strict=True)], kind, density,
                         majority_sign_method, seed)  # fmt: skip
        else:
            base_kind = "linear" if kind == "svd" else kind.removesuffix("_svd")
            deltas = [w * la.delta_weight() for la, w in present]
            dw = _combine(name, deltas, base_kind, density, majority_sign_method, seed)
            if ref.transposed:
                dw = dw.T
            rank = svd_rank or max(adapter[name].rank for adapter in adapters if name in adapter)
            A, B = _svd_factors(dw, rank, svd_clamp)
        if not A.is_contiguous() or not B.is_contiguous():
            A, B = A.contiguous(), B.contiguous()
        out[name] = LoRALayer(
            A.to(ref.A.dtype), B.to(ref.B.dtype), alpha=float(A.shape[0]), embedding=ref.embedding,
            fan_in_fan_out=ref.fan_in_fan_out, bias=_merged_bias(name, present, kind, density, majority_sign_method,
                                                                 seed),
        )  # fmt: skip
    if not out:
        raise AdapterError("merge_adapters: the adapters hold no layers")
    return LoRADelta(out, base_model=adapters[0].base_model, task_type=adapters[0].task_type)
