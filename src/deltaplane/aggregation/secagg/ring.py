"""Fixed-point integer ring for secure aggregation: quantize floats to ``bits``-bit codes, mask and sum mod 2ᵏ.

Each client maps its clipped values to unsigned ``bits``-bit integers with unbiased stochastic rounding; the
server adds masked codes modulo ``2ᵏ`` with ``k = bits + ⌈log₂ n⌉``, so the sum of ``n`` codes never wraps and
the unmasked ring sum *is* the integer sum. Masks act on lane words of several ring values (:func:`to_words`,
since message version 4), so masking works directly on the quantized update (no float ever crosses the wire).
Values are packed at exactly ``k`` bits each.
"""

from __future__ import annotations

import math

import numpy as np

from deltaplane.errors import ConfigError, DecodeError

__all__ = [
    "dequantize_sum",
    "from_words",
    "lane_count",
    "pack",
    "pack_words",
    "quantize",
    "reduce_words",
    "ring_bits",
    "to_words",
    "unpack",
    "unpack_words",
    "word_count",
    "word_moduli",
]


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
    """Pack uint32 (or uint16) ``values`` at exactly ``bits`` bits each, little-endian bit order.

    Each value is taken modulo ``2^bits`` (its higher bits are dropped), so a device may pack its masked sum as
    it comes out of the wrapping uint16 / uint32 additions.
    """
    v = np.asarray(values)
    if not (v.dtype in (np.uint16, np.uint32) and v.flags.c_contiguous):
        v = np.ascontiguousarray(v, dtype=np.uint32)
    if bits in (8, 16, 32):
        return v.astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).tobytes()
    n = len(v)
    if 8 < bits < 16 and n:
        out = np.empty((n * bits + 7) // 8, np.uint8)
        _pack_lanes(v.astype(np.uint16, copy=False), bits, out)
        return out.tobytes()
    if bits > 8 and n:
        if n % 8:
            v = np.concatenate([v, np.zeros(-n % 8, v.dtype)])
        packed = _pack_groups(v, bits).tobytes()
        return packed if n % 8 == 0 else packed[: (n * bits + 7) // 8]  # the last group's padding
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
    low, last = np.uint64((1 << bits) - 1), -1
    for j, w, shift in _spans(bits):
        if j != last:
            np.bitwise_and(v[j::8], low, out=x)  # the value modulo 2^bits
            last = j
        if shift >= 0:
            np.left_shift(x, np.uint64(shift), out=t)  # bits beyond the word fall off
        else:
            np.right_shift(x, np.uint64(-shift), out=t)  # the value's high bits, in the next word
        np.bitwise_or(words[w], t, out=words[w])
    return np.ascontiguousarray(words.T).view(np.uint8)[:, :bits]


_U64 = np.dtype("<u8")


def _group_words(
    buf: bytes | bytearray | memoryview | np.ndarray, groups: int, bits: int, offset: int
) -> np.ndarray:
    """A view of one little-endian u64 per group of ``bits`` bytes in ``buf``, starting ``offset`` bytes in."""
    return np.ndarray((groups,), _U64, buffer=buf, offset=offset, strides=(bits,))


# 8 < bits < 16: a group's 8 values are two chunks of four, each chunk 4 · bits ≤ 60 contiguous bits. Each u64 of
# the uint16 values holds a chunk with its values in 16-bit lanes; the lanes close up (or open) in two steps,
# pairs in u32 words then the two pairs in the u64, each ``x ∓ (x >> s) · c``: three contiguous passes with no
# masking (the value above ``s`` moves by ``c`` while the one below stays; packing first reduces every value
# modulo 2^bits). A group's bytes are then read or written through two overlapping unaligned u64 views: its
# first 8 bytes (chunk 0 and the low bits of chunk 1) and its last 8 bytes (chunk 1 at their top), so no pass
# touches a padded copy of the groups. About 0.5 ms each way for 1,000,000 15-bit values (was 1 and 2 ms).
def _pack_lanes(v: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack ``v`` (uint16, each modulo 2^bits) into ``out`` (``⌈len(v) · bits / 8⌉`` uint8), for 8 < ``bits`` < 16."""
    groups, tail = divmod(len(v), 8)
    if tail:  # the last, partial group (its bytes start on a byte boundary), from a padded copy
        last = np.zeros(8, np.uint16)
        last[:tail] = v[8 * groups :]
        one = np.empty(bits, np.uint8)
        _pack_lanes(last, bits, one)
        out[groups * bits :] = one[: len(out) - groups * bits]
        if not groups:
            return
        v = v[: 8 * groups]
    t, s = np.empty(4 * groups, np.uint32), np.empty(4 * groups, np.uint32)
    np.bitwise_and(v, np.uint16((1 << bits) - 1), out=s.view(np.uint16))  # each value modulo 2^bits, in pairs
    np.right_shift(s, np.uint32(16), out=t)  # (a | b << 16) − b · (2^16 − 2^bits) = a | b << bits
    t *= np.uint32((1 << 16) - (1 << bits))
    np.subtract(s, t, out=t)
    q, s64 = t.view(_U64), s.view(_U64)  # (p | r << 32) − r · (2^32 − 2^(2·bits)): chunks of 4 · bits bits
    np.right_shift(q, np.uint64(32), out=s64)
    s64 *= np.uint64((1 << 32) - (1 << 2 * bits))
    q -= s64
    chunks = q.reshape(groups, 2)
    second, word = s64[:groups], s64[groups:]
    np.copyto(second, chunks[:, 1])  # once contiguous: two passes read it
    # the group's last 8 bytes first: their low bytes belong to its first 8, written next over them
    np.left_shift(second, np.uint64(64 - 4 * bits), out=word)
    _group_words(out, groups, bits, bits - 8)[...] = word
    second <<= np.uint64(4 * bits)  # bits past the u64 fall off
    second |= chunks[:, 0]
    _group_words(out, groups, bits, 0)[...] = second


def _unpack_lanes(data: bytes | memoryview, bits: int, groups: int) -> np.ndarray:
    """The ``8 · groups`` uint16 values of the first ``groups`` groups of ``data``, for 8 < ``bits`` < 16."""
    x = np.empty((groups, 2), _U64)  # the chunks, then (in place) the values in 16-bit lanes
    s = np.empty(2 * groups, _U64)
    first, second = s[:groups], s[groups:]
    np.bitwise_and(_group_words(data, groups, bits, 0), np.uint64((1 << 4 * bits) - 1), out=first)
    np.right_shift(_group_words(data, groups, bits, bits - 8), np.uint64(64 - 4 * bits), out=second)
    x[:, 0], x[:, 1] = first, second
    q = x.reshape(-1)  # p | r << 2·bits  →  p | r << 32
    np.right_shift(q, np.uint64(2 * bits), out=s)
    s *= np.uint64((1 << 32) - (1 << 2 * bits))
    q += s
    q32, s32 = q.view("<u4"), s.view("<u4")  # a | b << bits  →  a | b << 16
    np.right_shift(q32, np.uint32(bits), out=s32)
    s32 *= np.uint32((1 << 16) - (1 << bits))
    q32 += s32
    return q.view("<u2")


def _unpack_groups(data: bytes | memoryview, bits: int, groups: int) -> np.ndarray:
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


def unpack(data: bytes | memoryview, bits: int, n: int, *, add_to: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`pack` (uint32 values); raises :class:`DecodeError` unless ``data`` holds exactly ``n``.

    ``add_to`` (``n`` values, uint32, or uint16 for ``bits`` ≤ 16): add the values to it in place (modulo its
    word, a multiple of ``2^bits``) and return it instead (the server's running sum of masked inputs).
    """
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {bits}-bit ring values: {len(data)} bytes for {n} values, expected {need}")
    if add_to is not None:
        if not (add_to.dtype == np.uint32 or (add_to.dtype == np.uint16 and bits <= 16)) or add_to.shape != (
            n,
        ):
            raise DecodeError(
                f"values are added to a uint32 array of {n} (or uint16 for rings of at most 16 bits), not "
                f"{add_to.dtype} {add_to.shape}"
            )
        full = n // 8 if bits > 8 and bits not in (16, 32) else 0  # whole groups, `bits` bytes each
        if full and bits < 16:
            add_to[: full * 8] += _unpack_lanes(data, bits, full)  # wraps modulo the accumulator's word
        elif full:
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
        if bits < 16:
            return _unpack_lanes(padded, bits, groups)[:n].astype(np.uint32)
        return np.ascontiguousarray(_unpack_groups(padded, bits, groups).T).reshape(-1)[:n]
    planes = np.zeros((n, 32), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(
        np.frombuffer(data, dtype=np.uint8), bitorder="little", count=n * bits
    ).reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u4").reshape(n).astype(np.uint32)


# -- lane words: the masks' group since message version 4 --------------------------------------------------------
# A device's ``n`` values of a ``k``-bit ring go into 64-bit words of ``L`` lanes of ``k`` bits each (value
# ``L·i + j`` in bits ``k·j … k·j + k − 1`` of word ``i``; ``L`` = 64 / the smallest of 8, 16, 32 bits holding
# ``k``), so a word holds ``W = L·k`` bits and the masks live in ``Z / 2^W`` (the last word, with ``r`` values,
# in ``Z / 2^(r·k)``). Adding words modulo 2^W is exact lane by lane because the ring never wraps: the sum of
# every lane is below 2^k, so no carry ever crosses into the next lane. Words travel at exactly ``W`` bits, which
# is the same little-endian bit stream as the ``n`` values packed at ``k`` bits (:func:`pack`): the wire
# carries ``⌈n·k / 8⌉`` bytes as before. What changes is the mask: a 64-bit keystream word per ``L`` values
# (16 bits per value for rings of 9-16 bits, as before), and the server folds an upload with ``n / L`` 64-bit
# additions.
def lane_count(k: int) -> int:
    """``L``: values of a ``k``-bit ring per 64-bit word (8, 4 or 2)."""
    if not 1 <= k <= 32:
        raise ConfigError(f"ring bits must be in [1, 32]. Found {k}")
    return 8 if k <= 8 else 4 if k <= 16 else 2


def word_count(n: int, k: int) -> int:
    """Words holding ``n`` values of a ``k``-bit ring."""
    return -(-n // lane_count(k))


def word_moduli(n: int, k: int) -> tuple[int, int]:
    """``(2^W − 1, 2^(r·k) − 1)``: the masks reducing every word but the last, and the last (``r`` values)."""
    lanes = lane_count(k)
    last = n - (word_count(n, k) - 1) * lanes
    return (1 << lanes * k) - 1, (1 << last * k) - 1


def reduce_words(words: np.ndarray, n: int, k: int) -> np.ndarray:
    """``words`` (uint64) reduced in place modulo the word group (``2^W``, the last word ``2^(r·k)``)."""
    full, last = word_moduli(n, k)
    if full != (1 << 64) - 1:
        np.bitwise_and(words, np.uint64(full), out=words)
    words[-1] &= np.uint64(last)
    return words


def _lane_dtype(width: int) -> np.dtype:
    return np.dtype(f"<u{width // 8}")


#: values per block of :func:`to_words`: a block of the input and of the words stays in a core's cache (128 K
#: values: 512 KB of uint32 codes, 256 KB of 16-bit lanes; 64 K blocks cost ~10% more in per-call overhead)
_WORDS_BLOCK = 1 << 17


def _closing_steps(lanes: int, k: int) -> list[tuple[np.dtype, np.generic, np.generic]]:
    """``(dtype, shift, factor)`` of each step of :func:`to_words` (lanes of ``width`` bits holding ``content``
    bits close up in elements of twice the width), with the scalars built once per call, not per block."""
    steps = []
    width, content = 64 // lanes, k
    while width < 64:
        dt = _lane_dtype(2 * width)
        steps.append((dt, dt.type(width), dt.type((1 << width) - (1 << content))))
        width, content = 2 * width, 2 * content
    return steps


def to_words(values: np.ndarray, k: int, *, below: int | None = None) -> np.ndarray:
    """The words (uint64) of ``values`` (integers in ``[0, 2^k)``): lanes of ``k`` bits, unused lanes zero.

    The values are written into lanes of 8, 16 or 32 bits, which then close up pairwise (``x − (x >> w)·c``
    in words of twice the width: the upper half moves down by ``c`` bits while the lower stays) until each
    64-bit word holds its lanes ``k`` bits apart: a few passes, no per-lane loop, a cache-sized block at a
    time, so each block of a device's (large, uncached) input is read from memory once. ``below``: raise
    :class:`ValueError` unless every value is below it, checked on each block as it is read (an unsigned
    ``values`` only; a larger value would spill into the next lane); skipped when the dtype cannot exceed it.
    """
    lanes = lane_count(k)
    n = len(values)
    x = np.zeros(word_count(n, k) * lanes, _lane_dtype(64 // lanes))
    tmp = np.empty(_WORDS_BLOCK * x.itemsize, np.uint8)
    steps = _closing_steps(lanes, k)
    if below is not None and values.dtype.kind in "ui" and np.iinfo(values.dtype).max < below:
        below = None  # e.g. uint8 codes below 2^8: nothing to check
    for lo in range(0, len(x), _WORDS_BLOCK):
        block = values[lo : lo + _WORDS_BLOCK]
        if below is not None and len(block) and block.max() >= below:
            raise ValueError(f"a value is not below {below}")
        xb = x[lo : lo + _WORDS_BLOCK]
        xb[: len(block)] = block
        for dt, shift, factor in steps:
            v = xb.view(dt)  # two lanes per element
            t = tmp[: v.nbytes].view(dt)
            np.right_shift(v, shift, t)
            np.multiply(t, factor, t)
            np.subtract(v, t, v)
    return x.view(np.uint64)


def from_words(words: np.ndarray, k: int, n: int) -> np.ndarray:
    """The ``n`` values (uint64) in the lanes of ``words``, each word reduced (:func:`reduce_words`)."""
    lanes = lane_count(k)
    x = np.array(words, dtype="<u8")  # a copy: opened in place
    width, content = 64, lanes * k
    while width > 64 // lanes:  # each element: a | b << (content / 2)  →  a | b << (width / 2)
        v = x.view(_lane_dtype(width))
        half = content // 2
        t = v >> half
        t *= (1 << width // 2) - (1 << half)
        v += t
        width, content = width // 2, half
    return x.view(_lane_dtype(width))[:n].astype(np.uint64)


def _tail_words(data: bytes | memoryview, first: int, count: int, word_bits: int) -> list[int]:
    """``count`` words of ``word_bits`` bits from the bytes from ``first`` on (a byte boundary) to the end."""
    big = int.from_bytes(data[first:], "little")
    low = (1 << word_bits) - 1
    return [(big >> (word_bits * i)) & low for i in range(count)]


def pack_words(words: np.ndarray, k: int, n: int) -> bytes | memoryview:
    """The ``⌈n·k / 8⌉`` wire bytes of the words of ``n`` values: each word reduced and kept at ``W`` bits.

    Exactly :func:`pack` of the lane values (the same bit stream), written directly from the words: whole
    words of ``W`` = 16, 24, …, 64 bits are byte slices of them, and words of ``W ≡ 4 (mod 8)`` bits (rings of
    9-15 odd bits, e.g. the 15-bit ring of 100 clients' 8-bit codes: 60-bit words) go in pairs of ``W / 4``
    bytes through two overlapping unaligned 64-bit views; other widths through :func:`pack` of the values.
    ``words`` may hold bits above ``W`` (the device's wrapping sum): they are dropped, and ``words`` is not
    changed. Returns a read-only bytes-like object (a view of the packed buffer, not a copy of it: the message
    framing copies it once into the wire bytes).
    """
    m, bits = len(words), lane_count(k) * k
    full, last = word_moduli(n, k)
    need = (n * k + 7) // 8
    if bits % 8 and bits % 8 != 4:
        return pack(from_words(reduce_words(words.copy(), n, k), k, n), k)
    out = np.empty(need + 16, np.uint8)  # room for the tail's whole bytes
    if bits % 8 == 0:
        head = m - 1  # every word but the last, whole bytes each
        step = bits // 8
        out[: head * step].reshape(head, step)[...] = words[:head].view(np.uint8).reshape(head, 8)[:, :step]
    else:
        head = 2 * ((m - 1) // 2)  # whole pairs of words, leaving the last word (and one more) to the tail
        step = bits // 4
        pairs = words[:head].reshape(-1, 2)
        t = np.left_shift(pairs[:, 1], np.uint64(64 - bits))  # the pair's last 8 bytes: word 1 at their top
        _group_words(out, head // 2, step, step - 8)[...] = t
        np.left_shift(pairs[:, 1], np.uint64(bits), out=t)  # its first 8: word 0, then word 1's low bits
        t |= pairs[:, 0] & np.uint64(full)
        _group_words(out, head // 2, step, 0)[...] = t
    first = head * bits // 8
    tail = [int(w) & full for w in words[head:]]
    tail[-1] &= last
    value = sum(w << (bits * i) for i, w in enumerate(tail))
    out[first:need] = np.frombuffer(value.to_bytes(need - first, "little"), np.uint8)
    out.flags.writeable = False
    return out[:need].data  # the array's memoryview


def unpack_words(data: bytes | memoryview, k: int, n: int, add_to: np.ndarray) -> np.ndarray:
    """Add the words of the ``n`` values in ``data`` (:func:`pack_words`' bytes) to ``add_to`` (uint64), in place.

    Raises :class:`DecodeError` unless ``data`` holds exactly ``⌈n·k / 8⌉`` bytes. Each word is read reduced
    (bits of the last byte past the ``n``-th value are ignored, as :func:`unpack` ignores them); the sum wraps
    modulo 2^64, a multiple of every word's modulus, and :func:`reduce_words` reduces it once at the end.
    """
    m, bits = word_count(n, k), lane_count(k) * k
    need = (n * k + 7) // 8
    if len(data) != need:
        raise DecodeError(f"packed {k}-bit ring values: {len(data)} bytes for {n} values, expected {need}")
    if add_to.dtype != np.uint64 or add_to.shape != (m,) or not add_to.flags.c_contiguous:
        raise DecodeError(
            f"words are added to a contiguous uint64 array of {m}, not {add_to.dtype} {add_to.shape}"
        )
    full, last = word_moduli(n, k)
    if bits % 8 and bits % 8 != 4:
        add_to += to_words(unpack(data, k, n), k)
        return add_to
    if bits % 8 == 0:
        step = bits // 8
        head = min(m - 1, (len(data) - 8) // step + 1 if len(data) >= 8 else 0)  # reads inside the data
        if head:
            w = np.bitwise_and(_group_words(data, head, step, 0), np.uint64(full))
            add_to[:head] += w
    else:
        step = bits // 4
        head = 2 * ((m - 1) // 2)
        if head:
            acc = add_to[:head].reshape(-1, 2)
            w = np.bitwise_and(_group_words(data, head // 2, step, 0), np.uint64(full))
            acc[:, 0] += w
            np.right_shift(_group_words(data, head // 2, step, step - 8), np.uint64(64 - bits), out=w)
            acc[:, 1] += w
    tail = _tail_words(data, head * bits // 8, m - head, bits)
    tail[-1] &= last
    add_to[head:] += np.array(tail, dtype=np.uint64)
    return add_to
