"""Model Stock: interpolate the average of fine-tuned models toward the base by their angle.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522, eq. (2): per layer, with ``cos θ`` the mean pairwise cosine between the task
vectors ``θᵢ − θ₀`` of ``N`` fine-tuned models,
``t = N cos θ / (1 + (N − 1) cos θ)`` and ``θ = t · mean(θᵢ) + (1 − t) · θ₀``.
With ``filter_wise`` the angle and ``t`` are computed per output row instead of per tensor.

Chunked merging: per tensor, one read-only pass accumulates the task vectors' squared norms and pairwise dot
products in float64 (reductions: a chunked result may differ from a whole-tensor one in the last bits); with
``filter_wise`` every row is whole inside its chunk, so no pass is needed.
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

__all__ = ["ModelStock"]


class ModelStock(ChunkedMergeMethod):
    """``θ₀ + t (mean θᵢ − θ₀)`` with ``t`` from the mean pairwise angle of the task vectors."""

    name = "model_stock"
    float64_sums = "the norms and dot products of the task vectors"
    paper = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"
    url = "https://arxiv.org/abs/2403.19522"
    needs_base = True
    min_models = 2
    params = (Param("filter_wise", False, kind="bool", doc="one angle per output row instead of per tensor"),)

    @staticmethod
    def _interpolation(cos_theta: Tensor, n: int) -> Tensor:
        """Eq. (2): ``t = N cos θ / (1 + (N − 1) cos θ)``; 0 (keep the base) where opposing vectors make it singular."""
        denom = 1 + (n - 1) * cos_theta
        singular = denom.abs() < 1e-12
        return torch.where(
            singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denom)
        )

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        if params.shared["filter_wise"] and len(shape) > 1:
            return None  # one angle per row, computed inside each chunk
        n = len(params.per_model)
        sq = [0.0] * n
        dots: dict[tuple[int, int], float] = {}
        for chunk in chunks():
            assert chunk.base is not None
            w0 = chunk.base.reshape(-1).double()
            offs = [t.reshape(-1).double() - w0 for t in chunk.tensors]
            for i, a in enumerate(offs):
                sq[i] += float(a @ a)
                for j in range(i + 1, n):
                    dots[(i, j)] = dots.get((i, j), 0.0) + float(a @ offs[j])
        cos = [
            max(-1.0, min(1.0, d / max((sq[i] * sq[j]) ** 0.5, 1e-12))) for (i, j), d in sorted(dots.items())
        ]
        return float(self._interpolation(torch.tensor(sum(cos) / len(cos), dtype=torch.float64), n))

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        base = chunk.base
        assert base is not None
        n = len(chunk.tensors)
        if base.numel() == 0:
            return base
        if state is None:  # filter-wise: (rows, -1) view, one angle and one t per row
            w0 = base.reshape(base.shape[0], -1)
            offsets = [t.reshape(w0.shape) - w0 for t in chunk.tensors]
            cos = []
            for i, a in enumerate(offsets):
                for b in offsets[i + 1 :]:
                    norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
                    cos.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
            t: Tensor | float = self._interpolation(
                torch.stack(cos).mean(dim=0).unsqueeze(-1), n
            )  # (rows, 1)
        else:
            w0 = base
            offsets = [x.sub_(base) for x in chunk.tensors]
            t = state
        mean_offset = offsets[0]
        for o in offsets[1:]:
            mean_offset.add_(o)
        mean_offset.div_(n)
        return (w0 + t * mean_offset).reshape(base.shape)


register_method(ModelStock(), replace=True)
