"""Linear merge (weighted average of weights, "model soup").

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", https://arxiv.org/abs/2203.05482: ``θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ`` (or the plain weighted
sum with ``normalize: false``). The base model, if given, is not part of the average unless listed as a model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import ChunkedMergeMethod, MergeParams, Param, TensorChunk, register_method

__all__ = ["Linear"]


class Linear(ChunkedMergeMethod):
    """Weighted average ``Σ wᵢ θᵢ / Σ wᵢ``."""

    name = "linear"
    paper = "Wortsman et al. 2022, Model soups"
    url = "https://arxiv.org/abs/2203.05482"
    upcasts_half = True
    mergekit_required = ("weight",)
    params = (
        Param("weight", 1.0, per_model=True, plural="weights", doc="weight of this model"),
        Param("normalize", True, kind="bool", doc="divide by the sum of weights"),
    )

    def check_params(self, params: MergeParams, where: str) -> None:
        """Refuse normalizing by a sum of 0: it would divide by zero (mergekit yields Inf/NaN), and skipping the
        division would silently give an all-zero model (weights 0, 0) or a plain difference (1, −1)."""
        if params.shared["normalize"] and abs(sum(params.column("weight"))) <= 1e-12:
            raise ConfigError(
                f"{where}: linear weights sum to 0 ({params.column('weight')}); set normalize: false or change the "
                "weights"
            )

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        params, tensors = chunk.params, chunk.tensors
        weights = params.column("weight")
        out = torch.zeros_like(tensors[0])
        for w, t in zip(weights, tensors, strict=True):
            out.add_(t, alpha=w)
        total = sum(weights)
        if params.shared["normalize"]:
            out /= total  # never 0: check_params refuses it
        return out


register_method(Linear(), replace=True)
