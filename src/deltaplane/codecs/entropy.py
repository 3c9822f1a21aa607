"""Lossless building blocks for codecs: bit packing and index (position) coding.

Everything is vectorized numpy: these run on every tensor of every update, so a Python loop per value would
dominate the cost of compression.
"""

from __future__ import annotations

import numpy as np

from deltaplane.errors import DecodeError

__all__ = [
    "bitmap_decode",
    "bitmap_encode",
    "decode_indices",
    "encode_indices",
    "pack_bits",
    "unpack_bits",
    "varint_decode",
    "varint_encode",
]


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer ``codes`` (each < 2**bits) into ``ceil(len * bits / 8)`` bytes, little-endian."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.tobytes()
    if bits == 1:
        return np.packbits(codes, bitorder="little").tobytes()
    if bits in (2, 4):
        per = 8 // bits
        pad = (-len(codes)) % per
        c = np.concatenate([codes, np.zeros(pad, np.uint8)]).reshape(-1, per)
        out = np.zeros(len(c), np.uint8)
        for j in range(per):
            out |= c[:, j] << np.uint8(j * bits)
        return out.tobytes()
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; raises :class:`DecodeError` unless ``data`` holds exactly ``n`` codes."""
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {bits}-bit codes: {len(data)} bytes for {n} values, expected {need}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    if bits == 1:
        return np.unpackbits(raw, bitorder="little", count=n)
    if bits in (2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((len(raw), per), np.uint8)
        for j in range(per):
            out[:, j] = (raw >> np.uint8(j * bits)) & mask
        return out.reshape(-1)[:n]
    planes = np.unpackbits(raw, bitorder="little", count=n * bits).reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


# -- varint (LEB128) --------------------------------------------------------------------------------------
_MAX_VARINT_BYTES = 5  # values < 2**35: positions in tensors of up to 34 billion values


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128-encode non-negative integers (7 bits a byte, high bit = more bytes follow)."""
    v = np.asarray(values, dtype=np.uint64)
    if len(v) == 0:
        return b""
    if int(v.max()) >= 1 << (7 * _MAX_VARINT_BYTES):
        raise ValueError("varint value too large")
    nbytes = np.ones(len(v), np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * j))
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]), np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Decode exactly ``count`` LEB128 values from ``data`` (int64); anything else is a :class:`DecodeError`."""
    b = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if len(b):
            raise DecodeError("varint stream has trailing bytes")
        return np.zeros(0, np.int64)
    if len(b) == 0 or b[-1] & 0x80:
        raise DecodeError("varint stream is truncated")
    ends = np.flatnonzero((b & 0x80) == 0)
    if len(ends) != count:
        raise DecodeError(f"varint stream holds {len(ends)} values, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise DecodeError("varint value is too long")
    group = np.repeat(np.arange(count), lengths)
    pos = np.arange(len(b)) - np.repeat(starts, lengths)
    # float64 holds these exactly: every value is < 2**35
    parts = (b & 0x7F).astype(np.float64) * np.exp2(7 * pos)
    return np.bincount(group, weights=parts, minlength=count).astype(np.int64)


# -- bitmap ----------------------------------------------------------------------------------------------
def bitmap_encode(idx: np.ndarray, n: int) -> bytes:
    """One bit per position (set where kept): ``ceil(n / 8)`` bytes, cheapest when many positions are kept."""
    mask = np.zeros(n, np.uint8)
    mask[idx] = 1
    return np.packbits(mask, bitorder="little").tobytes()


def bitmap_decode(data: bytes, n: int) -> np.ndarray:
    need = (n + 7) // 8
    if len(data) != need:
        raise DecodeError(f"bitmap holds {len(data)} bytes, expected {need} for {n} positions")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if bits[n:].any():
        raise DecodeError("bitmap has bits set beyond the tensor's end")
    return np.flatnonzero(bits[:n]).astype(np.int64)


# -- choose the cheapest ---------------------------------------------------------------------------------
def _gaps(idx: np.ndarray) -> np.ndarray:
    # first position as is, then (gap - 1): positions are strictly increasing so every gap is >= 1
    return np.diff(idx, prepend=-1) - 1


INDEX_CODERS = ("bitmap", "varint")


def encode_indices(idx: np.ndarray, n: int) -> tuple[str, bytes]:
    """Code sorted unique positions in ``[0, n)`` with the cheapest coder; returns ``(coder_name, bytes)``."""
    idx = np.asarray(idx, dtype=np.int64)
    candidates = {"varint": varint_encode(_gaps(idx))}
    if (n + 7) // 8 < len(candidates["varint"]):
        candidates["bitmap"] = bitmap_encode(idx, n)
    name = min(candidates, key=lambda k: len(candidates[k]))
    return name, candidates[name]


def decode_indices(coder: str, data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`encode_indices`: exactly ``k`` strictly increasing positions in ``[0, n)``."""
    if coder == "varint":
        idx = np.cumsum(varint_decode(data, k) + 1) - 1
    elif coder == "bitmap":
        idx = bitmap_decode(data, n)
    else:
        raise DecodeError(f"unknown index coder {coder!r}; known: {', '.join(INDEX_CODERS)}")
    if len(idx) != k:
        raise DecodeError(f"index stream holds {len(idx)} positions, expected {k}")
    if k and (idx[-1] >= n or idx[0] < 0):
        raise DecodeError(f"index stream points outside the tensor (size {n})")
    return idx
