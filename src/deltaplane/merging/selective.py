"""Entry-wise choice between a base and one model: NearSwap and Arcee Fusion.

- ``nearswap`` — alchemonaut 2024, NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as in
  mergekit: take the model's value where it is close to the base, ``w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1)``,
  ``θ = w θ₁ + (1 − w) θ₀``. Elementwise: chunked with no statistics.
- ``arcee_fusion`` — Arcee AI 2025, Arcee Fusion (https://arcee.ai, mergekit's ``arcee_fusion``): importance
  ``|θ₁ − θ₀| · KL(softmax θ₁ ‖ softmax θ₀)`` (softmax and KL along the last dimension, +1e-8), and the model's
  value is taken only where the importance reaches ``median + 1.5 · IQR`` of the tensor's importances. The three
  quantiles are exact order statistics (``sorted[int(q (n − 1))]``) found by radix selection over the chunks;
  mergekit sorts a random sample of 1,000,000 entries for larger tensors, so there it is approximate (and random).
  Rows along the last dimension stay whole inside a chunk; a 1-D tensor is one softmax and is merged whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deltaplane.merging.base import (
    REQUIRED,
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    non_negative,
    register_method,
)
from deltaplane.merging.task_arithmetic import select_largest

__all__ = ["ArceeFusion", "NearSwap", "fusion_importance"]


class NearSwap(ChunkedMergeMethod):
    """``w θ₁ + (1 − w) θ₀`` with ``w = clamp(t / |θ₀ − θ₁|, 0, 1)`` per entry."""

    name = "nearswap"
    paper = "alchemonaut 2024, NearSwap (mergekit's nearswap)"
    url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    needs_base = True
    min_models = 1
    max_models = 1
    params = (
        Param("t", REQUIRED, check=non_negative, doc="distance below which the model's value is taken"),
    )

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        a, b = chunk.base, chunk.tensors[0]
        assert a is not None
        w = (chunk.params.shared["t"] / (a - b).abs().clamp_(min=1e-6)).clamp_(0, 1)
        return w * b + (1 - w) * a


def fusion_importance(model: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance ``|θ₁ − θ₀| · KL(softmax θ₁ ‖ softmax θ₀)`` (KL per vector along the last dim)."""
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def _quantile_ranks(n: int) -> list[int]:
    # sorted ascending, index int(q (n − 1)) is the (n − index)-th largest
    return [n - int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]


class ArceeFusion(ChunkedMergeMethod):
    """Keep the model's entries whose importance is an upper outlier (Tukey fence); the base elsewhere."""

    name = "arcee_fusion"
    paper = "Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion)"
    url = "https://arcee.ai"
    needs_base = True
    min_models = 1
    max_models = 1
    params = ()

    def whole_tensor(self, shape: tuple[int, ...], params: MergeParams) -> bool:
        return len(shape) < 2  # one softmax over the whole vector

    @staticmethod
    def _importance(chunk: TensorChunk) -> Tensor:
        assert chunk.base is not None
        dt = torch.float64 if chunk.base.dtype == torch.float64 else torch.float32
        return fusion_importance(chunk.tensors[0].to(dt), chunk.base.to(dt))

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        n = 1
        for s in shape:
            n *= s
        if n == 0:
            return None

        def passes() -> Iterator[tuple[int, Tensor]]:
            for c in chunks():
                yield 0, self._importance(c)

        # importances are ≥ 0 up to rounding (the KL of nearly equal rows can round below zero): signed selection
        q1, median, q3 = (tk.value for tk in select_largest(passes, [_quantile_ranks(n)], signed=True)[0])
        return median + 1.5 * (q3 - q1)

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        base = chunk.base
        assert base is not None
        if state is None:
            return base
        keep = self._importance(chunk) >= state
        return base + (chunk.tensors[0] - base) * keep


register_method(NearSwap(), replace=True)
register_method(ArceeFusion(), replace=True)
