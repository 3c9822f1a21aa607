"""Fisher-weighted averaging with a diagonal Fisher estimated from data.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", https://arxiv.org/abs/2111.09832,
eq. (3): ``θ*ⱼ = Σᵢ λᵢ Fᵢⱼ θᵢⱼ / Σᵢ λᵢ Fᵢⱼ`` where ``Fᵢ`` is the diagonal of model ``i``'s Fisher information,
``Fⱼ = E_x E_{y∼p(y|x)} [(∂ log p(y|x) / ∂θⱼ)²]``. :func:`diagonal_fisher` computes that expectation exactly over
the classes (or the "empirical" Fisher with the true labels); a small ``epsilon`` is added to every Fisher value
so entries that no model's data touches fall back to the plain weighted average instead of 0/0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.errors import ConfigError, ShapeMismatch
from deltaplane.merging.base import (
    REQUIRED,
    ChunkedMergeMethod,
    Param,
    TensorChunk,
    positive,
    register_method,
)

__all__ = ["FisherMerge", "diagonal_fisher"]


def diagonal_fisher(
    model: nn.Module,
    inputs: Tensor,
    *,
    labels: Tensor | None = None,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of a classifier, averaged over ``inputs``.

    With ``labels=None`` this is the true Fisher of the paper — the expectation over the model's own predictive
    distribution, computed exactly with per-example Jacobians of ``log p(·|x)`` (``torch.func``). With
    ``labels`` it is the empirical Fisher (squared per-example gradients of the true-label log-likelihood).

    The model runs in eval mode (batch-norm uses its running statistics, as at merge time). Buffers (batch-norm
    statistics, counters) have no gradient; floating buffers get a Fisher of ones, so Fisher merging averages
    them with the plain model weights.

    Returns:
        ``name -> tensor`` for every floating-point entry of ``model.state_dict()``, in float32.
    """
    from torch.func import functional_call, jacrev, vmap

    if inputs.shape[0] == 0:
        raise ConfigError("diagonal_fisher needs at least one input example")
    if labels is not None and labels.shape[0] != inputs.shape[0]:
        raise ShapeMismatch(f"labels has {labels.shape[0]} rows for {inputs.shape[0]} inputs")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive. Found {batch_size}")
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}

    def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.log_softmax(functional_call(model, (p, buffers), (x.unsqueeze(0),)), dim=-1).squeeze(0)

    def label_log_prob(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return log_probs(p, x).gather(0, y.reshape(1)).squeeze(0)

    try:
        for start in range(0, inputs.shape[0], batch_size):
            xb = inputs[start : start + batch_size]
            if labels is None:
                with torch.no_grad():
                    probs = torch.softmax(model(xb), dim=-1)  # (B, K)
                jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, xb)  # name -> (B, K, *shape)
                for k, j in jac.items():
                    w = probs.reshape(*probs.shape, *([1] * (j.dim() - 2)))
                    fisher[k] += (w * j.pow(2)).sum(dim=(0, 1)).float()
            else:
                from torch.func import grad

                g = vmap(grad(label_log_prob), in_dims=(None, 0, 0))(
                    params, xb, labels[start : start + batch_size]
                )
                for k, j in g.items():
                    fisher[k] += j.pow(2).sum(dim=0).float()
    finally:
        model.train(was_training)
    n = inputs.shape[0]
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if k in fisher:
            out[k] = fisher[k] / n
        elif v.is_floating_point():
            out[k] = torch.ones_like(v, dtype=torch.float32)
    return out


class FisherMerge(ChunkedMergeMethod):
    """``Σ λᵢ (Fᵢ + ε) θᵢ / Σ λᵢ (Fᵢ + ε)`` elementwise (so chunked merging is exact)."""

    name = "fisher"
    paper = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging"
    url = "https://arxiv.org/abs/2111.09832"
    min_models = 1
    params = (
        Param("fisher", REQUIRED, per_model=True, kind="tensors", plural="fishers",
              doc="diagonal Fisher of this model (name -> tensor, or a safetensors file)"),
        Param("weight", 1.0, per_model=True, plural="weights", check=lambda x: None if x >= 0 else "must be >= 0",
              doc="λᵢ, the model's weight"),
        Param("epsilon", 1e-8, check=positive, doc="added to every Fisher value (the paper's floor)"),
    )  # fmt: skip

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        name, tensors, params = chunk.name, chunk.tensors, chunk.params
        eps = params.shared["epsilon"]
        num = torch.zeros_like(tensors[0])
        den = torch.zeros_like(tensors[0])
        for i, (t, mp) in enumerate(zip(tensors, params.per_model, strict=True)):
            f = mp["fisher"]
            if tuple(f.shape) != tuple(t.shape):
                raise ShapeMismatch(
                    f"tensor '{name}': Fisher of model {i} has shape {tuple(f.shape)}, the weight {tuple(t.shape)}"
                )
            wf = (f.to(t.dtype) + eps) * mp["weight"]
            num.addcmul_(wf, t)
            den.add_(wf)
        return num / den


register_method(FisherMerge(), replace=True)
