"""Model Stock: interpolate the average of fine-tuned models toward the base by their angle.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522, eq. (2): per layer, with ``cos θ`` the mean pairwise cosine between the task
vectors ``θᵢ − θ₀`` of ``N`` fine-tuned models,
``t = N cos θ / (1 + (N − 1) cos θ)`` and ``θ = t · mean(θᵢ) + (1 − t) · θ₀``.
With ``filter_wise`` the angle and ``t`` are computed per output row instead of per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaplane.merging.base import MergeMethod, MergeParams, Param, register_method

__all__ = ["ModelStock"]


class ModelStock(MergeMethod):
    """``θ₀ + t (mean θᵢ − θ₀)`` with ``t`` from the mean pairwise angle of the task vectors."""

    name = "model_stock"
    paper = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"
    url = "https://arxiv.org/abs/2403.19522"
    needs_base = True
    min_models = 2
    params = (Param("filter_wise", False, kind="bool", doc="one angle per output row instead of per tensor"),)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], params: MergeParams
    ) -> Tensor:
        assert base is not None
        shape = base.shape
        rows = params.shared["filter_wise"] and base.dim() >= 1
        w0 = base.reshape(shape[0], -1) if rows and base.dim() > 1 else base.reshape(1, -1)
        offsets = [t.reshape(w0.shape) - w0 for t in tensors]
        cos = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
                cos.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
        cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # (rows, 1)
        n = len(tensors)
        denom = 1 + (n - 1) * cos_theta
        singular = denom.abs() < 1e-12  # opposing task vectors: no finite estimate, keep the base
        t = torch.where(
            singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denom)
        )
        mean_offset = torch.stack(offsets).mean(dim=0)
        return (w0 + t * mean_offset).reshape(shape)


register_method(ModelStock(), replace=True)
