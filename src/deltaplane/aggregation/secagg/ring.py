"""Fixed-point integer ring for secure aggregation: quantize floats to ``bits``-bit codes, mask and sum mod 2ᵏ.

Each client maps its clipped values to unsigned ``bits``-bit integers with unbiased stochastic rounding; the
server adds masked codes modulo ``2ᵏ`` with ``k = bits + ⌈log₂ n⌉``, so the sum of ``n`` codes never wraps and
the unmasked ring sum *is* the integer sum. Masks live in the same ring, so masking works directly on the
quantized update (no float ever crosses the wire). Values are packed at exactly ``k`` bits each.
"""

from __future__ import annotations

import math

import numpy as np

from deltaplane.errors import ConfigError, DecodeError

__all__ = ["dequantize_sum", "pack", "quantize", "ring_bits", "unpack"]


def ring_bits(bits: int, num_clients: int) -> int:
    """Smallest ``k`` such that the sum of ``num_clients`` codes of ``bits`` bits fits in ``[0, 2ᵏ)``."""
    k = bits + max(0, math.ceil(math.log2(num_clients)))
    if k > 32:
        raise ConfigError(f"{bits}-bit codes summed over {num_clients} clients need a {k}-bit ring (max 32)")
    return k


def quantize(values: np.ndarray, *, clip_range: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Codes in ``[0, 2^bits − 1]`` for ``values`` clipped to ``[−clip_range, clip_range]``; unbiased rounding."""
    levels = (1 << bits) - 1
    x = (np.clip(values.astype(np.float64), -clip_range, clip_range) + clip_range) * (
        levels / (2 * clip_range)
    )
    return np.minimum(np.floor(x + rng.random(x.shape)), levels).astype(np.uint32)


def dequantize_sum(codes_sum: np.ndarray, *, count: int, clip_range: float, bits: int) -> np.ndarray:
    """The float sum of ``count`` clients' values from the integer sum of their codes."""
    levels = (1 << bits) - 1
    return codes_sum.astype(np.float64) * (2 * clip_range / levels) - count * clip_range


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack uint32 ``values`` (each < 2^bits) at exactly ``bits`` bits each, little-endian bit order."""
    v = np.ascontiguousarray(values, dtype=np.uint32)
    if bits in (8, 16, 32):
        return v.astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).tobytes()
    if bits > 8 and len(v):
        n, groups = len(v), _groups(len(v))
        buf = np.zeros(groups * bits + 8, np.uint8)
        if n % 8:
            v = np.concatenate([v, np.zeros(groups * 8 - n, np.uint32)])
        word = np.empty(groups, np.uint64)
        for j, window, shift in _windows(buf, bits):
            np.copyto(word, v[j::8])
            np.bitwise_or(window, np.left_shift(word, shift, out=word), out=window)
        return buf[: (n * bits + 7) // 8].tobytes()
    # the little-endian bits of each value, keep the low `bits` of each, repack densely
    planes = np.unpackbits(v.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes()


def _groups(n: int) -> int:
    return -(-n // 8)


def _windows(buf: np.ndarray, bits: int) -> list[tuple[int, np.ndarray, np.uint64]]:
    """For each ``j`` in 0..7: the 8-byte little-endian word holding value ``j`` of every group of 8.

    Eight values of ``bits`` bits fill exactly ``bits`` bytes, so value ``j`` of group ``g`` starts at bit
    ``(j · bits) mod 8`` of byte ``g · bits + ⌊j · bits / 8⌋`` and (``bits`` ≤ 32) ends within the next 8
    bytes. With ``bits`` ≥ 8 the words of one ``j`` never overlap, so each is a plain strided (unaligned) view
    that one vectorized operation reads or ORs into: eight passes in all, instead of a byte a bit.
    """
    groups = (len(buf) - 8) // bits
    out = []
    for j in range(8):
        offset, shift = divmod(j * bits, 8)
        window = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=offset, strides=(bits,))
        out.append((j, window, np.uint64(shift)))
    return out


def unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack`; raises :class:`DecodeError` unless ``data`` holds exactly ``n`` values."""
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {bits}-bit ring values: {len(data)} bytes for {n} values, expected {need}")
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype={8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).astype(np.uint32)
    if bits > 8 and n:
        buf = np.zeros(_groups(n) * bits + 8, np.uint8)
        buf[:need] = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(_groups(n) * 8, np.uint32)
        word = np.empty(_groups(n), np.uint64)
        low = np.uint64((1 << bits) - 1)
        for j, window, shift in _windows(buf, bits):
            np.bitwise_and(np.right_shift(window, shift, out=word), low, out=word)
            np.copyto(out[j::8], word, casting="unsafe")  # < 2^bits: the cast keeps every bit
        return out[:n]
    planes = np.zeros((n, 32), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(
        np.frombuffer(data, dtype=np.uint8), bitorder="little", count=n * bits
    ).reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u4").reshape(n).astype(np.uint32)
