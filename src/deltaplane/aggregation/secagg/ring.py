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
    """Pack uint32 (or uint16) ``values`` (each < 2^bits) at exactly ``bits`` bits each, little-endian bit order."""
    v = np.asarray(values)
    if not (v.dtype in (np.uint16, np.uint32) and v.flags.c_contiguous):
        v = np.ascontiguousarray(v, dtype=np.uint32)
    if bits in (8, 16, 32):
        return v.astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).tobytes()
    if bits > 8 and len(v):
        n = len(v)
        if n % 8:
            v = np.concatenate([v, np.zeros(-n % 8, v.dtype)])
        out = (
            _pack_lanes(v.astype(np.uint16, copy=False), bits) if bits < 16 else _pack_groups(v, bits)
        ).tobytes()
        return out if n % 8 == 0 else out[: (n * bits + 7) // 8]  # the last group's padding
    # the little-endian bits of each value, keep the low `bits` of each, repack densely
    planes = np.unpackbits(v.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes()


# Eight values of ``bits`` bits fill exactly ``bits`` bytes: a group. Value ``j`` of a group holds its bits
# ``j · bits … j · bits + bits − 1``, so it lies in (at most two) of the group's 64-bit little-endian words.
# Packing and unpacking run over the eight columns ``v[j::8]`` and the group's words, a few vectorized passes of
# n / 8 aligned, contiguous 64-bit integers each, instead of a byte per bit.
def _spans(bits: int) -> list[tuple[int, int, int]]:
    """``(j, word, shift)`` for every value ``j`` and group word it overlaps: value bits start at ``shift``."""
    return [
        (j, w, j * bits - 64 * w)
        for j in range(8)
        for w in range(j * bits // 64, (j * bits + bits - 1) // 64 + 1)
    ]


def _pack_groups(v: np.ndarray, groups_bits: int) -> np.ndarray:
    """The ``(len(v) / 8, bits)`` bytes of the groups of ``v`` (a multiple of 8 values, each < 2^bits)."""
    bits, groups = groups_bits, len(v) // 8
    words = np.zeros((-(-bits // 8), groups), dtype="<u8")  # word w of every group, contiguous
    x, t = np.empty(groups, np.uint64), np.empty(groups, np.uint64)
    last = -1
    for j, w, shift in _spans(bits):
        if j != last:
            np.copyto(x, v[j::8])
            last = j
        if shift >= 0:
            np.left_shift(x, np.uint64(shift), out=t)  # bits beyond the word fall off
        else:
            np.right_shift(x, np.uint64(-shift), out=t)  # the value's high bits, in the next word
        np.bitwise_or(words[w], t, out=words[w])
    return np.ascontiguousarray(words.T).view(np.uint8)[:, :bits]


def _pack_lanes(v: np.ndarray, bits: int) -> np.ndarray:
    """:func:`_pack_groups` for 8 < ``bits`` < 16 from uint16 values, on whole words of four 16-bit lanes.

    Each little-endian u64 of ``v`` holds four values in 16-bit lanes; shifting lane ``j`` down by
    ``(16 − bits) · j`` and masking closes the gaps (``4 · bits`` bits), and two such words make a group.
    All passes are contiguous, where the group-word path reads every eighth value.
    """
    groups, gap, low = len(v) // 8, 16 - bits, (1 << bits) - 1
    lanes = v.view("<u8")
    x = lanes & np.uint64(low)
    t = np.empty_like(x)
    for j in range(1, 4):
        np.right_shift(lanes, np.uint64(gap * j), out=t)
        np.bitwise_and(t, np.uint64(low << (bits * j)), out=t)
        np.bitwise_or(x, t, out=x)
    words = np.empty((groups, 2), "<u8")  # the group's bytes 0-7 and 8-15 (of which `bits` are used)
    first, second = x[0::2], x[1::2]
    np.left_shift(second, np.uint64(4 * bits), out=words[:, 0])
    np.bitwise_or(words[:, 0], first, out=words[:, 0])
    np.right_shift(second, np.uint64(64 - 4 * bits), out=words[:, 1])
    return words.view(np.uint8)[:, :bits]


def _unpack_groups(data: bytes, bits: int, groups: int) -> np.ndarray:
    """``(8, groups)`` uint32: column ``j`` of the first ``groups`` groups in ``data``."""
    nw = -(-bits // 8)
    raw = np.zeros((groups, 8 * nw), np.uint8)
    raw[:, :bits] = np.frombuffer(data, dtype=np.uint8, count=groups * bits).reshape(groups, bits)
    words = np.ascontiguousarray(raw.view("<u8").T)  # (words, groups)
    out = np.zeros((8, groups), np.uint32)
    t = np.empty(groups, np.uint64)
    low = np.uint64((1 << bits) - 1)
    for j, w, shift in _spans(bits):
        if shift >= 0:
            np.right_shift(words[w], np.uint64(shift), out=t)
        else:
            np.left_shift(words[w], np.uint64(-shift), out=t)
        np.bitwise_and(t, low, out=t)
        np.bitwise_or(out[j], t, out=out[j], casting="unsafe")  # < 2^bits: the cast keeps every bit
    return out


def unpack(data: bytes, bits: int, n: int, *, add_to: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`pack`; raises :class:`DecodeError` unless ``data`` holds exactly ``n`` values.

    ``add_to`` (uint32, ``n`` values): add the values to it in place (modulo 2³²) and return it instead (the
    server's running sum of masked inputs).
    """
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {bits}-bit ring values: {len(data)} bytes for {n} values, expected {need}")
    if add_to is not None:
        if add_to.dtype != np.uint32 or add_to.shape != (n,):
            raise DecodeError(f"values are added to a uint32 array of {n}, not {add_to.dtype} {add_to.shape}")
        full = n // 8 if bits > 8 and bits not in (16, 32) else 0  # whole groups, `bits` bytes each
        if full:
            head = add_to[: full * 8].reshape(full, 8)
            head += _unpack_groups(data, bits, full).T  # wraps mod 2^32
        if full * 8 < n:  # the rest starts on a byte boundary
            add_to[full * 8 :] += unpack(data[full * bits :], bits, n - full * 8)
        return add_to
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype={8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).astype(np.uint32)
    if bits > 8 and n:
        groups = -(-n // 8)
        padded = bytes(data) + bytes(groups * bits - need)
        return np.ascontiguousarray(_unpack_groups(padded, bits, groups).T).reshape(-1)[:n]
    planes = np.zeros((n, 32), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(
        np.frombuffer(data, dtype=np.uint8), bitorder="little", count=n * bits
    ).reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u4").reshape(n).astype(np.uint32)
