"""Lossless building blocks for codecs: bit packing and index (position) coding.

Everything is vectorized numpy: these run on every tensor of every update, so a Python loop per value would
dominate the cost of compression.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from deltaplane.errors import DecodeError

__all__ = [
    "bitmap_decode",
    "bitmap_encode",
    "check_index_stream",
    "decode_indices",
    "decode_indices_rows",
    "encode_indices",
    "encode_indices_ragged",
    "encode_indices_rows",
    "golomb_decode",
    "golomb_encode",
    "index_sizes",
    "max_index_stream_bytes",
    "pack_bits",
    "pack_bits_ragged",
    "pack_bits_rows",
    "unpack_bits",
    "unpack_bits_ragged",
    "unpack_bits_rows",
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


def pack_bits_rows(codes: np.ndarray, bits: int) -> list[bytes]:
    """:func:`pack_bits` of every row of a ``(rows, n)`` matrix of codes, byte for byte: each row packed on
    its own (padded to a byte), the rows packed together."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    rows, n = codes.shape
    if bits == 8:
        packed = codes
    elif bits == 1:
        packed = np.packbits(codes, axis=1, bitorder="little")
    elif bits in (2, 4):
        per = 8 // bits
        pad = (-n) % per
        c = np.concatenate([codes, np.zeros((rows, pad), np.uint8)], axis=1).reshape(
            rows, (n + pad) // per, per
        )
        packed = np.zeros(c.shape[:2], np.uint8)
        for j in range(per):
            packed |= c[:, :, j] << np.uint8(j * bits)
    else:
        planes = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
        packed = np.packbits(planes.reshape(rows, n * bits), axis=1, bitorder="little")
    return [r.tobytes() for r in packed]


def pack_bits_ragged(codes: np.ndarray, bits: int, sizes: Sequence[int]) -> list[bytes]:
    """:func:`pack_bits` of rows of different sizes (row ``i``: the next ``sizes[i]`` of ``codes``), byte for
    byte: each row packed on its own and padded to a byte, all rows in one pass.

    The counterpart of :func:`unpack_bits_ragged`: code ``j`` of a row puts its bit ``b`` at bit
    ``j·bits + b`` of the row's little-endian bit stream (what every width of :func:`pack_bits` does), so
    all rows' bits are laid into one stream at each row's first byte and packed at once.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n = np.asarray(sizes, np.int64)
    if (n < 0).any() or int(n.sum()) != len(codes):
        raise ValueError(f"pack_bits_ragged: {len(codes)} codes do not split into sizes {n.tolist()}")
    need = (n * bits + 7) // 8
    ends = np.cumsum(need)
    starts = ends - need
    if bits == 8:
        out = codes
    elif bits in (1, 2, 4):
        # each row's codes from the first slot of its first byte on (8 / bits slots a byte); the slots past
        # a row's last code stay zero, its last byte's padding
        per = 8 // bits
        slots = np.zeros(int(ends[-1]) * per if len(n) else 0, np.uint8)
        slots[np.repeat(starts * per - (np.cumsum(n) - n), n) + np.arange(len(codes))] = codes
        if bits == 1:
            out = np.packbits(slots, bitorder="little")
        else:
            grouped = slots.reshape(-1, per)
            out = grouped[:, 0].copy()
            for j in range(1, per):
                out |= grouped[:, j] << np.uint8(j * bits)
    else:
        first_bit = np.repeat(starts * 8, n) + (np.arange(len(codes)) - np.repeat(np.cumsum(n) - n, n)) * bits
        stream = np.zeros(int(ends[-1]) * 8 if len(n) else 0, np.uint8)
        for b in range(bits):
            stream[first_bit + b] = (codes >> np.uint8(b)) & np.uint8(1)
        out = np.packbits(stream, bitorder="little")
    joined = out.tobytes()
    return [joined[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; raises :class:`DecodeError` unless ``data`` holds exactly ``n`` codes."""
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {bits}-bit codes: {len(data)} bytes for {n} values, expected {need}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    # bits of the last byte that hold codes; the rest must be zero, so each value set has one payload
    used = (n * bits) % 8
    if used and int(raw[-1]) >> used:
        raise DecodeError(f"packed {bits}-bit codes: the padding bits of the last byte are not zero")
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


def unpack_bits_rows(data: Sequence[bytes], bits: int, n: int) -> np.ndarray | None:
    """:func:`unpack_bits` of every row at once, a ``(rows, n)`` uint8 matrix; ``None`` where it would refuse
    a row (a length, padding bits), so the caller can read the rows one by one for that row's own error."""
    need = (n * bits + 7) // 8
    if any(len(d) != need for d in data):
        return None
    if not data:
        return np.zeros((0, n), np.uint8)
    raw = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(len(data), need)
    if bits == 8:
        return raw.copy()
    used = (n * bits) % 8
    if used and (raw[:, -1] >> used).any():
        return None
    if bits == 1:
        return np.unpackbits(raw, axis=1, bitorder="little", count=n)
    if bits in (2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((len(data), need, per), np.uint8)
        for j in range(per):
            out[:, :, j] = (raw >> np.uint8(j * bits)) & mask
        return np.ascontiguousarray(out.reshape(len(data), -1)[:, :n])
    planes = np.unpackbits(raw, axis=1, bitorder="little", count=n * bits).reshape(len(data), n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)


def unpack_bits_ragged(data: Sequence[bytes], bits: int, sizes: Sequence[int]) -> np.ndarray | None:
    """:func:`unpack_bits` of rows of different sizes (row ``i``: ``sizes[i]`` codes), every row's codes back to
    back in one array; ``None`` where it would refuse a row (a length, padding bits).

    Every width packs code ``j``'s bit ``b`` at bit ``j·bits + b`` of a little-endian bit stream padded to a
    byte (bytes of 8 / ``bits`` codes for 1, 2 and 4 bits; bit planes for 3, 5, 6 and 7), so one unpacking
    of all rows' bytes is cut at each row's first byte.
    """
    n = np.asarray(sizes, np.int64)
    need = (n * bits + 7) // 8
    if len(data) != len(n) or any(len(d) != m for d, m in zip(data, need.tolist(), strict=True)):
        return None
    raw = np.frombuffer(b"".join(data), dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    used = (n * bits) % 8
    last = np.cumsum(need) - 1
    tail = used > 0  # a row whose last byte is partly padding (rows of no codes have no byte)
    if tail.any() and (raw[last[tail]] >> used[tail].astype(np.uint8)).any():
        return None
    total = int(n.sum())
    stream = np.unpackbits(raw, bitorder="little")
    first_bit = (
        np.repeat((np.cumsum(need) - need) * 8, n)
        + (np.arange(total) - np.repeat(np.cumsum(n) - n, n)) * bits
    )
    out = np.zeros(total, np.uint8)
    for b in range(bits):
        out |= stream[first_bit + b] << np.uint8(b)
    return out


# -- varint (LEB128) --------------------------------------------------------------------------------------
_MAX_VARINT_BYTES = 5  # values < 2**35: positions in tensors of up to 34 billion values
_VARINT_BLOCK = 1 << 14


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
    """Decode exactly ``count`` LEB128 values from ``data`` (int64); anything else is a :class:`DecodeError`.

    Works a block of values at a time, in place over the array of value ends, so decoding needs about
    8 bytes a value beyond the stream itself.
    """
    b = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if len(b):
            raise DecodeError("varint stream has trailing bytes")
        return np.zeros(0, np.int64)
    if len(b) == 0 or b[-1] & 0x80:
        raise DecodeError("varint stream is truncated")
    out = np.flatnonzero(b < 0x80)  # each value's last byte; becomes the values, block by block
    if len(out) != count:
        raise DecodeError(f"varint stream holds {len(out)} values, expected {count}")
    start = 0
    for lo in range(0, count, _VARINT_BLOCK):
        ends = out[lo : lo + _VARINT_BLOCK]
        starts = np.empty_like(ends)
        starts[0] = start
        starts[1:] = ends[:-1] + 1
        start = int(ends[-1]) + 1
        lengths = ends - starts + 1
        longest = int(lengths.max())
        if longest > _MAX_VARINT_BYTES:
            raise DecodeError("varint value is too long")
        value = np.zeros(len(ends), np.int64)
        for j in range(longest):
            sel = lengths > j
            value[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.int64) << (7 * j)
        ends[:] = value
    return out


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


# -- Golomb-Rice -----------------------------------------------------------------------------------------
_MAX_RICE_K = 40
_RICE_BLOCK = 1 << 11


def _rice_sizes(gaps: np.ndarray, ks: range) -> dict[int, int]:
    """Exact byte size of :func:`golomb_encode` for each Rice parameter in ``ks`` (without encoding)."""
    count = len(gaps)
    return {k: 1 + (count * k + 7) // 8 + (int((gaps >> k).sum()) + count + 7) // 8 for k in ks}


def golomb_best_k(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter ``k`` that codes ``gaps`` in the fewest bytes, and that size.

    For geometric gaps of mean ``m`` the optimum is near ``log2(m · ln 2)`` (Gallager & van Voorhis 1975);
    the three parameters around it are sized exactly and the smallest wins.
    """
    mean = float(gaps.mean()) if len(gaps) else 0.0
    k0 = math.floor(math.log2(mean * math.log(2))) if mean * math.log(2) > 1 else 0
    ks = range(max(0, k0 - 1), min(_MAX_RICE_K, k0 + 1) + 1)
    sizes = _rice_sizes(gaps, ks)
    k = min(sizes, key=lambda j: (sizes[j], j))
    return k, sizes[k]


def golomb_encode(gaps: np.ndarray, k: int | None = None) -> bytes:
    """Golomb-Rice code of non-negative integers: ``u8 k | remainders | quotients``.

    Each value ``g`` is split into ``q = g >> k`` (sent in unary: ``q`` one-bits then a zero-bit) and the ``k``
    low bits ``r``. The remainders of all values come first as fixed-width ``k``-bit fields, then all unary
    quotients; both sections are bit streams packed LSB-first and padded to a byte (remainders with zero-bits,
    quotients with one-bits). Grouping the sections instead of interleaving them codes exactly the same bits
    per value (``q + 1 + k``) but lets numpy encode and decode without a per-value Python loop. Golomb coding
    of sparse positions is what STC uses (Sattler et al. 2019, https://arxiv.org/abs/1903.02891).
    """
    g = np.asarray(gaps, dtype=np.int64)
    if k is None:
        k = golomb_best_k(g)[0]
    if not 0 <= k <= _MAX_RICE_K:
        raise ValueError(f"Rice parameter must be in 0..{_MAX_RICE_K}")
    count = len(g)
    if count == 0:
        return bytes([k])
    if k:
        planes = (g[:, None] >> np.arange(k, dtype=np.int64)) & 1
        rem = np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()
    else:
        rem = b""
    q = g >> k
    ends = np.cumsum(q + 1) - 1  # position of each value's terminating zero-bit
    total = int(ends[-1]) + 1
    bits = np.ones(total + (-total) % 8, np.uint8)  # one-bits, padding included
    bits[ends] = 0
    return bytes([k]) + rem + np.packbits(bits, bitorder="little").tobytes()


def golomb_decode(data: bytes, count: int) -> np.ndarray:
    """Decode exactly ``count`` values written by :func:`golomb_encode`; anything else is a DecodeError."""
    if len(data) < 1:
        raise DecodeError("Golomb stream is empty (missing its Rice parameter byte)")
    k = data[0]
    if k > _MAX_RICE_K:
        raise DecodeError(f"Golomb Rice parameter {k} exceeds {_MAX_RICE_K}")
    rem_len = (count * k + 7) // 8
    if len(data) < 1 + rem_len:
        raise DecodeError("Golomb stream is truncated in its remainder section")
    if count == 0:
        if len(data) != 1:
            raise DecodeError("Golomb stream has trailing bytes")
        return np.zeros(0, np.int64)
    rem = np.frombuffer(data, np.uint8, rem_len, 1)
    used = (count * k) % 8
    if used and int(rem[-1]) >> used:
        raise DecodeError("Golomb remainder section has non-zero padding")
    ubits = np.unpackbits(
        np.frombuffer(data, np.uint8, len(data) - 1 - rem_len, 1 + rem_len), bitorder="little"
    )
    zeros = np.flatnonzero(ubits == 0)
    if len(zeros) != count:
        raise DecodeError(f"Golomb stream holds {len(zeros)} values, expected {count}")
    if len(ubits) - 1 - int(zeros[-1]) >= 8:
        raise DecodeError("Golomb quotient section has trailing bytes")
    del ubits
    # q_j = zeros_j - zeros_{j-1} - 1, in place from the end backwards, a block at a time (a block's
    # overlapping right-hand side is copied, so each step reads the original values)
    q = zeros
    for hi in range(count, 0, -_RICE_BLOCK):
        lo = max(0, hi - _RICE_BLOCK)
        if lo:
            q[lo:hi] -= q[lo - 1 : hi - 1]
        else:
            q[1:hi] -= q[0 : hi - 1]
            q[0] += 1  # zeros_{-1} = -1
    q -= 1
    if int(q.max()) >= 1 << (62 - k):
        raise DecodeError("Golomb value is too large")
    q <<= k
    if k:
        # remainders a block of values at a time: unpacked bits take a byte each, and 8 more as int64 planes,
        # so the whole section at once would cost 64x its size
        weights = np.left_shift(1, np.arange(k, dtype=np.int64))
        for lo in range(0, count, _RICE_BLOCK):  # _RICE_BLOCK values are a whole number of bytes
            hi = min(count, lo + _RICE_BLOCK)
            bits = np.unpackbits(rem[lo * k // 8 : (hi * k + 7) // 8], bitorder="little", count=(hi - lo) * k)
            q[lo:hi] |= bits.reshape(hi - lo, k) @ weights
    return q


# -- choose the cheapest ---------------------------------------------------------------------------------
def _gaps(idx: np.ndarray) -> np.ndarray:
    # first position as is, then (gap - 1): positions are strictly increasing so every gap is >= 1
    return np.diff(idx, prepend=-1) - 1


def _varint_size(v: np.ndarray) -> int:
    size = len(v)
    for j in range(1, _MAX_VARINT_BYTES):
        size += int(np.count_nonzero(v >= (1 << (7 * j))))
    return size


INDEX_CODERS = ("bitmap", "varint", "golomb")
#: positions coded together by :func:`encode_indices_rows` (rows of more than 1/16 of it go one by one)
_ROWS_BLOCK = 1 << 16


def index_sizes(idx: np.ndarray, n: int) -> dict[str, int]:
    """Exact bytes each index coder would take for sorted unique positions ``idx`` in ``[0, n)``."""
    gaps = _gaps(np.asarray(idx, dtype=np.int64))
    return {"bitmap": (n + 7) // 8, "varint": _varint_size(gaps), "golomb": golomb_best_k(gaps)[1]}


def encode_indices(idx: np.ndarray, n: int) -> tuple[str, bytes]:
    """Code sorted unique positions in ``[0, n)`` with the cheapest coder; returns ``(coder_name, bytes)``.

    Sizes are computed exactly before anything is encoded, so only the winner is built: a bitmap wins when
    many positions are kept, Golomb-Rice when positions are sparse and evenly spread (the usual case after
    top-k), delta-varint when the gaps are very uneven. Ties prefer the coder listed first in
    :data:`INDEX_CODERS`.
    """
    idx = np.asarray(idx, dtype=np.int64)
    gaps = _gaps(idx)
    k, golomb_size = golomb_best_k(gaps)
    sizes = {"bitmap": (n + 7) // 8, "varint": _varint_size(gaps), "golomb": golomb_size}
    name = min(INDEX_CODERS, key=lambda c: sizes[c])
    if name == "bitmap":
        return name, bitmap_encode(idx, n)
    if name == "varint":
        return name, varint_encode(gaps)
    return name, golomb_encode(gaps, k)


def encode_indices_rows(idx: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    """Every row's :func:`encode_indices` at once, for a ``(rows, k)`` matrix of positions (one count).

    Exactly ``[encode_indices(row, n) for row in idx]``, byte for byte: each row's three sizes are the
    per-row coder's (the Rice parameter from the same mean, its candidates sized exactly, ties to the
    smaller parameter and to the coder listed first), and the rows of each coder are encoded together.
    Every coder's streams are byte-aligned per row, so one stream of the rows back to back is cut into
    the rows' streams: varint values take whole bytes; a bitmap row is ``ceil(n / 8)`` bytes; a
    Golomb-Rice row's remainder and quotient sections are each padded to a byte. Rows are taken a block
    of at most ``2^16`` positions at a time, and rows of over 4096 positions one by one.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2:
        raise ValueError(f"encode_indices_rows takes a (rows, k) matrix, not shape {idx.shape}")
    rows, count = idx.shape
    if not count or count * 16 > _ROWS_BLOCK:
        # long rows (over 4096 positions): a row's work is large beside a call's fixed cost, and one row at a
        # time stays in the cache (measured: 20 rows of 10^4 to 3·10^4 positions coded together took ~10%
        # longer than one by one; of 33 to 2097 positions, 0.2-0.8x)
        return [encode_indices(r, n) for r in idx]
    step = _ROWS_BLOCK // count
    out: list[tuple[str, bytes]] = []
    for lo in range(0, rows, step):
        out += _encode_block(idx[lo : lo + step], n)
    return out


def _choose_coders(
    k0: list[int],
    counts: np.ndarray,
    shifted_sums: Callable[[int], np.ndarray],
    bitmap: int,
    varint: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's index coder, by exact size, as :func:`encode_indices` chooses it: ``(rice, choice)``.

    ``k0`` is each row's Golomb-Rice estimate (its candidates are ``k0 - 1 .. k0 + 1``, as ``golomb_best_k``
    tries), ``counts`` each row's number of positions, ``shifted_sums(k)`` each row's sum of ``gap >> k``,
    ``bitmap`` and ``varint`` the other two coders' sizes. ``choice`` is 0 (bitmap), 1 (varint) or 2
    (Golomb-Rice, with parameter ``rice``): the first coder of the smallest size, ties included.
    """
    rows = len(counts)
    cand = np.maximum(np.array(k0, np.int64) - 1, 0)[:, None] + np.arange(3)  # (rows, 3), ascending
    hi = np.minimum(np.array(k0, np.int64) + 1, _MAX_RICE_K)[:, None]
    sizes = np.full((rows, 3), np.iinfo(np.int64).max, np.int64)
    for k in np.unique(cand[cand <= hi]).tolist():
        s = shifted_sums(k)
        at = (cand == k) & (cand <= hi)  # not a parameter above a row's own k0 + 1, which another row may try
        r = np.nonzero(at)[0]
        sizes[at] = 1 + (counts[r] * k + 7) // 8 + (s[r] + counts[r] + 7) // 8
    best = sizes.argmin(axis=1)  # the first of equal sizes: the smaller parameter, as golomb_best_k
    rice = cand[np.arange(rows), best]
    golomb = sizes[np.arange(rows), best]
    # the first coder of the smallest size: bitmap, then varint, then golomb
    choice = np.where((bitmap <= varint) & (bitmap <= golomb), 0, np.where(varint <= golomb, 1, 2))
    return rice, choice


def _encode_block(idx: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    """:func:`encode_indices_rows` of a block of rows (``rows · k`` at most ``_ROWS_BLOCK`` positions)."""
    rows, count = idx.shape
    gaps = idx - np.concatenate([np.full((rows, 1), -1, np.int64), idx[:, :-1]], axis=1) - 1
    # sizes, as encode_indices takes them: bitmap, varint, then Golomb-Rice's best of three parameters
    bitmap = (n + 7) // 8
    varint = np.full(rows, count, np.int64)
    widest = int(gaps.max())
    for j in range(1, _MAX_VARINT_BYTES):
        if widest < 1 << (7 * j):
            break
        varint += np.count_nonzero(gaps >= (1 << (7 * j)), axis=1)
    totals = gaps.sum(axis=1).tolist()  # exact: each gap is below n; the per-row mean divides the same sum
    ln2 = math.log(2)
    k0 = [math.floor(math.log2(t / count * ln2)) if t / count * ln2 > 1 else 0 for t in totals]
    if max(k0) > _MAX_RICE_K + 1:  # no parameter to choose: the per-row coder's own error
        return [encode_indices(r, n) for r in idx]
    rice, choice = _choose_coders(
        k0, np.full(rows, count, np.int64), lambda k: (gaps >> k).sum(axis=1), bitmap, varint
    )
    out: list[tuple[str, bytes]] = [("", b"")] * rows
    for code, name in enumerate(INDEX_CODERS):
        sel = np.flatnonzero(choice == code)
        if not len(sel):
            continue
        if name == "bitmap":
            mask = np.zeros((len(sel), n), np.uint8)
            np.put_along_axis(mask, idx[sel], 1, axis=1)
            data = np.packbits(mask, axis=1, bitorder="little").tobytes()
            ends = np.arange(1, len(sel) + 1) * bitmap
        elif name == "varint":
            data = varint_encode(gaps[sel].reshape(-1))
            ends = np.cumsum(varint[sel])
        else:
            for r, stream in zip(sel.tolist(), _golomb_rows_encode(gaps[sel], rice[sel]), strict=True):
                out[r] = (name, stream)
            continue
        start = 0
        for r, end in zip(sel.tolist(), ends.tolist(), strict=True):
            out[r] = (name, data[start:end])
            start = end
    return out


def _golomb_rows_encode(gaps: np.ndarray, rice: np.ndarray) -> list[bytes]:
    """:func:`golomb_encode` of each row of ``gaps`` with its own parameter ``rice[row]``."""
    q = gaps >> rice[:, None]
    q += 1
    ends = np.cumsum(q, axis=1)  # one past each value's terminating zero-bit, within its row
    q_bits = (ends[:, -1] + 7) // 8 * 8  # each row's quotient section, padded with one-bits to a byte
    q_start = np.cumsum(q_bits) - q_bits
    ubits = np.ones(int(q_bits.sum()), np.uint8)
    ends += (q_start - 1)[:, None]
    ubits[ends.reshape(-1)] = 0
    quot = np.packbits(ubits, bitorder="little").tobytes()  # the rows' sections back to back
    rems = [b""] * len(rice)
    for k in np.unique(rice).tolist():
        if not k:
            continue
        sel = np.flatnonzero(rice == k)
        planes = (gaps[sel][:, :, None] >> np.arange(k, dtype=np.int64)) & 1
        packed = np.packbits(planes.astype(np.uint8).reshape(len(sel), -1), axis=1, bitorder="little")
        for r, row in zip(sel.tolist(), packed, strict=True):
            rems[r] = row.tobytes()
    q_at = [*(q_start // 8).tolist(), len(quot)]
    return [
        b"".join((bytes([k]), rem, quot[q_at[r] : q_at[r + 1]]))
        for r, (k, rem) in enumerate(zip(rice.tolist(), rems, strict=True))
    ]


def encode_indices_ragged(idx: np.ndarray, counts: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    """:func:`encode_indices_rows` of rows with different counts: ``idx`` holds every row's sorted positions
    back to back, ``counts[i]`` of them for row ``i``.

    Exactly ``[encode_indices(row, n) for row in rows]``, byte for byte, with each coder's rows encoded
    together as in :func:`encode_indices_rows` (the same sizes, ties and byte-aligned streams, summed per
    row segment). The same limits: rows go a block of at most ``2^16`` positions at a time, and rows of no
    positions or of over 4096 one by one (the rows between them still share a block).
    """
    idx = np.asarray(idx, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if idx.ndim != 1 or counts.ndim != 1 or int(counts.sum()) != len(idx) or (counts < 0).any():
        raise ValueError(f"encode_indices_ragged: {len(idx)} positions do not split into counts {counts}")
    ends = np.cumsum(counts)
    out: list[tuple[str, bytes]] = [("", b"")] * len(counts)
    # as encode_indices_rows: a row of no positions or of over 4096 on its own (it does not split a block)
    alone = (counts == 0) | (counts * 16 > _ROWS_BLOCK)
    for r in np.flatnonzero(alone).tolist():
        out[r] = encode_indices(idx[ends[r] - counts[r] : ends[r]], n)
    rows = np.flatnonzero(~alone)
    if not len(rows):
        return out
    if len(rows) < len(counts):
        idx, counts = idx[np.repeat(~alone, counts)], counts[rows]
    # blocks of consecutive rows of at most _ROWS_BLOCK positions together
    starts = (np.cumsum(counts) - counts).tolist()
    lo, held = 0, 0
    for r, c in enumerate([*counts.tolist(), _ROWS_BLOCK + 1]):
        if held + c > _ROWS_BLOCK:
            coded = _encode_ragged_block(idx[starts[lo] : starts[lo] + held], counts[lo:r], n)
            for row, stream in zip(rows[lo:r].tolist(), coded, strict=True):
                out[row] = stream
            lo, held = r, 0
        held += c
    return out


def _encode_ragged_block(idx: np.ndarray, counts: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    """:func:`encode_indices_ragged` of a block of rows, each of 1 to 4096 positions."""
    rows = len(counts)
    starts = np.cumsum(counts) - counts
    prev = np.empty_like(idx)
    prev[1:] = idx[:-1]
    prev[starts] = -1
    gaps = idx - prev - 1
    # sizes, as encode_indices takes them: bitmap, varint, then Golomb-Rice's best of three parameters
    bitmap = (n + 7) // 8
    varint = counts.copy()
    widest = int(gaps.max())
    for j in range(1, _MAX_VARINT_BYTES):
        if widest < 1 << (7 * j):
            break
        varint += np.add.reduceat((gaps >= (1 << (7 * j))).astype(np.int64), starts)
    totals = np.add.reduceat(gaps, starts).tolist()  # exact, as in _encode_block
    ln2 = math.log(2)
    k0 = [
        math.floor(math.log2(t / c * ln2)) if t / c * ln2 > 1 else 0
        for t, c in zip(totals, counts.tolist(), strict=True)
    ]
    if max(k0) > _MAX_RICE_K + 1:  # no parameter to choose: the per-row coder's own error
        return [
            encode_indices(idx[s : s + c], n) for s, c in zip(starts.tolist(), counts.tolist(), strict=True)
        ]
    rice, choice = _choose_coders(k0, counts, lambda k: np.add.reduceat(gaps >> k, starts), bitmap, varint)
    out: list[tuple[str, bytes]] = [("", b"")] * rows
    for code, name in enumerate(INDEX_CODERS):
        sel = np.flatnonzero(choice == code)
        if not len(sel):
            continue
        # the positions of the selected rows, in row order (all of them: no copy)
        picked = slice(None) if len(sel) == rows else np.repeat(choice == code, counts)
        if name == "bitmap":
            local = np.repeat(np.arange(len(sel)) * n, counts[sel])  # each selected row's place among them
            mask = np.zeros(len(sel) * n, np.uint8)
            mask[local + idx[picked]] = 1
            data = np.packbits(mask.reshape(len(sel), n), axis=1, bitorder="little").tobytes()
            ends = np.arange(1, len(sel) + 1) * bitmap
        elif name == "varint":
            data = varint_encode(gaps[picked])
            ends = np.cumsum(varint[sel])
        else:
            for r, stream in zip(
                sel.tolist(), _golomb_ragged_encode(gaps[picked], counts[sel], rice[sel]), strict=True
            ):
                out[r] = (name, stream)
            continue
        start = 0
        for r, end in zip(sel.tolist(), ends.tolist(), strict=True):
            out[r] = (name, data[start:end])
            start = end
    return out


def _golomb_ragged_encode(gaps: np.ndarray, counts: np.ndarray, rice: np.ndarray) -> list[bytes]:
    """:func:`golomb_encode` of each row (``counts[i]`` gaps back to back, at least one) with parameter
    ``rice[i]``: the rows' quotient sections and remainder sections each packed in one call."""
    q = gaps >> np.repeat(rice, counts)
    q += 1
    ends = np.cumsum(q)  # one past each value's terminating zero-bit, across all rows
    upto = ends[np.cumsum(counts) - 1]  # quotient bits of the rows up to each one's end, unpadded
    q_len = np.diff(upto, prepend=0)
    q_bits = (q_len + 7) // 8 * 8  # each row's section padded with one-bits to a byte
    q_start = np.cumsum(q_bits) - q_bits
    ubits = np.ones(int(q_bits.sum()), np.uint8)
    ends += np.repeat(q_start - (upto - q_len) - 1, counts)
    ubits[ends] = 0
    quot = np.packbits(ubits, bitorder="little").tobytes()
    rems = [b""] * len(rice)
    for k in np.unique(rice).tolist():
        if not k:
            continue
        sel = np.flatnonzero(rice == k)
        g = gaps if len(sel) == len(rice) else gaps[np.repeat(rice == k, counts)]
        bits = ((g[:, None] >> np.arange(k, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
        lengths = counts[sel] * k
        pads = -lengths % 8  # each row's remainders padded with zero-bits to a byte
        if pads.any():
            bits = np.insert(bits, np.repeat(np.cumsum(lengths), pads), 0)
        packed = np.packbits(bits, bitorder="little").tobytes()
        r_at = [0, *np.cumsum((lengths + pads) // 8).tolist()]
        for j, r in enumerate(sel.tolist()):
            rems[r] = packed[r_at[j] : r_at[j + 1]]
    q_at = [*(q_start // 8).tolist(), len(quot)]
    return [
        b"".join((bytes([k]), rem, quot[q_at[r] : q_at[r + 1]]))
        for r, (k, rem) in enumerate(zip(rice.tolist(), rems, strict=True))
    ]


def max_index_stream_bytes(coder: object, n: int, k: int) -> int:
    """Most bytes an index stream of ``coder`` may hold for ``k`` positions in ``[0, n)``, from the format
    alone (no byte of the stream read): the upper ends of :func:`check_index_stream`'s bounds, Golomb-Rice's
    at its costliest parameter. ``0`` for an unknown coder or a count that cannot fit: nothing is valid.

    A compact frame's reader bounds an entropy-coded index stream by this before expanding it, so a few
    stored bytes cannot declare (and make the receiver decode) more than an honest stream could hold.
    """
    if coder not in INDEX_CODERS or not 0 <= k <= n:
        return 0
    if coder == "bitmap":
        return (n + 7) // 8
    if coder == "varint":
        return _MAX_VARINT_BYTES * k
    return max(1 + (k * rice + 7) // 8 + (k + (n >> rice) + 7) // 8 for rice in range(_MAX_RICE_K + 1))


def check_index_stream(coder: object, data: bytes, n: int, k: int) -> None:
    """Refuse an index stream whose length cannot hold ``k`` positions in ``[0, n)``, before decoding it.

    Bounds from the format alone: a bitmap is exactly ``ceil(n / 8)`` bytes; varint takes 1 to 5 bytes a
    position; Golomb-Rice takes its parameter byte, ``ceil(k·K / 8)`` remainder bytes and one quotient bit
    per position plus ``Σ q_j ≤ n >> K`` more (the gaps sum to less than ``n``), padded to a byte.
    So decoding works on at most about ``n + 5k`` bytes, whatever the payload declares.
    """
    if coder not in INDEX_CODERS:
        raise DecodeError(f"unknown index coder {coder!r}; known: {', '.join(INDEX_CODERS)}")
    if not 0 <= k <= n:
        raise DecodeError(f"{k} positions cannot fit a tensor of {n} values")
    size = len(data)
    if coder == "bitmap":
        lo = hi = (n + 7) // 8
    elif coder == "varint":
        lo, hi = k, _MAX_VARINT_BYTES * k
    else:
        rice = data[0] if size else 0
        if rice > _MAX_RICE_K:
            raise DecodeError(f"Golomb Rice parameter {rice} exceeds {_MAX_RICE_K}")
        rem = (k * rice + 7) // 8
        lo, hi = 1 + rem + (k + 7) // 8, 1 + rem + (k + (n >> rice) + 7) // 8
    if not lo <= size <= hi:
        raise DecodeError(
            f"{coder} index stream of {size} bytes cannot hold {k} positions of {n} "
            f"(it must be {lo}{f' to {hi}' if hi != lo else ''} bytes)"
        )


def decode_indices(coder: str, data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`encode_indices`: exactly ``k`` strictly increasing positions in ``[0, n)``."""
    if not 0 <= k <= n:
        raise DecodeError(f"{k} positions cannot fit a tensor of {n} values")
    if coder in ("varint", "golomb"):
        gaps = varint_decode(data, k) if coder == "varint" else golomb_decode(data, k)
        # every gap + 1 >= 1 and the positions must end below n: bound the sum before the cumsum (each gap
        # is below n, so an int64 sum cannot overflow while k·n < 2^63)
        if k and int(gaps.max()) >= n:
            raise DecodeError(f"index stream points outside the tensor (size {n})")
        total = int(gaps.sum()) if k * n < 1 << 62 else float(gaps.sum(dtype=np.float64))
        if k and total + k > n:
            raise DecodeError(f"index stream points outside the tensor (size {n})")
        gaps += 1  # in place: positions = cumsum(gap + 1) - 1, with no temporaries of the stream's size
        idx = np.cumsum(gaps, out=gaps)
        idx -= 1
    elif coder == "bitmap":
        idx = bitmap_decode(data, n)
    else:
        raise DecodeError(f"unknown index coder {coder!r}; known: {', '.join(INDEX_CODERS)}")
    if len(idx) != k:
        raise DecodeError(f"index stream holds {len(idx)} positions, expected {k}")
    if k and (idx[-1] >= n or idx[0] < 0):
        raise DecodeError(f"index stream points outside the tensor (size {n})")
    return idx


# -- many rows at once -----------------------------------------------------------------------------------
def decode_indices_rows(
    coders: Sequence[str], streams: Sequence[bytes], n: int, counts: Sequence[int]
) -> np.ndarray:
    """Every row's :func:`decode_indices` at once: the rows' positions, concatenated (int64).

    Exactly ``np.concatenate([decode_indices(c, s, n, k) for c, s, k in zip(coders, streams, counts)])``,
    errors included: the rows of each coder are read together, with the per-row reader's checks made on
    every row at once, and when any row fails one of them the rows are read one by one, so the first bad
    row raises its own error. A server decoding a round's updates reads a few streams per client per
    tensor; one by one, the fixed cost of a dozen small numpy calls a stream dominates for small tensors.
    """
    ks = np.asarray(counts, dtype=np.int64).reshape(-1)
    if len(coders) != len(ks) or len(streams) != len(ks):
        raise DecodeError(f"{len(coders)} coders and {len(streams)} index streams for {len(ks)} counts")
    flat = _stacked_positions(list(coders), [bytes(s) for s in streams], n, ks)
    if flat is None:  # a row the stacked checks refuse: the per-row reader names it and its fault
        parts = [decode_indices(c, bytes(s), n, int(k)) for c, s, k in zip(coders, streams, ks, strict=True)]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return flat


def _stacked_positions(coders: list[str], streams: list[bytes], n: int, ks: np.ndarray) -> np.ndarray | None:
    """The rows' positions concatenated, or ``None`` where :func:`decode_indices` would refuse a row."""
    if not len(ks):
        return np.zeros(0, np.int64)
    if (ks < 0).any() or (ks > n).any() or any(c not in INDEX_CODERS for c in coders):
        return None
    out = np.empty(int(ks.sum()), np.int64)
    row_of_value = None
    for coder in INDEX_CODERS:
        rows = [i for i, c in enumerate(coders) if c == coder]
        if not rows:
            continue
        data, k = [streams[i] for i in rows], ks[rows]
        reader = {"bitmap": _bitmap_rows, "varint": _varint_rows, "golomb": _golomb_rows}[coder]
        gaps_or_positions = reader(data, n, k)
        if gaps_or_positions is None:
            return None
        got = gaps_or_positions if coder == "bitmap" else _positions_from_gaps(gaps_or_positions, n, k)
        if got is None:
            return None
        if len(rows) == len(coders):
            return got
        if row_of_value is None:
            row_of_value = np.repeat(np.arange(len(ks)), ks)
        out[np.isin(row_of_value, rows)] = got  # the rows' values in row order, as the mask selects them
    return out


def _positions_from_gaps(gaps: np.ndarray, n: int, ks: np.ndarray) -> np.ndarray | None:
    """:func:`decode_indices`' bounds and running sum for each row's gaps (rows concatenated, in place)."""
    if not len(gaps):
        return gaps
    if int(gaps.max()) >= n or (ks * n >= 1 << 62).any():  # beyond 2^62 the per-row reader sums in float64
        return None
    live = ks > 0
    starts = np.cumsum(ks) - ks
    totals = np.add.reduceat(gaps, starts[live])  # each gap < n, so a row's int64 sum cannot overflow
    if (totals + ks[live] > n).any():
        return None
    gaps += 1
    idx = np.cumsum(gaps, out=gaps)  # across rows: take off what the rows before each one added
    first = starts[live]
    before = np.where(first > 0, idx[np.maximum(first - 1, 0)], 0)
    idx -= np.repeat(before + 1, ks[live])
    return idx


def _bitmap_rows(streams: list[bytes], n: int, ks: np.ndarray) -> np.ndarray | None:
    need = (n + 7) // 8
    if any(len(s) != need for s in streams):
        return None
    bits = np.unpackbits(
        np.frombuffer(b"".join(streams), np.uint8).reshape(len(streams), need), axis=1, bitorder="little"
    )
    if bits[:, n:].any() or (bits.sum(axis=1, dtype=np.int64) != ks).any():
        return None
    # each row's positions in order: one 1-D scan of the bits as booleans (bytes of 0 and 1), ~7x faster
    # than a scan of them as uint8, and 2-D nonzero would make both coordinates
    flat = np.flatnonzero(bits.view(np.bool_))
    flat %= bits.shape[1]
    return flat


def _varint_rows(streams: list[bytes], n: int, ks: np.ndarray) -> np.ndarray | None:
    lens = np.array([len(s) for s in streams], np.int64)
    if ((ks == 0) != (lens == 0)).any():
        return None
    b = np.frombuffer(b"".join(streams), np.uint8)
    ends_of_rows = np.cumsum(lens)
    if (b[ends_of_rows[lens > 0] - 1] & 0x80).any():  # a truncated row
        return None
    ends = np.flatnonzero(b < 0x80)  # each value's last byte; a row's last byte is one, so none straddles
    if (np.diff(np.searchsorted(ends, ends_of_rows), prepend=0) != ks).any():
        return None
    if not len(ends):
        return np.zeros(0, np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > _MAX_VARINT_BYTES:
        return None
    value = np.zeros(len(ends), np.int64)
    for j in range(longest):
        sel = lengths > j
        value[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.int64) << (7 * j)
    return value


def _golomb_rows(streams: list[bytes], n: int, ks: np.ndarray) -> np.ndarray | None:
    lens = np.array([len(s) for s in streams], np.int64)
    if (lens < 1).any():
        return None
    b = np.frombuffer(b"".join(streams), np.uint8)
    row_start = np.cumsum(lens) - lens
    rice = b[row_start].astype(np.int64)
    rem_len = (ks * rice + 7) // 8
    q_len = lens - 1 - rem_len
    if (rice > _MAX_RICE_K).any() or (q_len < 0).any() or ((ks == 0) & (lens != 1)).any():
        return None
    used = (ks * rice) % 8
    padded = used > 0
    if (b[row_start[padded] + rem_len[padded]].astype(np.int64) >> used[padded]).any():
        return None
    # the quotient sections, back to back: one unary stream whose rows end on byte boundaries
    sections = np.stack([np.ones_like(lens), rem_len, q_len], axis=1)  # a row: K, remainders, quotients
    ubits = np.unpackbits(b[_part_of(sections, 2)], bitorder="little")
    zeros = np.flatnonzero(ubits == 0)
    row_bits_end = 8 * np.cumsum(q_len)
    if (np.diff(np.searchsorted(zeros, row_bits_end), prepend=0) != ks).any():
        return None
    if not len(zeros):
        return np.zeros(0, np.int64)
    live = ks > 0
    last = np.cumsum(ks)[live] - 1
    if (row_bits_end[live] - 1 - zeros[last] >= 8).any():  # trailing bytes after a row's last value
        return None
    first = last - ks[live] + 1
    prev = np.empty_like(zeros)
    prev[1:] = zeros[:-1]
    prev[first] = (row_bits_end - 8 * q_len)[live] - 1
    q = zeros - prev - 1
    k_of = np.repeat(rice, ks)
    # a value's quotient must fit 62 - K bits (its own row's K): checked value by value only when the
    # largest quotient is beyond what the largest K allows
    if int(q.max()) >= 1 << (62 - int(rice.max())) and (q >= np.left_shift(1, 62 - k_of)).any():
        return None
    q <<= k_of if len(np.unique(rice[live])) > 1 else rice[live][0]
    widest = int(rice[live].max())
    if widest:
        # every row's remainder bits without its padding, rows back to back: a row's values take the next
        # K bits each, so the rows of one K read as one (values, K) matrix
        rbits = np.unpackbits(b[_part_of(sections, 1)], bitorder="little")
        bits = ks * rice
        if (8 * rem_len != bits).any():
            rbits = rbits[_part_of(np.stack([bits, 8 * rem_len - bits], axis=1), 0)]
        one_k = bool((rice[live] == widest).all())
        for k in [widest] if one_k else np.unique(rice[live]).tolist():
            if not k:
                continue
            own = rbits if one_k else rbits[np.repeat(rice, bits) == k]
            at = slice(None) if one_k else np.flatnonzero(k_of == k)
            codes = own.reshape(-1, k)
            weights = np.left_shift(1, np.arange(k, dtype=np.int64))
            rem = np.empty(len(codes), np.int64)
            for lo in range(0, len(codes), _RICE_BLOCK):  # the product's int64 copy, a block at a time
                rem[lo : lo + _RICE_BLOCK] = codes[lo : lo + _RICE_BLOCK] @ weights
            q[at] |= rem
    return q


def _part_of(lengths: np.ndarray, which: int) -> np.ndarray:
    """Mask of section ``which`` in a buffer of rows laid out back to back, row ``i`` made of sections of
    ``lengths[i, 0], lengths[i, 1], ...`` elements."""
    rows, parts = lengths.shape
    return np.repeat(np.tile(np.arange(parts) == which, rows), lengths.reshape(-1))
