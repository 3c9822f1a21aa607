"""Reinforced Agent Merging (RAM, RAM+): task vectors averaged only over the models that changed an entry.

With ``τᵢ = θᵢ − θ₀``, ``nᵢ = [|τᵢ| > ε]`` (model ``i`` changed the entry) and ``c = Σᵢ nᵢ`` (how many did)::

    ram:         θ = θ₀ + Σᵢ nᵢ τᵢ · ([c = 1] + [c > 1] / c)
    ramplus_tl:  θ = θ₀ + Σᵢ nᵢ τᵢ · ([c = 1] λᵢ + [c > 1] / c),   λᵢ = 1 + r · clamp(ρᵢ, 0, α)

An entry only one model changed keeps that model's change whole, rather than being diluted by the models that left
it alone (a plain average would divide it by N); entries several models changed are averaged over those. RAM+
("tensor-local", mergekit's ``ramplus_tl``) boosts a model's unique entries by ``λᵢ``, where
``ρᵢ = (its shared entries) / max(its unique entries, ε)`` over the whole tensor. Both as mergekit's ``ram`` and
``ramplus_tl`` (parameters ``epsilon`` = 1e-5, ``r`` = 0.1, ``alpha`` = 0.2). Paper: "Reinforced Agent Merging",
https://arxiv.org/abs/2601.13572.

Elementwise but for RAM+'s two counts per model, which one read-only pass over the chunks sums, so both merge in
row chunks. Precision: computed in the chunk's dtype; in a half type mergekit's RAM+ multiplies the unique part
by a float32 ``λᵢ`` (its result is float32 there), so bfloat16 results agree to bfloat16 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deltaplane.merging.base import (
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    register_method,
)

__all__ = ["ReinforcedAgentMerge"]


def _changed(taus: list[Tensor], epsilon: float) -> tuple[list[Tensor], Tensor]:
    """``(nᵢ, c)`` of a chunk's task vectors: where each exceeds ``epsilon`` in magnitude, and how many do."""
    changed = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int64)
    for n in changed:
        count.add_(n)
    return changed, count


class ReinforcedAgentMerge(ChunkedMergeMethod):
    """RAM and RAM+ (tensor-local): see the module docstring.

    Args:
        name: ``"ram"`` or ``"ramplus_tl"``.
        boost: whether unique entries are scaled by ``λᵢ`` (RAM+).
    """

    needs_base = True
    paper = "Reinforced Agent Merging (mergekit's ram / ramplus_tl)"
    url = "https://arxiv.org/abs/2601.13572"

    def __init__(self, *, name: str, boost: bool) -> None:
        self.name = name
        self.boost = boost
        params = [Param("epsilon", 1e-5, doc="|τ| above which a model counts as having changed an entry")]
        if boost:
            params += [
                Param("r", 0.1, doc="strength of the boost of a model's unique entries"),
                Param("alpha", 0.2, doc="cap on the shared/unique ratio ρ in the boost"),
            ]
        self.params = tuple(params)

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        if not self.boost:
            return None
        eps = params.shared["epsilon"]
        n_models = len(params.per_model)
        shared, unique = [0] * n_models, [0] * n_models
        for chunk in chunks():
            base = chunk.base
            assert base is not None
            # read-only: in memory the chunks are views of the tensors merge_chunk receives
            changed, count = _changed([t - base for t in chunk.tensors], eps)
            for i, n in enumerate(changed):
                shared[i] += int((n & (count > 1)).sum())
                unique[i] += int((n & (count == 1)).sum())
        r, alpha = params.shared["r"], params.shared["alpha"]
        # as mergekit: ρ in float32 (an integer count over a float32 clamp), λ = 1 + r clamp(ρ, 0, α)
        rho = torch.tensor(shared, dtype=torch.float32) / torch.tensor(unique, dtype=torch.float32).clamp(
            min=eps
        )
        return (1 + r * rho.clamp(min=0, max=alpha)).tolist()

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        base = chunk.base
        assert base is not None
        taus = [t.sub_(base) for t in chunk.tensors]  # the inputs are owned by the merge
        changed, count = _changed(taus, chunk.params.shared["epsilon"])
        unique = count == 1
        overlap = count > 1
        share = count.clamp(min=1)
        merged = torch.zeros_like(base)
        for i, (tau, n) in enumerate(zip(taus, changed, strict=True)):
            tau.mul_(n)
            part = tau * unique
            if state is not None:
                part.mul_(torch.tensor(state[i], dtype=tau.dtype))
            merged.add_(part.add_(tau.mul_(overlap).div_(share)))
        return merged.add_(base)


register_method(ReinforcedAgentMerge(name="ram", boost=False), replace=True)
register_method(ReinforcedAgentMerge(name="ramplus_tl", boost=True), replace=True)
