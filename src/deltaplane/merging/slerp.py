"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985, "Animating rotation with quaternion curves", https://doi.org/10.1145/325165.325242, applied to
weights as popularised by mergekit: each tensor pair is treated as two vectors; with
``Ω = arccos(⟨v₀/‖v₀‖, v₁/‖v₁‖⟩)`` the result is ``sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁``. When the
vectors are (anti)colinear — ``|cos Ω|`` above ``dot_threshold`` — ``sin Ω`` vanishes and the formula is
ill-conditioned, so the tensor falls back to linear interpolation ``(1−t) v₀ + t v₁``.

Endpoints: ``base`` → the single model (mergekit's layout: ``base_model`` plus one other model), or, without a
base, the first → the second model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import (
    REQUIRED,
    MergeMethod,
    MergeParams,
    Param,
    in_closed_unit_interval,
    register_method,
)

__all__ = ["Slerp", "slerp"]


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two same-shaped tensors viewed as flat vectors; linear when colinear."""
    n0, n1 = float(v0.norm()), float(v1.norm())
    if n0 < eps or n1 < eps:  # a zero vector has no direction: interpolate linearly
        return torch.lerp(v0, v1, t)
    dot = float((v0 / n0).reshape(-1) @ (v1 / n1).reshape(-1))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        return torch.lerp(v0, v1, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * v0 + (math.sin(t * omega) / s) * v1


class Slerp(MergeMethod):
    """Per-tensor SLERP of two models with interpolation factor ``t`` (0 → first endpoint, 1 → second)."""

    name = "slerp"
    paper = "Shoemake 1985, Animating rotation with quaternion curves"
    url = "https://doi.org/10.1145/325165.325242"
    min_models = 1
    max_models = 2
    params = (
        Param("t", REQUIRED, check=in_closed_unit_interval, doc="interpolation factor, 0 = first, 1 = second"),
        Param("dot_threshold", 0.9995, check=lambda x: None if 0 < x <= 1 else "must be in (0, 1]",
              doc="|cos Ω| above which the tensors count as colinear and are interpolated linearly"),
    )  # fmt: skip

    def check_models(self, n_models: int, has_base: bool) -> None:
        if n_models + int(has_base) != 2:
            raise ConfigError(
                "merge method 'slerp' interpolates exactly two models: a base and one model, or two models "
                f"without a base. Found {n_models} model(s) {'with' if has_base else 'without'} a base"
            )

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], params: MergeParams
    ) -> Tensor:
        v0, v1 = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
        return slerp(params.shared["t"], v0, v1, dot_threshold=params.shared["dot_threshold"])


register_method(Slerp(), replace=True)
