"""Low-rank compression: PowerSGD with warm start across rounds (Vogels et al. 2019)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, get_codec, register_codec, split_lossless
from deltaplane.errors import CodecError, DecodeError, SpecError

__all__ = ["MAX_RANK", "PowerSGD"]

#: The largest rank PowerSGD encodes or decodes. Decoding ``P Qᵀ`` costs ``m·n·r`` multiply-adds, so a
#: payload may only ask for work proportional to its tensor's size (at most ``MAX_RANK`` per value), never
#: ``(m·n)^1.5`` at a rank just under ``m·n / (m + n)``. PowerSGD is used at ranks 1-32 (Vogels et al.
#: use 1-4); a higher rank rarely compresses an update at all.
MAX_RANK = 64


@register_codec
class PowerSGD(Codec):
    """Rank-``rank`` approximation ``M ≈ P Qᵀ`` by power iteration (Vogels et al. 2019, https://arxiv.org/abs/1905.13727).

    A tensor of shape ``(m, ...)`` is viewed as an ``m × n`` matrix ``M``. Each round runs ``iters`` steps of
    ``P = orth(M Q); Q = Mᵀ P`` starting from the previous round's ``Q`` for the same tensor (the warm start
    that makes a single step per round enough: over rounds it is subspace iteration on slowly changing
    updates), and sends ``P`` (``m × r``) and ``Q`` (``n × r``) as float fields a later stage may quantize.
    The warm-start ``Q`` is per-device, per-tensor state kept by the
    :class:`~deltaplane.codecs.compressor.Compressor` (:meth:`encode_stateful`); without state (a plain
    :meth:`encode`) the start is random. What the approximation drops is returned to the device by the
    Compressor's error feedback, as in the paper.

    Tensors that are 1-D, smaller than ``min_size`` values, or for which rank ``r`` would not save space
    (``r (m + n) >= m n``) are encoded with ``fallback`` instead (their node names that codec).
    ``rank`` is at most :data:`MAX_RANK`, so decoding any payload costs at most that many multiply-adds per
    value.
    """

    structural_check = True  # check() reads lengths and shapes only

    name = "powersgd"
    positional = ("rank",)
    stateful = True
    tensor_fields = ("p", "q")

    def __init__(
        self, *, rank: int = 4, iters: int = 1, min_size: int = 4096, fallback: str = "fp16"
    ) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
            raise CodecError(f"powersgd: rank must be an integer in 1..{MAX_RANK}. Found {rank!r}")
        if not isinstance(iters, int) or isinstance(iters, bool) or not 1 <= iters <= 16:
            raise CodecError(f"powersgd: iters must be an integer in 1..16. Found {iters!r}")
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
            raise CodecError(f"powersgd: min_size must be a non-negative integer. Found {min_size!r}")
        if not isinstance(fallback, str):
            raise CodecError(f"powersgd: fallback must be a codec spec string. Found {fallback!r}")
        try:
            fb = get_codec(fallback)
        except SpecError as exc:
            raise CodecError(f"powersgd: bad fallback codec: {exc}") from exc
        if fb.stateful or split_lossless(fb)[1] is not None or fb.selects_by_name:
            raise CodecError(f"powersgd: fallback must be a plain codec such as 'fp16'. Found {fallback!r}")
        self.rank, self.iters, self.min_size = rank, iters, min_size
        self.fallback = fb.spec  # canonical, so the spec (and payloads) never depend on spelling
        self._fallback = fb

    def _matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """``(m, n, r)`` if a tensor of ``shape`` is compressed as a matrix, ``None`` if it falls back."""
        if len(shape) < 2:
            return None
        m = shape[0]
        n = math.prod(shape[1:])
        r = min(self.rank, m, n)
        if m * n < self.min_size or r * (m + n) >= m * n:
            return None
        return m, n, r

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        return self.encode_stateful(x, rng, {})

    def encode_stateful(self, x: Tensor, rng: torch.Generator, state: dict[str, Any]) -> Encoded:
        dims = self._matrix_shape(tuple(x.shape))
        if dims is None:
            return self._fallback.encode(x, rng)
        m, n, r = dims
        mat = x.detach().reshape(m, n).float()
        q = state.get("q")
        if not (isinstance(q, Tensor) and tuple(q.shape) == (n, r) and bool(torch.isfinite(q).all())):
            q = torch.randn(n, r, generator=rng)  # cold start (first round, or the tensor changed shape)
        for _ in range(self.iters):
            p = torch.linalg.qr(mat @ q).Q  # (m, r), orthonormal columns
            q = mat.T @ p  # (n, r)
        state["q"] = q.clone()
        return Encoded(self.spec, tuple(x.shape), {}, {"p": p.contiguous(), "q": q.contiguous()})

    def check(self, e: Encoded) -> None:
        super().check(e)
        dims = self._matrix_shape(e.shape)
        if dims is None:
            raise DecodeError(f"{e.codec}: shape {list(e.shape)} is not compressed as a matrix by this codec")
        m, n, r = dims
        self._child_shape(e, "p", (m, r))
        self._child_shape(e, "q", (n, r))

    def decode(self, e: Encoded) -> Tensor:
        dims = self._matrix_shape(e.shape)
        if dims is None:
            raise DecodeError(f"{e.codec}: shape {e.shape} is not compressed as a matrix by this codec")
        m, n, r = dims
        p, q = self._field(e, "p", Tensor), self._field(e, "q", Tensor)
        if tuple(p.shape) != (m, r) or tuple(q.shape) != (n, r):
            raise DecodeError(
                f"{e.codec}: factors of shape {tuple(p.shape)} and {tuple(q.shape)}, expected {(m, r)} and {(n, r)}"
            )
        return (p.float() @ q.float().T).reshape(e.shape)
