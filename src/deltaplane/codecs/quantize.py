"""Value codecs: raw floats (``identity``, ``fp16``, ``bf16``) and uniform per-chunk quantization (``quant``)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, register_codec
from deltaplane.codecs.entropy import (
    pack_bits,
    pack_bits_ragged,
    pack_bits_rows,
    unpack_bits,
    unpack_bits_ragged,
    unpack_bits_rows,
)
from deltaplane.errors import CodecError, DecodeError

__all__ = ["BF16", "FP16", "Identity", "Quantize", "Sign", "chunk_views"]

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


def tensor_buffer(x: Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a CPU tensor (kept alive by the view); see :func:`tensor_to_bytes`."""
    if x.numel() == 0:
        return memoryview(b"")
    x = x.detach().contiguous().cpu().reshape(-1)
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy().data.cast("B")  # the array's own buffer: numpy types memoryview(ndarray) only on 3.12+


def _check_bools(buf: bytearray) -> None:
    """Refuse raw bool data with a byte other than 0 or 1. torch keeps such a byte as it is: the tensor then
    reads True yet ``!= True``, ``.int()`` and ``.sum()`` count the byte, and ``~`` leaves it True, so it is not
    a value any sender's bool tensor holds."""
    if buf and bool((torch.frombuffer(buf, dtype=torch.uint8) > 1).any()):
        raise DecodeError("raw bool data holds bytes other than 0 (False) and 1 (True)")


def tensor_from_bytes(data: bytes, dtype: torch.dtype, n: int) -> Tensor:
    """Inverse of :func:`tensor_to_bytes`, checking the length first (and that bool bytes are 0 or 1)."""
    item = dtype.itemsize
    if len(data) != n * item:
        raise DecodeError(
            f"raw {DTYPE_NAMES.get(dtype, dtype)} data holds {len(data)} bytes, expected {n * item}"
        )
    if n == 0:
        return torch.empty(0, dtype=dtype)
    return _view_bytes(bytearray(data), dtype)  # writable copy: torch.frombuffer warns on read-only memory


def _view_bytes(buf: bytearray, dtype: torch.dtype) -> Tensor:
    """A writable byte buffer viewed as a flat tensor of ``dtype``, without a copy (bool bytes checked).

    ``torch.frombuffer`` has no bfloat16, so those bytes are read as int16 and reinterpreted."""
    if dtype == torch.bool:
        _check_bools(buf)
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16)
    return torch.frombuffer(buf, dtype=dtype)


@register_codec
class Identity(Codec):
    """No compression: the tensor's raw bytes in its own dtype (the fp32 baseline, and integer buffers)."""

    structural_check = True  # check() reads lengths and shapes only

    name = "identity"
    exact = True
    byte_fields = ("data",)

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        if x.dtype not in DTYPE_NAMES:
            raise CodecError(f"identity: unsupported dtype {x.dtype}")
        return Encoded(self.spec, tuple(x.shape), {"dtype": DTYPE_NAMES[x.dtype]}, {"data": tensor_buffer(x)})

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Zero-copy byte views of each row of the stack (nothing to compute, so nothing to batch)."""
        if x.dtype not in DTYPE_NAMES:
            raise CodecError(f"identity: unsupported dtype {x.dtype}")
        if x.dim() < 1 or x.shape[0] != len(rngs):
            return super().encode_rows(x, rngs)
        x = x.detach().contiguous().cpu()  # once for the stack: every row is then a contiguous view
        spec, name, shape = self.spec, DTYPE_NAMES[x.dtype], tuple(x.shape[1:])
        # one byte view of the whole stack, cut into rows: the bytes tensor_buffer(x[i]) gives for each row
        whole, size = tensor_buffer(x), x[0].numel() * x.element_size() if len(rngs) else 0
        return [
            Encoded(spec, shape, {"dtype": name}, {"data": whole[i * size : (i + 1) * size]})
            for i in range(len(rngs))
        ]

    def decode(self, e: Encoded) -> Tensor:
        dtype = DTYPES.get(str(e.meta.get("dtype")))
        if dtype is None:
            raise DecodeError(f"identity: unknown dtype {e.meta.get('dtype')!r}")
        return tensor_from_bytes(self._field(e, "data", bytes), dtype, e.numel).reshape(e.shape)

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """All rows' bytes joined into one buffer and viewed as the ``(C, *shape)`` stack: one copy and one
        tensor instead of two copies and a tensor per row. Rows that are not alike (dtype, shape, a field of
        exactly the declared length) take the row-by-row path, which says what is wrong."""
        dtype = DTYPES.get(str(rows[0].meta.get("dtype"))) if rows else None
        if dtype is None:
            return super().decode_rows(rows)
        first, size = rows[0], rows[0].numel * dtype.itemsize
        data = [e.fields.get("data") for e in rows]
        if any(
            e.meta != first.meta
            or e.shape != first.shape
            or not isinstance(d, bytes | bytearray | memoryview)
            or memoryview(d).nbytes != size
            for e, d in zip(rows, data, strict=True)
        ):
            return super().decode_rows(rows)
        if size == 0:
            return torch.empty((len(rows), *first.shape), dtype=dtype)
        buf = bytearray().join(data)  # type: ignore[arg-type]  # writable: torch.frombuffer warns otherwise
        return _view_bytes(buf, dtype).view(len(rows), *first.shape)

    def decode_ragged(self, rows: Sequence[Encoded]) -> list[Tensor]:
        """All rows' bytes joined into one buffer, viewed as one tensor and cut into the rows (each of its
        own shape). Rows of another dtype than the first's, a field not of exactly the declared length or
        raw bools take the row-by-row path, which says what is wrong."""
        dtype = DTYPES.get(str(rows[0].meta.get("dtype"))) if rows else None
        if dtype is None or dtype == torch.bool:
            return super().decode_ragged(rows)
        data = [e.fields.get("data") for e in rows]
        sizes = [e.numel for e in rows]
        if any(
            e.meta != rows[0].meta
            or not isinstance(d, bytes | bytearray | memoryview)
            or memoryview(d).nbytes != m * dtype.itemsize
            for e, d, m in zip(rows, data, sizes, strict=True)
        ):
            return super().decode_ragged(rows)
        if not sum(sizes):
            return [torch.empty(e.shape, dtype=dtype) for e in rows]
        buf = bytearray().join(data)  # type: ignore[arg-type]  # writable: torch.frombuffer warns otherwise
        return [t.view(e.shape) for t, e in zip(_view_bytes(buf, dtype).split(sizes), rows, strict=True)]

    def check(self, e: Encoded) -> None:
        super().check(e)
        dtype = DTYPES.get(str(e.meta.get("dtype")))
        if dtype is None:
            raise DecodeError(f"identity: unknown dtype {e.meta.get('dtype')!r}")
        self._expect_len(e, "data", e.fields["data"], e.numel * dtype.itemsize)

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        dtype = DTYPES.get(str(e.meta.get("dtype")))
        return {"data": e.numel * dtype.itemsize if dtype is not None else 0}


class _Cast(Codec):
    structural_check = True  # check() reads lengths and shapes only
    dtype: torch.dtype
    byte_fields = ("data",)

    def check(self, e: Encoded) -> None:
        super().check(e)
        self._expect_len(e, "data", e.fields["data"], 2 * e.numel)

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        return {"data": 2 * e.numel}

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        return Encoded(self.spec, tuple(x.shape), {}, {"data": tensor_buffer(x.to(self.dtype))})

    def decode(self, e: Encoded) -> Tensor:
        data = self._field(e, "data", bytes)
        return tensor_from_bytes(data, self.dtype, e.numel).float().reshape(e.shape)

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """One cast of the whole stack, cut into each row's bytes: row ``i`` is byte for byte
        ``encode(x[i], rngs[i])`` (a cast is element-wise; nothing is drawn from the generators)."""
        if x.dim() < 1 or x.shape[0] != len(rngs) or not len(rngs):
            return super().encode_rows(x, rngs)
        # once for the stack: every row of the cast is then a contiguous run of its bytes
        whole = x.detach().to(self.dtype).contiguous().cpu()
        data, size = tensor_buffer(whole), 2 * whole[0].numel()
        spec, shape = self.spec, tuple(x.shape[1:])
        return [Encoded(spec, shape, {}, {"data": data[i * size : (i + 1) * size]}) for i in range(len(rngs))]

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """All rows' half-precision bytes joined and widened to float32 in one call (exact: every fp16 and
        bf16 value is a float32). Rows of another shape or a field not of exactly ``2 · numel`` bytes take
        the row-by-row path, which says what is wrong."""
        first = rows[0]
        data = [e.fields.get("data") for e in rows]
        if any(
            e.shape != first.shape
            or not isinstance(d, bytes | bytearray | memoryview)
            or memoryview(d).nbytes != 2 * first.numel
            for e, d in zip(rows, data, strict=True)
        ):
            return super().decode_rows(rows)
        if not first.numel:
            return torch.empty((len(rows), *first.shape))
        buf = bytearray().join(data)  # type: ignore[arg-type]  # writable: torch.frombuffer warns otherwise
        return _view_bytes(buf, self.dtype).float().view(len(rows), *first.shape)


@register_codec
class FP16(_Cast):
    """IEEE half precision: 2× smaller, ~3 significant digits; values beyond ±65504 overflow to Inf."""

    name = "fp16"
    dtype = torch.float16

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        if x.numel() and float(x.abs().max()) > 65504:
            raise CodecError("fp16: values exceed the float16 range (±65504); use bf16 or quant instead")
        return super().encode(x, rng)

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """The stacked cast, once no row holds a value beyond ±65504; otherwise the rows one by one, so the
        error is the one ``encode`` raises. Each row's max |x| is checked on its own, as ``encode`` checks it:
        a row holding NaN compares as in range there, whatever else it holds, and a stack's max would be NaN
        for every row."""
        if x.dim() < 1 or x.shape[0] != len(rngs) or not len(rngs) or not x[0].numel():
            return Codec.encode_rows(self, x, rngs)
        if bool((x.detach().reshape(x.shape[0], -1).abs().amax(dim=1) > 65504).any()):
            return Codec.encode_rows(self, x, rngs)
        return super().encode_rows(x, rngs)


@register_codec
class BF16(_Cast):
    """bfloat16: 2× smaller, fp32's range with ~2 significant digits."""

    name = "bf16"
    dtype = torch.bfloat16


def chunk_views(flat: Tensor, chunk: int) -> list[tuple[int, Tensor]]:
    """Views ``(start, (rows, chunk))`` over a flat tensor: the whole chunks, then the shorter tail.

    Views rather than a zero-padded copy: padding would add one full pass over the tensor per encode.
    """
    n = flat.numel()
    full = n // chunk
    parts = [(0, flat[: full * chunk].view(full, chunk))] if full else []
    if n % chunk:
        parts.append((full * chunk, flat[full * chunk :].view(1, -1)))
    return parts


def row_chunk_views(flat: Tensor, chunk: int) -> list[Tensor]:
    """:func:`chunk_views` of every row of a ``(rows, n)`` stack at once: ``(rows, chunks, chunk)`` views of the
    whole chunks of every row, then ``(rows, 1, tail)`` of every row's shorter tail (each row cut as
    :func:`chunk_views` cuts it alone)."""
    rows, n = flat.shape
    full, tail = divmod(n, chunk)
    return ([flat[:, : full * chunk].reshape(rows, full, chunk)] if full else []) + (
        [flat[:, full * chunk :].reshape(rows, 1, tail)] if tail else []
    )


def _chunk_scales(part: Tensor, scale: str) -> Tensor:
    if scale == "max":  # max |x| as max(max x, -min x): two reductions, no |x| temporary
        # + 0.0 turns an all-zero chunk's -0.0 into 0.0: which of max(0.0, -0.0) comes back depends on the
        # kernel (vectorized or not, so on the tensor's shape), and the scale's bytes must not
        return torch.maximum(part.amax(dim=1), part.amin(dim=1).neg_()).add_(0.0)
    return torch.linalg.vector_norm(part, dim=1)


#: values per block in the quantizers' hot loops: small enough that the float scratch stays in cache, and
#: a fresh tensor-sized float temporary (whose page faults cost as much as a memcpy) is never allocated
BLOCK_VALUES = 1 << 16


def _blocks(rows: int, cols: int) -> range:
    step = max(1, BLOCK_VALUES // max(cols, 1))
    return range(0, rows, step)


#: values per block in :meth:`Quantize.encode`: its float scratch, the noise and the codes (~1.1 MB) stay
#: in a core's L2 cache, and a block costs few enough Python calls that small chunks do not pay for them
ENCODE_BLOCK_VALUES = 1 << 17

#: :meth:`Quantize.encode_ragged` joins rows into blocks of at most this many values, and encodes a row of
#: more than ``RAGGED_ROW_VALUES`` on its own: 20 rows of ~12000 values joined took 1.07-1.2× the per-row
#: encodes at 4 bits, 20 of ~4000 0.25-0.6× (the joined temporaries leave the cache, ``encode``'s do not)
RAGGED_BLOCK_VALUES = 1 << 16
RAGGED_ROW_VALUES = 1 << 13

#: the dither's resolution: stochastic rounding compares the fractional part with a 16-bit uniform
DITHER_BITS = 16
_ULP = 2.0**-DITHER_BITS  # one dither step
_U0 = 0.5 + _ULP / 2  # the noise of word -2¹⁵: u = _U0 + word · _ULP is (k + ½) / 2¹⁶, k = word + 2¹⁵


class Dither:
    """The uniform noise of stochastic rounding for one encode call: 16-bit words in value order.

    The words of an ``n``-value tensor are ``torch.empty(ceil(n / 4), dtype=torch.int64).random_(-2**63,
    None, generator=rng).view(torch.int16)[:n]`` (``random_``'s full 64-bit range: four uniform 16-bit words
    a draw), whatever blocks :meth:`take` is called in, so block-wise, row-wise and whole-tensor encodes
    agree, and the encode call's generator (the Compressor's, seeded) fixes them. 16 random bits a value
    rather than the 32 that ``uniform_`` spends on each float halves the work of torch's serial Mersenne
    Twister, which was over half of a stochastic encode; the words are added as integers scaled by 2⁻¹⁶, with
    no float conversion pass. ``k = word + 2¹⁵`` is uniform on ``0 … 2¹⁶ - 1`` and the noise is
    ``u = (k + ½) / 2¹⁶``, so ``E[u] = ½`` exactly and ``P(u ≥ 1 - f) = round(f · 2¹⁶) / 2¹⁶``: a value
    rounds up with a probability within 2⁻¹⁷ of its fractional part ``f``, plus float32's rounding in
    computing ``q = x·L/scale + L`` and ``q + u`` (four roundings of values up to ``2L + 1``: at most
    ``(2L + 2)·2⁻²²``, 2⁻¹⁸ for 4-bit codes, 2⁻¹⁴ for 8-bit ones, as with the float noise before).
    """

    def __init__(self, rng: torch.Generator) -> None:
        self._rng = rng
        self._carry = torch.empty(0, dtype=torch.int16)

    def take(self, m: int, buf: Tensor | None = None) -> Tensor:
        """The next ``m`` words (int16), drawn into ``buf`` (int64 scratch) when it is large enough."""
        have = self._carry.numel()
        words = ceil_div(max(m - have, 0), 4)
        if buf is None or buf.numel() < words:
            buf = torch.empty(words, dtype=torch.int64)
        fresh = buf[:words].random_(-(2**63), None, generator=self._rng).view(torch.int16)
        out = torch.cat([self._carry, fresh]) if have else fresh
        if out.numel() > m:  # at most 3 words left over, kept for the next block
            self._carry = out[m:].clone()
        elif have:
            self._carry = self._carry[:0]
        return out[:m]


def _max_abs(blk: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """Each row's max |x| into ``out``: |x| into a cache-resident ``scratch`` of ``blk``'s shape, one reduction.

    The values of :func:`_chunk_scales`' max(max x, -min x) + 0.0 (an all-zero chunk's scale is +0.0 either
    way), a third faster than those two reductions. A chunk holding NaN (which only a direct call can pass:
    the Compressor refuses non-finite updates) takes that formula itself, so even its NaN's bits are
    unchanged. (``torch.aminmax`` would be one reduction, but its kernel is over twice as slow as ``amax``
    and ``amin`` together.)
    """
    torch.amax(torch.abs(blk, out=scratch), dim=1, out=out)
    if bool(torch.isnan(out).any()):
        out.copy_(_chunk_scales(blk, "max"))
    return out


#: multipliers that gather the low bits of each byte of a little-endian word into its top byte: for 2-bit
#: codes ``c0..c3`` (bytes of a u32), ``c · 0x01041040`` puts ``c_j`` at bits ``24 + 2j`` and every other
#: product term at a distinct lower 2-bit slot or above bit 31 (dropped), so nothing carries into the top
#: byte; likewise ``0x0110`` for two 4-bit codes in a u16
_GATHER: dict[int, tuple[np.dtype, np.unsignedinteger, int]] = {
    2: (np.dtype("<u4"), np.uint32(0x01041040), 24),
    4: (np.dtype("<u2"), np.uint16(0x0110), 8),
}


def _pack_block(codes: Tensor, m: int, bits: int, out: np.ndarray) -> None:
    """Bit-pack the first ``m`` codes of ``codes`` into ``out`` exactly as :func:`pack_bits` does.

    ``codes`` is a uint8 scratch buffer whose length is a multiple of 8 (the codes past ``m`` are zeroed
    and packed as the last byte's zero padding); ``out`` holds ``ceil(m · bits / 8)`` bytes.
    """
    c = codes.numpy()
    if bits in _GATHER:
        dtype, mul, shift = _GATHER[bits]
        per = 8 // bits
        padded = ceil_div(m, per) * per
        c[m:padded] = 0
        word = c[:padded].view(dtype)
        word = np.multiply(word, mul, dtype=dtype.newbyteorder("="))  # wraps: the high products drop out
        out[:] = np.right_shift(word, shift, out=word)
    elif bits == 1:
        out[:] = np.packbits(c[:m], bitorder="little")
    else:
        out[:] = np.frombuffer(pack_bits(c[:m], bits), np.uint8)


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` in exact integer arithmetic (``math.ceil(a / b)`` overflows or rounds for huge ints)."""
    return -(-a // b)


def _read_scales(codec: Codec, e: Encoded, count: int) -> Tensor:
    raw = codec._field(e, "scales", bytes)
    codec._expect_len(e, "scales", raw, 4 * count)
    scales = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise DecodeError(f"{e.codec}: scales must be finite and non-negative")
    return scales


@register_codec
class Quantize(Codec):
    """Uniform quantization to ``bits`` bits with one fp32 scale per ``chunk`` values.

    For ``bits >= 2`` the grid is symmetric with zero on it: ``L = 2^(bits-1) - 1`` levels each side (so an
    exact zero stays zero), ``value = scale * (code - L) / L``. ``bits == 1`` sends a sign and the chunk scale.
    ``scale="max"`` uses the chunk's max-abs value; ``scale="norm"`` its L2 norm, as in QSGD (Alistarh et al.
    2017, https://arxiv.org/abs/1610.02132), whose variance bound is stated in terms of the norm.
    ``stochastic=True`` rounds up with probability equal to the fractional part, which makes the codec
    unbiased: E[decode(encode(x))] = x, to within 2⁻¹⁷ of a step plus float32's rounding (the noise has 16
    bits; see :class:`Dither`, whose words come from the encode call's ``torch.Generator``, so a seed fixes
    the bytes). Codes are bit-packed: n values take ``ceil(n * bits / 8)`` bytes plus 4 bytes a chunk.
    """

    structural_check = True  # check() reads lengths and shapes only

    name = "quant"
    positional = ("bits",)
    byte_fields = ("codes", "scales")

    def __init__(
        self, *, bits: int = 8, stochastic: bool = False, chunk: int = 512, scale: str = "max"
    ) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise CodecError(f"quant: bits must be an integer in 1..8. Found {bits!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk < 2**63:
            raise CodecError(f"quant: chunk must be a positive 64-bit integer. Found {chunk!r}")
        if not isinstance(stochastic, bool):
            raise CodecError(f"quant: stochastic must be true or false. Found {stochastic!r}")
        if scale not in ("max", "norm"):
            raise CodecError(f"quant: scale must be 'max' or 'norm'. Found {scale!r}")
        self.bits, self.stochastic, self.chunk, self.scale = bits, stochastic, chunk, scale

    @property
    def contractive(self) -> bool:
        # stochastic rounding on a norm-scaled grid (QSGD): with few levels the step is a sizeable share of
        # the chunk's L2 norm, so the rounding noise can exceed the values themselves
        return not (self.stochastic and self.scale == "norm")

    def _levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        """Scales, codes and packing block by block, each block while it is in cache.

        One pass over the input: a block of whole chunks (``ENCODE_BLOCK_VALUES`` values) gets its scales,
        its codes (in a small scratch buffer) and its bit-packed bytes, written straight into the output.
        No tensor-sized temporary is allocated (a fresh one costs page faults as much as a memcpy). The
        noise of ``stochastic=True`` is taken block after block from one :class:`Dither` stream in value
        order, which gives the words a single draw over the tensor gives.
        """
        flat = x.detach().reshape(-1).float()
        n, bits, levels = flat.numel(), self.bits, self._levels()
        scales = torch.empty(ceil_div(n, self.chunk))
        # a block of whole chunks starts on a byte boundary when a chunk's codes fill whole bytes: each block
        # is then packed into its own bytes of the output; otherwise the codes are packed at the end
        direct = self.chunk * bits % 8 == 0
        packed = np.empty(ceil_div(n * bits, 8) if direct else 0, np.uint8)
        codes = (
            torch.from_numpy(packed) if bits == 8 else None if direct else torch.empty(n, dtype=torch.uint8)
        )
        dither = Dither(rng) if self.stochastic and n else None
        row = 0
        for start, part in chunk_views(flat, self.chunk):
            rows, cols = part.shape
            norms = _chunk_scales(part, "norm") if self.scale == "norm" else None
            step = max(1, ENCODE_BLOCK_VALUES // cols)
            work = torch.empty(min(step, rows), cols)
            words = torch.empty(ceil_div(work.numel(), 4), dtype=torch.int64) if dither else None
            # empty where the codes are written straight into codes (typed a tensor either way)
            scratch = torch.empty(ceil_div(work.numel(), 8) * 8 if codes is None else 0, dtype=torch.uint8)
            for r0 in range(0, rows, step):
                blk = part[r0 : r0 + step]
                h, m, v0 = blk.shape[0], blk.numel(), start + r0 * cols
                s = scales[row + r0 : row + r0 + h]
                if norms is None:
                    _max_abs(blk, out=s, scratch=work[:h])
                else:
                    s.copy_(norms[r0 : r0 + h])
                o = scratch[:m] if codes is None else codes[v0 : v0 + m]
                d = None if dither is None else dither.take(m, words).view(h, cols)
                self._codes(blk, s, levels, o.view(h, cols), work[:h], d)
                if codes is None:
                    _pack_block(scratch, m, bits, packed[v0 * bits // 8 : ceil_div((v0 + m) * bits, 8)])
            row += rows
        fields = {
            # codes is None only where direct
            "codes": packed.data if direct or codes is None else pack_bits(codes.numpy(), bits),
            "scales": scales.numpy().astype("<f4").tobytes(),
        }
        return Encoded(self.spec, tuple(x.shape), {}, fields)

    def _codes(
        self,
        blk: Tensor,
        s: Tensor,
        levels: int,
        out: Tensor,
        work: Tensor,
        dither: Tensor | None,
    ) -> None:
        """Write the uint8 codes of ``blk`` (``(rows, chunk)``, chunk scales ``s``) into ``out``.

        ``dither``: the block's :class:`Dither` words (int16, ``blk``'s shape) when rounding stochastically.
        """
        if self.bits == 1 and dither is None:  # deterministic: the sign
            torch.ge(blk, 0, out=out)
            return
        if self.bits == 1:
            # P(+scale) = (x/scale + 1) / 2 makes E[value] = x
            # reciprocal then multiply: what ``0.5 / s`` computes, without its Python-level wrapper
            mul, add = torch.where(s > 0, torch.reciprocal(s).mul_(0.5), 0.0)[:, None], 0.5
        else:
            # code = trunc(x·L/scale + L + ½) = round-half-up(x·L/scale) + L: the uint8 cast truncates,
            # and every value is >= 0, so one multiply, one add and the cast do the rounding
            mul = torch.where(s > 0, torch.reciprocal(s).mul_(levels), 0.0)[:, None]
            add = levels + (_U0 if dither is not None else 0.5)
        w = torch.mul(blk, mul, out=work).add_(add)
        if dither is not None:
            if self.bits == 1:  # u < w, as w - word·2⁻¹⁶ > ½ + 2⁻¹⁷
                torch.gt(w.sub_(dither, alpha=_ULP), _U0, out=out)
                return
            # floor(q + u), u = ½ + 2⁻¹⁷ + word·2⁻¹⁶ (the first two added with L above); the clamp
            # guards q = 2L (or just below) from rounding up to 2L + 1
            w.add_(dither, alpha=_ULP).clamp_(max=2 * levels)
        # numpy's float -> uint8 cast truncates as torch's copy_ does (NaN and ±Inf, which a subnormal
        # scale can make, to 0 as well) in a third of the time
        with np.errstate(invalid="ignore"):
            np.copyto(out.numpy(), w.numpy(), casting="unsafe")

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Scales, codes and their bit-packing (:func:`~deltaplane.codecs.entropy.pack_bits_rows`) of all rows at
        once; framing per row.

        Row ``i`` is byte-for-byte ``encode(x[i], rngs[i])``: every chunk of a row is the chunk ``encode``
        would make (the whole chunks, then the row's shorter tail), and the arithmetic is element-wise, so
        it rounds the same whatever the batch. ``scale="norm"`` takes each row's chunk norms on their own
        (a reduction over a larger matrix may sum in another order). With ``stochastic=True`` each row
        takes its noise from its own :class:`Dither` on its own generator, the words ``encode`` takes (a
        stream does not depend on how it is cut into blocks), and only the rounding is batched.
        """
        shared = self.stochastic and len({id(g) for g in rngs}) != len(rngs)
        if shared or x.dim() < 1 or x.shape[0] != len(rngs) or not x[0].numel():
            # rows sharing a generator must draw row after row, not part after part: the plain loop
            return super().encode_rows(x, rngs)
        rows = x.shape[0]
        flat = x.detach().reshape(rows, -1).float()
        levels = self._levels()
        parts = row_chunk_views(flat, self.chunk)
        scales, codes = [], []
        # each row's own stream, taken part after part as encode takes it block after block
        dithers = [Dither(rng) for rng in rngs] if self.stochastic else []
        for part in parts:
            if self.scale == "max":
                s = _chunk_scales(part.reshape(-1, part.shape[2]), "max").view(rows, -1)
            else:
                s = torch.stack([_chunk_scales(part[r], "norm") for r in range(rows)])
            scales.append(s)
            if self.bits == 1 and not self.stochastic:
                codes.append(part.ge(0).to(torch.uint8))
                continue
            if self.bits == 1:
                mul, add = torch.where(s > 0, 0.5 / s, 0.0)[..., None], 0.5
            else:
                mul = torch.where(s > 0, levels / s, 0.0)[..., None]
                add = levels + (_U0 if self.stochastic else 0.5)
            w = torch.mul(part, mul).add_(add)
            if not self.stochastic:
                codes.append(w.to(torch.uint8))
                continue
            noise = torch.stack([d.take(part[r].numel()).view(part.shape[1:]) for r, d in enumerate(dithers)])
            if self.bits == 1:
                codes.append(torch.gt(w.sub_(noise, alpha=_ULP), _U0).to(torch.uint8))
            else:
                codes.append(w.add_(noise, alpha=_ULP).clamp_(max=2 * levels).to(torch.uint8))
        scale_t = torch.cat(scales, dim=1)
        code_t = torch.cat([c.reshape(rows, -1) for c in codes], dim=1).numpy()
        scale_np = scale_t.numpy().astype("<f4")
        shape, spec = tuple(x.shape[1:]), self.spec
        return [
            Encoded(spec, shape, {}, {"codes": packed, "scales": scale.tobytes()})
            for packed, scale in zip(pack_bits_rows(code_t, self.bits), scale_np, strict=True)
        ]

    def encode_ragged(self, xs: Sequence[Tensor], rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Scales, codes and bit-packing of rows of different sizes (threshold's or approximate top-k's kept
        values, one count per device) in one pass over all rows' values joined; framing per row.

        Row ``i`` is byte-for-byte ``encode(xs[i], rngs[i])``. Every row is cut into chunks as ``encode``
        cuts it (whole chunks, then its shorter tail), and each value is scaled by its own row's chunk:
        ``scale="max"`` is one segment maximum of ``|x|`` over every chunk of every row (a maximum is exact
        in any order), while ``scale="norm"`` takes each row's chunk norms on their own, by ``encode``'s
        own call (a sum over other shapes may round otherwise). The rounding is element-wise, so it does
        not depend on the batch. With ``stochastic=True`` each row's noise is its own :class:`Dither`'s on
        its own generator, the words ``encode`` takes. The codes are packed by
        :func:`~deltaplane.codecs.entropy.pack_bits_ragged`, each row padded to a byte as ``encode`` pads it.

        Rows are joined in blocks of at most ``RAGGED_BLOCK_VALUES`` values, and a row of more than
        ``RAGGED_ROW_VALUES`` is encoded on its own by ``encode``: its work dwarfs a call's fixed cost, and
        ``encode``'s cache-sized blocks beat the joined path's whole-block temporaries there.
        """
        shared = self.stochastic and len({id(g) for g in rngs}) != len(rngs)
        if shared or len(xs) != len(rngs) or not xs:
            return super().encode_ragged(xs, rngs)
        out: list[Encoded] = []
        block: list[int] = []  # consecutive rows joined, then encoded together
        held = 0
        for i, x in enumerate([*xs, None]):
            m = -1 if x is None else x.numel()
            if block and (x is None or m > RAGGED_ROW_VALUES or held + m > RAGGED_BLOCK_VALUES):
                out += self._encode_joined([xs[j] for j in block], [rngs[j] for j in block])
                block, held = [], 0
            if x is not None and m > RAGGED_ROW_VALUES:
                out.append(self.encode(x, rngs[i]))
            elif x is not None:
                block.append(i)
                held += m
        return out

    def _encode_joined(self, xs: Sequence[Tensor], rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """:meth:`encode_ragged` of a block of rows, joined into one pass."""
        flats = [x.detach().reshape(-1).float() for x in xs]
        sizes = [f.numel() for f in flats]
        values = torch.cat(flats)
        if bool(torch.isnan(values).any()):  # encode keeps a NaN chunk's own scale bits: row by row
            return [self.encode(x, rng) for x, rng in zip(xs, rngs, strict=True)]
        n = np.asarray(sizes, np.int64)
        counts = -(-n // self.chunk)  # chunks a row
        # every row's chunks in order, as encode cuts the row: where each starts among all values, its length
        first = np.cumsum(counts) - counts
        place = np.arange(int(counts.sum())) - np.repeat(first, counts)  # a chunk's place in its row
        starts = np.repeat(np.cumsum(n) - n, counts) + place * self.chunk
        lengths = np.minimum(np.repeat(n, counts) - place * self.chunk, self.chunk)
        if self.scale == "max":
            # a segment maximum over each chunk; |-0.0| = +0.0, as encode's max(max x, -min x) + 0.0 gives
            mag = np.abs(values.numpy())
            scales = torch.from_numpy(np.maximum.reduceat(mag, starts) if len(mag) else mag)
        else:
            scales = torch.cat(
                [_chunk_scales(part, "norm") for f in flats for _, part in chunk_views(f, self.chunk)]
                or [torch.empty(0)]
            )
        codes = torch.empty(len(values), dtype=torch.uint8)
        if self.bits == 1 and not self.stochastic:
            torch.ge(values, 0, out=codes)
        else:
            # encode's multiplier (reciprocal, then times L or ½) for each chunk, then gathered to its values
            factor = 0.5 if self.bits == 1 else self._levels()
            mul = torch.where(scales > 0, torch.reciprocal(scales).mul_(factor), 0.0)
            add = 0.5 if self.bits == 1 else self._levels() + (_U0 if self.stochastic else 0.5)
            w = torch.from_numpy(np.repeat(mul.numpy(), lengths)).mul_(values).add_(add)
            # each row's own stream, the words its encode takes (a row of no values draws none)
            words = [Dither(g).take(m) for g, m in zip(rngs, sizes, strict=True) if m and self.stochastic]
            noise = torch.cat(words) if words else torch.empty(0, dtype=torch.int16)
            if self.stochastic and self.bits == 1:
                torch.gt(w.sub_(noise, alpha=_ULP), _U0, out=codes)
            else:
                if self.stochastic:
                    w.add_(noise, alpha=_ULP).clamp_(max=2 * self._levels())
                with np.errstate(invalid="ignore"):  # encode's cast: truncation, NaN and ±Inf to 0
                    np.copyto(codes.numpy(), w.numpy(), casting="unsafe")
        packed = pack_bits_ragged(codes.numpy(), self.bits, sizes)
        raw = scales.numpy().astype("<f4").tobytes()
        ends = (np.cumsum(counts) * 4).tolist()
        spec = self.spec
        return [
            Encoded(spec, tuple(x.shape), {}, {"codes": p, "scales": raw[e - 4 * c : e]})
            for x, p, e, c in zip(xs, packed, ends, counts.tolist(), strict=True)
        ]

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Codes and scales of all rows read and checked at once, then ``(code - L) · scale / L`` on the stack.

        A row that a check refuses (a length, a scale, padding bits, a code out of range) sends all rows
        through the default, which raises its own error.
        """
        n = rows[0].numel
        if not n or any(e.shape != rows[0].shape for e in rows):
            return super().decode_rows(rows)
        levels = self._levels()
        count = ceil_div(n, self.chunk)
        try:
            raw = [self._field(e, "scales", bytes) for e in rows]
            packed = [self._field(e, "codes", bytes) for e in rows]
        except DecodeError:
            return super().decode_rows(rows)
        if any(len(r) != 4 * count for r in raw):
            return super().decode_rows(rows)
        scales = np.frombuffer(b"".join(raw), dtype="<f4").astype(np.float32).reshape(len(rows), count)
        if not np.isfinite(scales).all() or (scales < 0).any():
            return super().decode_rows(rows)
        codes = unpack_bits_rows(packed, self.bits, n)
        if codes is None or (self.bits > 1 and int(codes.max()) > 2 * levels):
            return super().decode_rows(rows)
        s = torch.from_numpy(scales)
        shift, mul = (0.5, 2 * s) if self.bits == 1 else (levels, s / levels)
        value = torch.from_numpy(codes).float().sub_(shift)
        full, tail = divmod(n, self.chunk)
        if full:
            value[:, : full * self.chunk].view(len(rows), full, self.chunk).mul_(mul[:, :full, None])
        if tail:
            value[:, full * self.chunk :].mul_(mul[:, full:])
        return value.reshape(len(rows), *rows[0].shape)

    def decode_ragged(self, rows: Sequence[Encoded]) -> list[Tensor]:
        """Rows of different sizes (top-k's values, one count per device) read and checked at once:
        every row's codes unpacked from one bit stream (:func:`~deltaplane.codecs.entropy.unpack_bits_ragged`)
        and ``(code - L) · scale / L`` for all of them in one pass, each value scaled by its own row's chunk.

        A row that a check refuses (a length, a scale, padding bits, a code out of range) sends all rows
        through the default, which raises its own error.
        """
        sizes = [e.numel for e in rows]
        counts = [ceil_div(m, self.chunk) for m in sizes]
        levels = self._levels()
        try:
            raw = [self._field(e, "scales", bytes) for e in rows]
            packed = [self._field(e, "codes", bytes) for e in rows]
        except DecodeError:
            return super().decode_ragged(rows)
        if any(len(r) != 4 * c for r, c in zip(raw, counts, strict=True)):
            return super().decode_ragged(rows)
        scales = np.frombuffer(b"".join(raw), dtype="<f4").astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            return super().decode_ragged(rows)
        codes = unpack_bits_ragged(packed, self.bits, sizes)
        if codes is None or (self.bits > 1 and len(codes) and int(codes.max()) > 2 * levels):
            return super().decode_ragged(rows)
        s = torch.from_numpy(scales)
        shift, mul = (0.5, 2 * s) if self.bits == 1 else (levels, s / levels)
        # each value's chunk: its row's first scale plus its place in the row // chunk
        n = np.asarray(sizes, np.int64)
        first_scale = np.cumsum(counts) - np.asarray(counts, np.int64)
        place = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        chunk_of = np.repeat(first_scale, n) + place // self.chunk
        value = torch.from_numpy(codes).float().sub_(shift).mul_(mul[torch.from_numpy(chunk_of)])
        return [v.view(e.shape) for v, e in zip(value.split(sizes), rows, strict=True)]

    def check(self, e: Encoded) -> None:
        super().check(e)
        self._expect_len(e, "codes", e.fields["codes"], ceil_div(e.numel * self.bits, 8))
        self._expect_len(e, "scales", e.fields["scales"], 4 * ceil_div(e.numel, self.chunk))

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        return {"codes": ceil_div(e.numel * self.bits, 8), "scales": 4 * ceil_div(e.numel, self.chunk)}

    def decode(self, e: Encoded) -> Tensor:
        n = e.numel
        # integer division: a float ceil(n / chunk) is 0 for a chunk beyond 1e308, which would leave the
        # output unwritten
        scales = _read_scales(self, e, ceil_div(n, self.chunk))
        codes = torch.from_numpy(unpack_bits(self._field(e, "codes", bytes), self.bits, n))
        levels = self._levels()
        if self.bits > 1 and n and int(codes.max()) > 2 * levels:
            raise DecodeError(f"quant: code out of range for {self.bits}-bit quantization")
        out = torch.empty(n, dtype=torch.float32)
        row = 0
        for start, part in chunk_views(out, self.chunk):
            rows, cols = part.shape
            s = scales[row : row + rows, None]
            row += rows
            # value = (code - L) · s / L, or (2 code - 1) · s for 1 bit: code L decodes to an exact zero
            shift, mul = (0.5, 2 * s) if self.bits == 1 else (levels, s / levels)
            c = codes[start : start + part.numel()].view(rows, cols)
            step = _blocks(rows, cols).step
            work = torch.empty(min(step, rows), cols)
            for r0 in _blocks(rows, cols):
                w = work[: min(step, rows - r0)].copy_(c[r0 : r0 + step]).sub_(shift)
                torch.mul(w, mul[r0 : r0 + step], out=part[r0 : r0 + step])
        return out.reshape(e.shape)


@register_codec
class Sign(Codec):
    """One bit a value: the sign, times the tensor's mean absolute value.

    scaled signSGD as analysed with error feedback by Karimireddy et al. 2019 (EF-signSGD,
    https://arxiv.org/abs/1901.09847): ``C(x) = (||x||_1 / d) · sign(x)``. Biased; use it with the
    :class:`~deltaplane.codecs.compressor.Compressor`'s error feedback. ``ceil(n / 8) + 4`` bytes.
    """

    structural_check = True  # check() reads lengths and shapes only

    name = "sign"
    byte_fields = ("signs", "scales")

    def check(self, e: Encoded) -> None:
        super().check(e)
        self._expect_len(e, "signs", e.fields["signs"], ceil_div(e.numel, 8))
        self._expect_len(e, "scales", e.fields["scales"], 4)

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        return {"signs": ceil_div(e.numel, 8), "scales": 4}

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        scale = float(flat.abs().mean()) if flat.numel() else 0.0
        signs = np.packbits((flat >= 0).numpy(), bitorder="little").tobytes()
        return Encoded(self.spec, tuple(x.shape), {}, {"signs": signs, "scales": struct.pack("<f", scale)})

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Every row's sign bits packed at once (each row padded to a byte, as ``encode`` pads it); the scale
        per row, ``float(row.mean())`` of the stack's ``|x|`` as ``encode`` takes it: a mean over the whole
        matrix may sum in another order (see docs/sim-speed.md). Row ``i`` is byte for byte
        ``encode(x[i], rngs[i])``; nothing is drawn."""
        if x.dim() < 1 or x.shape[0] != len(rngs) or not len(rngs) or not x[0].numel():
            return super().encode_rows(x, rngs)
        flat = x.detach().reshape(x.shape[0], -1).float()
        signs = np.packbits(flat.ge(0).numpy(), axis=1, bitorder="little")
        spec, shape = self.spec, tuple(x.shape[1:])
        return [
            Encoded(
                spec, shape, {}, {"signs": bits.tobytes(), "scales": struct.pack("<f", float(mag.mean()))}
            )
            for bits, mag in zip(signs, flat.abs().unbind(0), strict=True)
        ]

    def decode(self, e: Encoded) -> Tensor:
        scale = _read_scales(self, e, 1)
        bits = torch.from_numpy(unpack_bits(self._field(e, "signs", bytes), 1, e.numel))
        return (bits.float().mul_(2).sub_(1).mul_(scale)).reshape(e.shape)

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """The scales and sign bits of all rows read and checked at once, ``(2·bit − 1)·scale`` on the stack.

        A row that a check refuses (a length, a scale, padding bits) sends all rows through the default,
        which raises that row's own error.
        """
        first = rows[0]
        if any(e.shape != first.shape for e in rows):
            return super().decode_rows(rows)
        try:
            raw = [self._field(e, "scales", bytes) for e in rows]
            signs = [self._field(e, "signs", bytes) for e in rows]
        except DecodeError:
            return super().decode_rows(rows)
        if any(len(r) != 4 for r in raw):
            return super().decode_rows(rows)
        scales = np.frombuffer(b"".join(raw), dtype="<f4").astype(np.float32)
        bits = unpack_bits_rows(signs, 1, first.numel)
        if bits is None or not np.isfinite(scales).all() or (scales < 0).any():
            return super().decode_rows(rows)
        out = torch.from_numpy(bits).float().mul_(2).sub_(1).mul_(torch.from_numpy(scales)[:, None])
        return out.view(len(rows), *first.shape)
