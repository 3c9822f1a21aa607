"""Value codecs: raw floats (``identity``, ``fp16``, ``bf16``) and uniform per-chunk quantization (``quant``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, register_codec
from deltaplane.codecs.entropy import pack_bits, unpack_bits
from deltaplane.errors import CodecError, DecodeError

__all__ = ["BF16", "FP16", "Identity", "Quantize"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def tensor_to_bytes(x: Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (bf16 included, which numpy cannot hold)."""
    x = x.detach().contiguous().cpu()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, n: int) -> Tensor:
    """Inverse of :func:`tensor_to_bytes`, checking the length first."""
    item = torch.empty((), dtype=dtype).element_size()
    if len(data) != n * item:
        raise DecodeError(
            f"raw {DTYPE_NAMES.get(dtype, dtype)} data holds {len(data)} bytes, expected {n * item}"
        )
    if n == 0:
        return torch.empty(0, dtype=dtype)
    buf = bytearray(data)  # writable copy: torch.frombuffer warns on read-only memory
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16)
    return torch.frombuffer(buf, dtype=dtype)


@register_codec
class Identity(Codec):
    """No compression: the tensor's raw bytes in its own dtype (the fp32 baseline, and integer buffers)."""

    name = "identity"

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        if x.dtype not in DTYPE_NAMES:
            raise CodecError(f"identity: unsupported dtype {x.dtype}")
        return Encoded(
            self.spec, tuple(x.shape), {"dtype": DTYPE_NAMES[x.dtype]}, {"data": tensor_to_bytes(x)}
        )

    def decode(self, e: Encoded) -> Tensor:
        dtype = DTYPES.get(str(e.meta.get("dtype")))
        if dtype is None:
            raise DecodeError(f"identity: unknown dtype {e.meta.get('dtype')!r}")
        return tensor_from_bytes(self._field(e, "data", bytes), dtype, e.numel).reshape(e.shape)


class _Cast(Codec):
    dtype: torch.dtype

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        return Encoded(self.spec, tuple(x.shape), {}, {"data": tensor_to_bytes(x.to(self.dtype))})

    def decode(self, e: Encoded) -> Tensor:
        data = self._field(e, "data", bytes)
        return tensor_from_bytes(data, self.dtype, e.numel).float().reshape(e.shape)


@register_codec
class FP16(_Cast):
    """IEEE half precision: 2× smaller, ~3 significant digits; values beyond ±65504 overflow to Inf."""

    name = "fp16"
    dtype = torch.float16

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        if x.numel() and float(x.abs().max()) > 65504:
            raise CodecError("fp16: values exceed the float16 range (±65504); use bf16 or quant instead")
        return super().encode(x, rng)


@register_codec
class BF16(_Cast):
    """bfloat16: 2× smaller, fp32's range with ~2 significant digits."""

    name = "bf16"
    dtype = torch.bfloat16


@register_codec
class Quantize(Codec):
    """Uniform quantization to ``bits`` bits with one fp32 max-abs scale per ``chunk`` values.

    For ``bits >= 2`` the grid is symmetric with zero on it: ``2^(bits-1) - 1`` levels each side (so an exact
    zero stays zero). ``bits == 1`` sends a sign and the chunk scale. ``stochastic=True`` rounds up with
    probability equal to the fractional part, which makes the codec unbiased (E[decode(encode(x))] = x),
    as in QSGD (Alistarh et al. 2017, https://arxiv.org/abs/1610.02132).
    """

    name = "quant"
    positional = ("bits",)

    def __init__(self, *, bits: int = 8, stochastic: bool = False, chunk: int = 512) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise CodecError(f"quant: bits must be an integer in 1..8. Found {bits!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise CodecError(f"quant: chunk must be a positive integer. Found {chunk!r}")
        if not isinstance(stochastic, bool):
            raise CodecError(f"quant: stochastic must be true or false. Found {stochastic!r}")
        self.bits, self.stochastic, self.chunk = bits, stochastic, chunk

    def _levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        nchunks = math.ceil(n / self.chunk)
        padded = torch.zeros(nchunks * self.chunk)
        padded[:n] = flat
        chunks = padded.view(nchunks, self.chunk)
        scales = chunks.abs().amax(dim=1)  # (nchunks,)
        y = chunks / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]  # in [-1, 1]
        noise = torch.rand(y.shape, generator=rng) if self.stochastic else None
        if self.bits == 1:
            p = (y + 1) / 2  # probability of +scale, so that E[value] = y * scale
            codes = (noise < p) if noise is not None else (y >= 0)
        else:
            levels = self._levels()
            q = y * levels
            q = torch.floor(q + noise) if noise is not None else torch.round(q)
            codes = q.clamp_(-levels, levels) + levels
        codes_np = codes.reshape(-1)[:n].to(torch.uint8).numpy()
        fields = {
            "codes": pack_bits(codes_np, self.bits),
            "scales": scales.numpy().astype("<f4").tobytes(),
        }
        return Encoded(self.spec, tuple(x.shape), {}, fields)

    def decode(self, e: Encoded) -> Tensor:
        n = e.numel
        nchunks = math.ceil(n / self.chunk)
        raw_scales = self._field(e, "scales", bytes)
        self._expect_len(e, "scales", raw_scales, 4 * nchunks)
        scales = torch.from_numpy(np.frombuffer(raw_scales, dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise DecodeError("quant: chunk scales must be finite and non-negative")
        codes = torch.from_numpy(unpack_bits(self._field(e, "codes", bytes), self.bits, n).astype(np.float32))
        if self.bits == 1:
            vals = codes * 2 - 1
        else:
            levels = self._levels()
            if n and float(codes.max()) > 2 * levels:
                raise DecodeError(f"quant: code out of range for {self.bits}-bit quantization")
            vals = (codes - levels) / levels
        per_value = scales.repeat_interleave(self.chunk)[:n]
        return (vals * per_value).reshape(e.shape)
