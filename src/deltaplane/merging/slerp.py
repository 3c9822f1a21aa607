"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985, "Animating rotation with quaternion curves", https://doi.org/10.1145/325165.325242, applied to
weights as popularised by mergekit: each tensor pair is treated as two vectors; with
``Ω = arccos(⟨v₀/‖v₀‖, v₁/‖v₁‖⟩)`` the result is ``sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁``. When the
vectors are (anti)colinear — ``|cos Ω|`` above ``dot_threshold`` — ``sin Ω`` vanishes and the formula is
ill-conditioned, so the tensor falls back to linear interpolation ``(1−t) v₀ + t v₁``. A zero vector is taken as
orthogonal to the other (``Ω = π/2``), as mergekit does.

Endpoints: ``base`` → the single model (mergekit's layout: ``base_model`` plus one other model), or, without a
base, the first → the second model.

Chunked merging: one read-only pass accumulates ``‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩`` in float64, then each chunk is a fixed
linear combination of its two inputs. The sums are reductions, so a chunked result can differ from a
whole-tensor one in the last bit of the coefficients (float64), which almost never reaches the float32 output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import (
    REQUIRED,
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    register_method,
)

__all__ = ["NuSlerp", "Slerp", "nuslerp_coefficients", "slerp", "slerp_coefficients"]


def slerp_coefficients(
    t: float,
    norm0_sq: float,
    norm1_sq: float,
    dot: float,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> tuple[float, float] | None:
    """``(c₀, c₁)`` with ``slerp = c₀ v₀ + c₁ v₁`` from the squared norms and dot product; ``None`` → interpolate
    linearly ((anti)colinear vectors make ``sin Ω`` vanish).

    A vector of norm at most ``eps`` (a zero-initialised bias) is not normalised — its norm counts as 1, as in
    mergekit's ``slerp`` — so its dot product with the other is about 0, ``Ω = π/2`` and the result is
    ``cos(πt/2) v₀ + sin(πt/2) v₁``, not a linear interpolation.
    """
    n0, n1 = math.sqrt(norm0_sq), math.sqrt(norm1_sq)
    n0, n1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return None
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


def _pair_sums(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float, float]:
    n0 = n1 = dot = 0.0
    for a, b in pairs:
        a, b = a.reshape(-1).double(), b.reshape(-1).double()
        n0 += float(a @ a)
        n1 += float(b @ b)
        dot += float(a @ b)
    return n0, n1, dot


def _combine(t: float, coef: tuple[float, float] | None, v0: Tensor, v1: Tensor) -> Tensor:
    if coef is None:
        return torch.lerp(v0, v1, t)
    return coef[0] * v0 + coef[1] * v1


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two same-shaped tensors viewed as flat vectors; linear when colinear."""
    coef = slerp_coefficients(t, *_pair_sums([(v0, v1)]), dot_threshold=dot_threshold, eps=eps)
    return _combine(t, coef, v0, v1)


class Slerp(ChunkedMergeMethod):
    """Per-tensor SLERP of two models with interpolation factor ``t`` (0 → first endpoint, 1 → second)."""

    name = "slerp"
    float64_sums = "the norms and the dot product of the two inputs"
    paper = "Shoemake 1985, Animating rotation with quaternion curves"
    url = "https://doi.org/10.1145/325165.325242"
    min_models = 1
    max_models = 2
    optional_base = True
    upcasts_half = True
    params = (
        # mergekit takes any t: outside [0, 1] the same formula extrapolates along the arc
        Param("t", REQUIRED, doc="interpolation factor, 0 = first, 1 = second (beyond: extrapolated, as mergekit)"),
        Param("dot_threshold", 0.9995, check=lambda x: None if 0 < x <= 1 else "must be in (0, 1]",
              doc="|cos Ω| above which the tensors count as colinear and are interpolated linearly"),
    )  # fmt: skip

    def check_models(self, n_models: int, has_base: bool) -> None:
        if n_models + int(has_base) != 2:
            raise ConfigError(
                "merge method 'slerp' interpolates exactly two models: a base and one model, or two models "
                f"without a base. Found {n_models} model(s) {'with' if has_base else 'without'} a base"
            )

    @staticmethod
    def _ends(chunk: TensorChunk) -> tuple[Tensor, Tensor]:
        return (
            (chunk.base, chunk.tensors[0]) if chunk.base is not None else (chunk.tensors[0], chunk.tensors[1])
        )

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        sums = _pair_sums(self._ends(c) for c in chunks())
        return slerp_coefficients(params.shared["t"], *sums, dot_threshold=params.shared["dot_threshold"])

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        v0, v1 = self._ends(chunk)
        return _combine(chunk.params.shared["t"], state, v0, v1)


register_method(Slerp(), replace=True)


def nuslerp_coefficients(
    t: float, norm0_sq: float, norm1_sq: float, dot: float, eps: float = 1e-8
) -> tuple[float, float]:
    """``(c₀, c₁)`` with ``nuslerp = c₀ v₀ + c₁ v₁`` (mergekit's ``nuslerp``): norms floored at 1e-7, linear only
    when ``1 − cos² ≤ eps²``."""
    n0, n1 = max(math.sqrt(norm0_sq), 1e-7), max(math.sqrt(norm1_sq), 1e-7)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if 1 - cos * cos <= eps * eps:
        return 1 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def _nuslerp_rows(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """NuSLERP of each vector along the last dimension (``nuslerp_flatten: false``)."""
    dt = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dt), v1.to(dt)
    au = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (au * bu).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, out).to(v0.dtype)


class NuSlerp(ChunkedMergeMethod):
    """mergekit's NuSLERP: SLERP of two models (or of their task vectors when a base is given) with the factor
    ``t = w₁ / (w₀ + w₁)`` from per-model weights.

    ``nuslerp_flatten: true`` (default) treats the tensor as one vector — one read-only pass for the norms and dot
    product, then a fixed linear combination per chunk. ``false`` interpolates each vector along the last
    dimension (rows stay whole inside a chunk; a 1-D tensor is one vector and is merged whole), and with
    ``nuslerp_row_wise: true`` along the first dimension instead (whole tensor: columns cross every chunk).
    """

    name = "nuslerp"
    float64_sums = "the norms and the dot product of the two inputs (flattened)"
    paper = "mergekit NuSLERP (SLERP of task vectors with weight-derived t), after Shoemake 1985"
    url = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    min_models = 2
    max_models = 2
    optional_base = True
    mergekit_required = ("weight",)
    params = (
        Param("weight", 1.0, per_model=True, plural="weights", doc="t = w₁ / (w₀ + w₁)"),
        Param("nuslerp_flatten", True, kind="bool", doc="interpolate the whole tensor as one vector"),
        Param("nuslerp_row_wise", False, kind="bool", doc="without flatten: vectors along dimension 0"),
    )

    @staticmethod
    def _t(params: MergeParams) -> float:
        w = params.column("weight")
        total = sum(w)
        return 0.5 if abs(total) < 1e-6 else w[1] / total

    def float64_sums_with(self, params: MergeParams) -> str:
        return self.float64_sums if params.shared["nuslerp_flatten"] else ""  # per vector: as mergekit

    def whole_tensor(self, shape: tuple[int, ...], params: MergeParams) -> bool:
        flat = params.shared["nuslerp_flatten"]
        return not flat and (params.shared["nuslerp_row_wise"] or len(shape) < 2)

    @staticmethod
    def _ends(chunk: TensorChunk) -> tuple[Tensor, Tensor]:
        a, b = chunk.tensors
        if chunk.base is not None:
            return a - chunk.base, b - chunk.base
        return a, b

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        if not params.shared["nuslerp_flatten"]:
            return None
        return nuslerp_coefficients(self._t(params), *_pair_sums(self._ends(c) for c in chunks()))

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        v0, v1 = self._ends(chunk)
        t = self._t(chunk.params)
        if state is not None:
            out = state[0] * v0 + state[1] * v1
        elif chunk.params.shared["nuslerp_row_wise"]:
            out = _nuslerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
        else:
            out = _nuslerp_rows(t, v0, v1)
        return out + chunk.base if chunk.base is not None else out


register_method(NuSlerp(), replace=True)
