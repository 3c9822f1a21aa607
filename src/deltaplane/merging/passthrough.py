"""Passthrough: copy one model's tensors (optionally scaled) — the building block of layer-stacking merges.

mergekit's ``passthrough`` takes exactly one input per tensor; with ``slices`` (see :mod:`deltaplane.merging.config`)
it assembles a model from layer ranges of others ("frankenmerges", e.g. SOLAR's depth up-scaling, Kim et al. 2023,
https://arxiv.org/abs/2312.15166). ``scale`` multiplies the tensor (``scale: [{filter: o_proj, value: 0}, {value: 1}]``
zeroes some projections, as depth up-scaling recipes do).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from deltaplane.merging.base import ChunkedMergeMethod, Param, TensorChunk, register_method

__all__ = ["Passthrough"]


class Passthrough(ChunkedMergeMethod):
    """The single input tensor, times ``scale`` if given."""

    name = "passthrough"
    paper = "mergekit passthrough; depth up-scaling: Kim et al. 2023, SOLAR 10.7B"
    url = "https://arxiv.org/abs/2312.15166"
    min_models = 1
    max_models = 1
    params = (
        Param("scale", None, per_model=True, doc="multiply the tensor by this (default: copy it unchanged)"),
    )

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        scale = chunk.params.per_model[0]["scale"]
        t = chunk.tensors[0]
        return t if scale is None else t * scale


register_method(Passthrough(), replace=True)
