"""SCE: select, calculate, erase — task vectors weighted by their own energy.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990, §3.3, as mergekit
implements it, per tensor with task vectors ``τᵢ = θᵢ − θ₀``:

1. **Select**: keep the ``select_topk`` fraction of entries (of those where the models differ at all) with the
   largest variance across models, ``Var_i(τᵢ)``; the rest are zeroed in every task vector.
2. **Calculate**: weight model ``i`` by its share of the energy, ``wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)`` (uniform when
   every task vector is zero).
3. **Erase**: elect a sign per entry as TIES does (``sgn Σᵢ τᵢ``) and drop the entries that disagree; the merge is
   ``θ₀ + Σᵢ wᵢ mᵢ τᵢ / max(Σᵢ wᵢ mᵢ, 1e-6)``.

Chunked merging: read-only passes count the entries with non-zero variance, find the exact top-k variance threshold
(radix selection, as TIES), and sum each model's ``τᵢ²`` after selection; then each chunk is merged elementwise.
Ties at the variance threshold go to the lower flat index (mergekit's ``torch.topk`` leaves them unspecified).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltaplane.merging.base import (
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    in_closed_unit_interval,
    register_method,
)
from deltaplane.merging.task_arithmetic import TopK, select_largest

__all__ = ["Sce"]


def _variance(taus: list[Tensor]) -> Tensor:
    """Population variance across models, elementwise, in float32 (float64 for float64 inputs)."""
    dt = torch.float64 if taus[0].dtype == torch.float64 else torch.float32
    mean = torch.zeros(taus[0].shape, dtype=dt)
    for t in taus:
        mean.add_(t.to(dt))
    mean.div_(len(taus))
    var = torch.zeros_like(mean)
    for t in taus:
        var.add_((t.to(dt) - mean).square_())
    return var.div_(len(taus))


@dataclass
class _SceState:
    select: TopK | None
    """The top-k rule on the variance (``None``: keep everything)."""
    keep_none: bool
    weights: list[float]


class Sce(ChunkedMergeMethod):
    """Variance-selected, energy-weighted, sign-consensus merge of task vectors (see the module docstring)."""

    name = "sce"
    float64_sums = "each model's squared task-vector norm (its weight)"
    paper = "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE)"
    url = "https://arxiv.org/abs/2408.07990"
    needs_base = True
    params = (
        Param("select_topk", 1.0, check=in_closed_unit_interval,
              doc="fraction of entries (by variance across models) kept"),
        Param("int8_mask", False, kind="bool", doc="store sign masks as int8 (same result; masks are bool here)"),
    )  # fmt: skip

    def _taus(self, chunk: TensorChunk) -> list[Tensor]:
        assert chunk.base is not None
        return [torch.sub(t, chunk.base) for t in chunk.tensors]

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        topk = params.shared["select_topk"]
        select: TopK | None = None
        keep_none = False
        if topk < 1:
            nonzero = sum(int(torch.count_nonzero(_variance(self._taus(c)))) for c in chunks())
            k = int(nonzero * topk)
            if k == 0:
                keep_none = True
            else:

                def variances() -> Iterator[tuple[int, Tensor]]:
                    for c in chunks():
                        yield 0, _variance(self._taus(c))

                select = select_largest(variances, [[k]])[0][0]
        n = math.prod(shape)
        energy = [0.0] * len(params.per_model)
        if not keep_none:
            rule = select.fresh() if select is not None else None
            for c in chunks():
                taus = self._taus(c)
                keep = rule.mask(_variance(taus)) if rule is not None else None
                for i, t in enumerate(taus):
                    t = t.double()
                    if keep is not None:
                        t.mul_(keep)
                    energy[i] += float(t.square_().sum())
        means = [e / n if n else 0.0 for e in energy]
        total = sum(means)
        weights = [1 / len(means)] * len(means) if abs(total) < 1e-6 else [m / total for m in means]
        return _SceState(select, keep_none, weights)

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        base = chunk.base
        assert base is not None
        cdt = base.dtype
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        taus = [t.sub_(base) for t in chunk.tensors]
        if state.keep_none:
            return base.clone()
        if state.select is not None:
            keep = state.select.mask(_variance(taus))
            for t in taus:
                t.mul_(keep)
            del keep
        votes = torch.zeros(base.shape, dtype=acc)
        for t in taus:
            votes.add_(t)
        positive = votes >= 0
        del votes
        num = torch.zeros(base.shape, dtype=acc)
        den = torch.zeros(base.shape, dtype=acc)
        for w, t in zip(state.weights, taus, strict=True):
            agree = torch.where(positive, t > 0, t < 0).to(acc).mul_(w)
            num.addcmul_(t.to(acc), agree)
            den.add_(agree)
        return base + (num / den.clamp_(min=1e-6)).to(cdt)


register_method(Sce(), replace=True)
