"""Sparsifying codecs: keep a few coordinates, send their positions and values."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, register_codec
from deltaplane.codecs.entropy import decode_indices, encode_indices
from deltaplane.errors import CodecError, DecodeError

__all__ = ["TopK", "scatter_values"]


def scatter_values(e: Encoded, idx: np.ndarray, values: Tensor) -> Tensor:
    """A dense tensor of ``e.shape`` holding ``values`` at flat positions ``idx`` and zeros elsewhere."""
    if values.dim() != 1 or values.numel() != len(idx):
        raise DecodeError(f"{e.codec}: {values.numel()} values for {len(idx)} positions")
    out = torch.zeros(e.numel, dtype=torch.float32)
    out[torch.from_numpy(idx)] = values.float()
    return out.reshape(e.shape)


@register_codec
class TopK(Codec):
    """Keep the ``ratio`` fraction of coordinates with the largest magnitude (at least one).

    Positions go out with the cheapest index coder (see :mod:`deltaplane.codecs.entropy`); values are a float
    field that a following pipeline stage can quantize. Biased on its own: pair it with error feedback
    (Stich et al. 2018, https://arxiv.org/abs/1809.07599; Lin et al. 2018 DGC, https://arxiv.org/abs/1712.01887).
    """

    name = "topk"
    positional = ("ratio",)

    def __init__(self, *, ratio: float = 0.01) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise CodecError(f"topk: ratio must be in (0, 1]. Found {ratio!r}")
        self.ratio = float(ratio)

    def k_for(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        k = self.k_for(n)
        idx = torch.topk(flat.abs(), k, sorted=False).indices if k < n else torch.arange(n)
        idx, _ = torch.sort(idx)
        coder, data = encode_indices(idx.numpy(), n)
        return Encoded(self.spec, tuple(x.shape), {"ix": coder}, {"idx": data, "values": flat[idx].clone()})

    def decode(self, e: Encoded) -> Tensor:
        values = self._field(e, "values", Tensor)
        if values.numel() != self.k_for(e.numel):
            raise DecodeError(f"{e.codec}: {values.numel()} values, expected {self.k_for(e.numel)}")
        idx = decode_indices(str(e.meta.get("ix")), self._field(e, "idx", bytes), e.numel, values.numel())
        return scatter_values(e, idx, values)
