"""Means on the hypersphere: Multi-SLERP and the Karcher mean, computed in the span of the inputs.

Both methods take unit directions ``uᵢ = vᵢ / ‖vᵢ‖`` of the flattened tensors, find a mean direction on the sphere
and rescale it by a weighted mean of the norms. Every vector they form — the Euclidean mean of the ``uᵢ``, tangent
vectors ``uᵢ − ⟨uᵢ, m⟩ m``, exponential-map steps — is a linear combination of the inputs, so all of their
arithmetic runs on coefficient vectors with the ``N × N`` Gram matrix ``Gᵢⱼ = ⟨vᵢ, vⱼ⟩`` (float64). Chunked merging
is then one read-only pass for the Gram matrix and one linear combination per chunk: memory ``O(chunk)``, and the
result equals the whole-tensor formula up to float64 reduction order (mergekit iterates on float32 tensors).

- ``multislerp`` — Goddard 2024, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea: project
  the units onto the tangent space at their weighted mean direction, average there, map back with the exponential
  map and scale by ``Σ wᵢ ‖vᵢ‖``. With a base model it works on task vectors ``θᵢ − θ₀``.
- ``karcher`` — the weighted Fréchet (Karcher) mean on the unit sphere, Karcher 1977, "Riemannian center of mass and
  mollifier smoothing", https://doi.org/10.1002/cpa.3160300502, by Riemannian gradient steps from the normalised
  Euclidean mean (``max_iter``, ``tol``), scaled by the mean norm; as in mergekit, every input — the base model too,
  when one is given — is averaged with equal weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import (
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    positive,
    register_method,
)

__all__ = ["Karcher", "MultiSlerp", "gram_matrix"]


def gram_matrix(vectors: list[list[Tensor]]) -> Tensor:
    """``Gᵢⱼ = ⟨vᵢ, vⱼ⟩`` in float64, from the vectors given as lists of chunks (``vectors[chunk][i]``)."""
    g: Tensor | None = None
    for parts in vectors:
        flat = torch.stack([p.reshape(-1).double() for p in parts])
        part = flat @ flat.T
        g = part if g is None else g.add_(part)
    assert g is not None
    return g


def _combine(coef: Tensor, tensors: list[Tensor]) -> Tensor:
    out = torch.zeros_like(
        tensors[0], dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    )
    for c, t in zip(coef.tolist(), tensors, strict=True):
        if c != 0:
            out.add_(t, alpha=c)
    return out


class _GramMethod(ChunkedMergeMethod):
    """A method whose result is ``Σ cᵢ vᵢ`` with ``c`` computed from the Gram matrix of the ``vᵢ``."""

    def vectors(self, chunk: TensorChunk) -> list[Tensor]:
        return list(chunk.tensors)

    def coefficients(self, gram: Tensor, params: MergeParams, name: str) -> Tensor:
        raise NotImplementedError

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        if math.prod(shape) == 0:
            return None  # nothing to merge
        return self.coefficients(gram_matrix([self.vectors(c) for c in chunks()]), params, name)

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        if state is None:
            return chunk.tensors[0]
        out = _combine(state, self.vectors(chunk))
        return out.add_(chunk.base) if chunk.base is not None and self.optional_base else out


class MultiSlerp(_GramMethod):
    """Barycentric SLERP of any number of models with per-model weights (see the module docstring)."""

    name = "multislerp"
    float64_sums = "the Gram matrix of the inputs"
    paper = "Goddard 2024, Multi-SLERP (barycentric interpolation on the hypersphere)"
    url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    optional_base = True
    mergekit_required = ("weight",)
    params = (
        Param("weight", 1.0, per_model=True, plural="weights", doc="barycentric weight of this model"),
        Param("normalize_weights", True, kind="bool", doc="divide the weights by their sum"),
        Param("eps", 1e-8, check=positive, doc="numerical floor for norms"),
    )

    def vectors(self, chunk: TensorChunk) -> list[Tensor]:
        if chunk.base is None:
            return list(chunk.tensors)
        return [t - chunk.base for t in chunk.tensors]

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        if len(chunk.tensors) == 1:  # mergekit returns the single model as it is
            return chunk.tensors[0]
        return super().merge_chunk(chunk, state)

    def coefficients(self, gram: Tensor, params: MergeParams, name: str) -> Tensor:
        n = gram.shape[0]
        eps = params.shared["eps"]
        w = torch.tensor(params.column("weight"), dtype=torch.float64)
        if n == 1:
            return torch.ones(1, dtype=torch.float64)
        if params.shared["normalize_weights"]:
            w = w / w.sum()
        norms = gram.diagonal().clamp(min=0).sqrt()
        inv = 1 / (norms + eps)  # uᵢ = vᵢ / (‖vᵢ‖ + eps)
        gu = gram * inv[:, None] * inv[None, :]  # Gram matrix of the units

        def norm(c: Tensor) -> float:
            return math.sqrt(max(float(c @ gu @ c), 0.0))

        mean = w.clone()  # coefficients on the units
        mean_norm = norm(mean)
        if mean_norm < eps:
            if n == 2:  # mergekit falls back to linear interpolation of the two vectors
                return w
            raise ConfigError(
                f"tensor '{name}': the weighted mean of the directions is zero (antipodal inputs with balancing "
                "weights); multislerp cannot merge it. Use different weights"
            )
        mean = mean / mean_norm
        dots = gu @ mean  # ⟨uᵢ, m⟩
        tangent = w - (w * dots).sum() * mean  # Σ wᵢ (uᵢ − ⟨uᵢ, m⟩ m)
        tn = norm(tangent) + eps
        result = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
        avg_norm = float((norms * w).sum())
        return result * avg_norm * inv  # back to coefficients on the vᵢ


class Karcher(_GramMethod):
    """Equal-weight Karcher mean of all inputs on the unit sphere, scaled by their mean norm."""

    name = "karcher"
    float64_sums = "the Gram matrix of the inputs"
    paper = "Karcher 1977, Riemannian center of mass and mollifier smoothing (mergekit's karcher)"
    url = "https://doi.org/10.1002/cpa.3160300502"
    averages_base = True
    params = (
        Param("max_iter", 10, kind="int", check=lambda x: None if x >= 0 else "must be non-negative",
              doc="largest number of Riemannian gradient steps"),
        Param("tol", 1e-5, check=positive, doc="stop when the tangent step is shorter; skip near-zero inputs"),
    )  # fmt: skip

    def vectors(self, chunk: TensorChunk) -> list[Tensor]:
        return ([chunk.base] if chunk.base is not None else []) + list(chunk.tensors)

    def coefficients(self, gram: Tensor, params: MergeParams, name: str) -> Tensor:
        n = gram.shape[0]
        if n == 1:
            return torch.ones(1, dtype=torch.float64)
        tol, max_iter = params.shared["tol"], params.shared["max_iter"]
        alphas = torch.full((n,), 1 / n, dtype=torch.float64)
        norms = gram.diagonal().clamp(min=0).sqrt()
        valid = norms > tol
        if not bool(valid.any()):
            return torch.zeros(n, dtype=torch.float64)
        inv = torch.where(norms > 0, 1 / norms.clamp(min=1e-300), torch.zeros_like(norms))
        gu = gram * inv[:, None] * inv[None, :]
        a = torch.where(valid, alphas, torch.zeros_like(alphas))
        a = a / a.sum()

        def norm(c: Tensor) -> float:
            return math.sqrt(max(float(c @ gu @ c), 0.0))

        mean = a.clone()
        mn = norm(mean)
        if mn < tol:
            mean = torch.zeros(n, dtype=torch.float64)
            mean[int(valid.nonzero()[0])] = 1.0
        else:
            mean = mean / mn
        for _ in range(max_iter):
            tangent = torch.zeros(n, dtype=torch.float64)
            dots = gu @ mean
            for j in valid.nonzero().flatten().tolist():
                dot = max(-1.0, min(1.0, float(dots[j])))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                step = float(a[j]) * theta / math.sin(theta)
                tangent -= step * dot * mean
                tangent[j] += step
            tn = norm(tangent)
            if tn < tol:
                break
            mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
            un = norm(mean)
            if un > tol:
                mean = mean / un
        scale = float((alphas * norms).sum())
        return scale * mean * inv


register_method(MultiSlerp(), replace=True)
register_method(Karcher(), replace=True)
