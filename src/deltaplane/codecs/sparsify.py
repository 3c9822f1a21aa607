"""Sparsifying codecs: keep a few coordinates, send their positions and values."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, register_codec
from deltaplane.codecs.entropy import (
    check_index_stream,
    decode_indices,
    decode_indices_rows,
    encode_indices,
    encode_indices_ragged,
    encode_indices_rows,
    max_index_stream_bytes,
    unpack_bits,
)
from deltaplane.codecs.quantize import _read_scales, ceil_div
from deltaplane.errors import CodecError, DecodeError
from deltaplane.specs import Scalar

__all__ = [
    "STC",
    "RandK",
    "Threshold",
    "TopK",
    "magnitude_at_least",
    "random_positions",
    "random_positions_rows",
    "scatter_rows",
    "scatter_values",
    "topk_indices",
]


def scatter_values(e: Encoded, idx: np.ndarray, values: Tensor) -> Tensor:
    """A dense tensor of ``e.shape`` holding ``values`` at flat positions ``idx`` and zeros elsewhere."""
    if values.dim() != 1 or values.numel() != len(idx):
        raise DecodeError(f"{e.codec}: {values.numel()} values for {len(idx)} positions")
    out = torch.zeros(e.numel, dtype=torch.float32)
    out[torch.from_numpy(idx)] = values.float()
    return out.reshape(e.shape)


def scatter_rows(
    rows: Sequence[Encoded], idx: np.ndarray, counts: Sequence[int] | np.ndarray, values: Tensor
) -> Tensor:
    """The ``(C, *shape)`` stack of :func:`scatter_values` of every row, with one scatter.

    ``idx`` holds the rows' flat positions back to back (``counts[i]`` of them for row ``i``) and ``values``
    their values in the same order, so rows may keep different counts.
    """
    n, c = rows[0].numel, len(rows)
    if values.dim() != 1 or values.numel() != len(idx):
        raise DecodeError(f"{rows[0].codec}: {values.numel()} values for {len(idx)} positions")
    flat = np.asarray(idx, np.int64) + np.repeat(
        np.arange(c, dtype=np.int64) * n, np.asarray(counts, np.int64)
    )
    out = torch.zeros(c * n, dtype=torch.float32)
    out.scatter_(0, torch.from_numpy(flat), values.float())  # distinct positions: each written once
    return out.reshape(c, *rows[0].shape)


def _sparse_rows(codec: Codec, rows: Sequence[Encoded], k: int | None) -> Tensor | None:
    """The stacked decode of ``positions + values`` rows (``k``: the count every row must hold, or any).

    ``None`` where the rows are not alike (shapes, an empty tensor) or any row fails a check, so the
    caller takes the default's per-row path, which raises that row's own error.
    """
    n = rows[0].numel
    if not n or any(e.shape != rows[0].shape for e in rows):
        return None
    try:
        values = [codec._field(e, "values", Tensor) for e in rows]
        if any(v.dim() != 1 or (k is not None and v.numel() != k) for v in values):
            return None
        counts = [v.numel() for v in values]
        coders = [str(e.meta.get("ix")) for e in rows]
        idx = decode_indices_rows(coders, [codec._field(e, "idx", bytes) for e in rows], n, counts)
    except DecodeError:
        return None
    return scatter_rows(rows, idx, counts, torch.cat(values))


def _ragged_rows(codec: Codec, flat: Tensor, pos: Tensor, shape: tuple[int, ...]) -> list[Encoded]:
    """Row nodes of ``positions + values`` from the kept positions of a ``(C, n)`` stack.

    ``pos`` holds the kept entries' positions in the flattened stack, in order (each row's sorted positions,
    row after row); every row's positions are coded in one call (:func:`encode_indices_ragged`) and its
    values are its part of one gather, as the row's own ``flat[idx]`` would hold them.
    """
    rows, n = flat.shape
    p = pos.numpy()
    row = p // n
    counts = np.bincount(row, minlength=rows)
    values = flat.reshape(-1)[pos].split(counts.tolist())
    spec = codec.spec
    return [
        Encoded(spec, shape, {"ix": coder}, {"idx": data, "values": v})
        for (coder, data), v in zip(encode_indices_ragged(p - row * n, counts, n), values, strict=True)
    ]


def _check_sparse(codec: Codec, e: Encoded, k: int | None) -> int:
    """Pre-decode checks of a positions + values node; ``k`` is the count the codec fixes (``None``: any).

    The values node must be one-dimensional with ``k`` entries (at most the tensor's size), and the
    index stream long enough for them and no longer; returns the count.
    """
    Codec.check(codec, e)
    values = e.fields["values"]
    if len(values.shape) != 1:
        raise DecodeError(f"{e.codec}: values must be one-dimensional, got shape {list(values.shape)}")
    count = values.shape[0]
    if k is not None and count != k:
        raise DecodeError(f"{e.codec}: {count} values, expected {k}")
    check_index_stream(e.meta.get("ix"), e.fields["idx"], e.numel, count)
    return count


def _max_index_bytes(e: Encoded, k: int | None) -> int:
    """:func:`~deltaplane.codecs.entropy.max_index_stream_bytes` of a positions + values node, for the count
    the codec fixes (``k``) or else its values node's length (at most the tensor's: any more is refused)."""
    values = e.fields.get("values")
    count = k if k is not None else (min(values.numel, e.numel) if isinstance(values, Encoded) else 0)
    return max_index_stream_bytes(e.meta.get("ix"), e.numel, count)


def _check_ratio(name: str, ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise CodecError(f"{name}: ratio must be in (0, 1]. Found {ratio!r}")
    return float(ratio)


def _check_bool(name: str, what: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise CodecError(f"{name}: {what} must be true or false. Found {v!r}")
    return v


def top_count(ratio: float, n: int) -> int:
    """How many of ``n`` values a top-``ratio`` codec keeps: ``ceil(ratio · n)``, at least one, at most ``n``."""
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


#: values per block of :func:`magnitude_at_least`'s scan: |x| and the comparison stay in a core's L2 cache
SCAN_BLOCK_VALUES = 1 << 16


def magnitude_at_least(x: Tensor, threshold: float | Tensor) -> Tensor:
    """Sorted flat positions of the entries of ``x`` (flat, float32) with ``|x| >= threshold``.

    One pass in cache-sized blocks (|x|, the comparison and the positions of a block while it is in cache),
    so neither a tensor-sized |x| nor a tensor-sized mask is ever allocated: their page faults alone cost
    about a memcpy of the tensor. The threshold is compared in float32, as ``x.abs() >= threshold`` does.
    """
    values = x.detach().reshape(-1).float().contiguous().numpy()
    with np.errstate(over="ignore"):  # a threshold beyond float32's range is +inf there, as in torch
        t = np.float32(float(threshold))
    n = len(values)
    step = max(1, min(n, SCAN_BLOCK_VALUES))
    mag, hit = np.empty(step, np.float32), np.empty(step, np.bool_)
    found = []
    for lo in range(0, n, step):
        m = min(step, n - lo)
        np.abs(values[lo : lo + m], out=mag[:m])
        np.greater_equal(mag[:m], t, out=hit[:m])
        pos = np.flatnonzero(hit[:m])
        if len(pos):
            pos += lo
            found.append(pos)
    return torch.from_numpy(np.concatenate(found)) if found else torch.zeros(0, dtype=torch.long)


def _sample_threshold(x: Tensor, k: int, headroom: bool, rng: torch.Generator | None) -> Tensor:
    """Estimate the k-th largest magnitude of ``x`` from a sample of ~1% of its values (at least 4096)."""
    n = x.numel()
    m = min(n, max(4096, n // 100))
    # without a generator: an evenly strided sample (deterministic)
    sample = (x[:: max(1, n // m)] if rng is None else x[torch.randint(n, (m,), generator=rng)]).abs()
    expect = k * sample.numel() / n
    # with headroom: aim ~30% plus 3 sigma above k so the candidates almost surely include the top k
    r = 1.3 * expect + 3 * math.sqrt(expect) + 1 if headroom else expect
    r = min(sample.numel(), max(1, math.ceil(r)))
    return torch.topk(sample, r, sorted=False).values.min()


def _lowest_ties(mag: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest entries along the last dim, ties at the k-th value to the lowest positions.

    ``mag`` is ``(..., n)`` with ``k < n``. ``torch.topk`` resolves ties in an order that depends on the
    kernel (and so on the tensor's shape and the thread count); this rule does not, so one device's
    selection and the same row selected among many (:meth:`TopK.encode_rows`) are the same positions.
    """
    kth = torch.topk(mag, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    at_least = mag >= kth
    if bool((at_least.sum(dim=-1) == k).all()):  # no tie straddles the boundary (the usual case): done
        return at_least
    above = mag > kth
    tied = mag == kth
    need = k - above.sum(dim=-1, keepdim=True)  # >= 1: the k-th value itself is tied with itself
    return above | (tied & (tied.cumsum(dim=-1) <= need))


def topk_rows(mag: Tensor, k: int) -> Tensor:
    """Row-wise :func:`topk_indices` of a ``(C, n)`` matrix: a ``(C, k)`` tensor, each row sorted.

    One selection over the whole matrix; the tie rule is the same, so row ``i`` equals
    ``topk_indices(mag[i], k)`` exactly.
    """
    rows, n = mag.shape
    if k >= n:
        return torch.arange(n).expand(rows, n)
    if n >= 8192 and k * 8 <= n and rows:
        # topk_indices' candidate selection for all rows at once: each row's sampled threshold (the same
        # strided sample), then the candidates of every row packed left into a (rows, most candidates)
        # matrix padded with -1, which no magnitude ties with, and the exact selection on that
        m = min(n, max(4096, n // 100))
        sample = mag[:, :: max(1, n // m)]
        expect = k * sample.shape[1] / n
        r = min(sample.shape[1], max(1, math.ceil(1.3 * expect + 3 * math.sqrt(expect) + 1)))
        threshold = torch.topk(sample, r, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        cand = mag >= threshold
        counts = cand.sum(dim=1)
        if bool((counts >= k).all()):
            row, col = torch.nonzero(cand).unbind(1)  # row-major: each row's candidates in position order
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(row.numel()) - starts[row]
            width = int(counts.max())
            packed = torch.full((rows, width), -1.0)
            packed[row, rank] = mag[row, col]
            positions = torch.zeros((rows, width), dtype=torch.long)
            positions[row, rank] = col
            return positions[_lowest_ties(packed, k)].view(rows, k)
    # exactly k set per row, and nonzero walks the mask row-major: its columns are each row's sorted positions
    return torch.nonzero(_lowest_ties(mag, k))[:, 1].view(rows, k)


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Sorted flat positions of the ``k`` entries of largest magnitude of ``x`` (a flat float32 tensor).

    Exact, but faster than a partial sort of the whole tensor: a threshold estimated from a strided
    sample, set a little low, selects a few more than ``k`` candidates with one comparison pass, and an
    exact top-k runs on those (the hierarchical selection of DGC, Lin et al. 2018,
    https://arxiv.org/abs/1712.01887, §3). Every value above the threshold is a candidate, so the result
    is the exact top-k; if the sample misjudged and fewer than ``k`` candidates come out, the selection runs
    on the whole tensor instead. Ties at the k-th largest magnitude go to the lowest positions (see
    :func:`_lowest_ties`), so the result is a function of ``|x|`` alone. The candidate scan is
    :func:`magnitude_at_least`: no tensor-sized |x| is made unless the fallback runs.
    """
    n = x.numel()
    if k >= n:
        return torch.arange(n)
    if n >= 8192 and k * 8 <= n:
        cand = magnitude_at_least(x, _sample_threshold(x, k, True, None))
        if cand.numel() >= k:
            # every value tied with the k-th largest is >= the threshold, so all of them are candidates
            return cand if cand.numel() == k else cand[_lowest_ties(x[cand].abs(), k)]
    return torch.nonzero(_lowest_ties(x.abs(), k)).squeeze(1)


@register_codec
class TopK(Codec):
    """Keep the ``ratio`` fraction of coordinates with the largest magnitude (at least one).

    Positions go out with the cheapest index coder (see :mod:`deltaplane.codecs.entropy`); values are a float
    field that a following pipeline stage can quantize. ``approx=True`` is DGC's sampled threshold (Lin et
    al. 2018, https://arxiv.org/abs/1712.01887): the k-th largest magnitude is estimated from a random 1%
    sample and every value at or above the estimate is sent, about ``k`` of them (the count varies a few
    percent around ``k``), skipping the exact selection. Biased on its own: pair it with error feedback
    (Stich et al. 2018, https://arxiv.org/abs/1809.07599).
    """

    name = "topk"
    sparsifies = True
    positional = ("ratio",)
    byte_fields = ("idx",)
    tensor_fields = ("values",)

    def __init__(self, *, ratio: float = 0.01, approx: bool = False) -> None:
        self.ratio = _check_ratio("topk", ratio)
        self.approx = _check_bool("topk", "approx", approx)

    def get_params(self) -> dict[str, Scalar]:
        # approx is left out of the spec when false so specs (and payloads) of exact top-k stay as before
        params: dict[str, Scalar] = {"ratio": self.ratio}
        return params | ({"approx": True} if self.approx else {})

    def k_for(self, n: int) -> int:
        return top_count(self.ratio, n)

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        k = self.k_for(n)
        if self.approx and n >= 8192 and k * 8 <= n:
            idx = magnitude_at_least(flat, _sample_threshold(flat, k, False, rng))
        else:
            idx = topk_indices(flat, k)
        coder, data = encode_indices(idx.numpy(), n)
        return Encoded(self.spec, tuple(x.shape), {"ix": coder}, {"idx": data, "values": flat[idx]})

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """One selection over all rows (:func:`topk_rows`); every row's positions coded at once
        (:func:`~deltaplane.codecs.entropy.encode_indices_rows`).

        ``approx=True`` on a tensor large enough for the sampled threshold draws each row's sample from
        its own generator, as :meth:`encode` does, then keeps every row's candidates with one comparison
        over the stack and codes the rows' positions (a different count per row) in one call
        (:func:`~deltaplane.codecs.entropy.encode_indices_ragged`); on a smaller tensor it selects as
        exact top-k does, as :meth:`encode` does.
        """
        if x.dim() < 1 or x.shape[0] != len(rngs) or not x[0].numel():
            return super().encode_rows(x, rngs)
        flat = x.detach().reshape(x.shape[0], -1).float()
        n = flat.shape[1]
        k = self.k_for(n)
        if self.approx and n >= 8192 and k * 8 <= n:
            # each row's estimate from its own generator (a row's rng is its own unless shared: then the
            # draws still come row after row, as the per-row loop takes them)
            t = torch.stack([_sample_threshold(row, k, False, g) for row, g in zip(flat, rngs, strict=True)])
            pos = torch.nonzero((flat.abs() >= t.unsqueeze(1)).reshape(-1)).squeeze(1)
            return _ragged_rows(self, flat, pos, tuple(x.shape[1:]))
        idx = topk_rows(flat.abs(), k)
        values = flat.gather(1, idx)
        shape, spec = tuple(x.shape[1:]), self.spec
        # unbind: every row's view in one call (indexing row by row costs a call each)
        return [
            Encoded(spec, shape, {"ix": coder}, {"idx": data, "values": v})
            for (coder, data), v in zip(encode_indices_rows(idx.numpy(), n), values.unbind(0), strict=True)
        ]

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Every row's positions read at once (:func:`decode_indices_rows`), one scatter of all rows' values.

        Approximate top-k rows keep different counts; they are scattered together all the same. A row
        that a check refuses sends all rows through the default, which raises its own error.
        """
        out = _sparse_rows(self, rows, None if self.approx else self.k_for(rows[0].numel))
        return super().decode_rows(rows) if out is None else out

    def check(self, e: Encoded) -> None:
        _check_sparse(self, e, None if self.approx else self.k_for(e.numel))

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        return {"idx": _max_index_bytes(e, None if self.approx else self.k_for(e.numel))}

    def decode(self, e: Encoded) -> Tensor:
        values = self._field(e, "values", Tensor)
        if values.dim() != 1 or (not self.approx and values.numel() != self.k_for(e.numel)):
            raise DecodeError(f"{e.codec}: {values.numel()} values, expected {self.k_for(e.numel)}")
        idx = decode_indices(str(e.meta.get("ix")), self._field(e, "idx", bytes), e.numel, values.numel())
        return scatter_values(e, idx, values)


# -- random-k: positions from a shared seed ----------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_BLOCK = 1 << 14
_ROWS_BLOCK = 1 << 18


def random_positions(seed: int, n: int, ratio: float, *, stop_after: int | None = None) -> np.ndarray:
    """Positions ``i`` in ``[0, n)`` with ``splitmix64(seed + (i + 1) · φ) < ratio · 2^64``, in order.

    Each position is kept independently with probability ``ratio``; sender and receiver regenerate the same
    set from the seed alone, so positions cost nothing on the wire. splitmix64 (Steele et al. 2014) is a
    fixed, documented bijection, so another implementation can regenerate the set bit for bit (see
    docs/wire-format.md), unlike a library RNG whose stream may change between releases.
    ``stop_after``: stop generating once more than that many positions are found (a receiver expecting
    ``k`` values then knows the payload is wrong without scanning the rest).
    """
    threshold = np.uint64(min(int(ratio * 2.0**64), 2**64 - 1))
    s = np.uint64(seed)
    out = []
    found = 0
    # blocks, and a scratch buffer for the shifts, bound the temporary memory to ~300 kB whatever n is
    step = min(n, _BLOCK)
    offsets = np.arange(1, step + 1, dtype=np.uint64)
    z, tmp = np.empty(step, np.uint64), np.empty(step, np.uint64)
    for lo in range(0, n, _BLOCK):
        m = min(n - lo, _BLOCK)
        zz, t = z[:m], tmp[:m]
        np.add(offsets[:m], np.uint64(lo), out=zz)  # i + 1 for i in [lo, lo + m)
        zz *= _GOLDEN
        zz += s
        zz ^= np.right_shift(zz, np.uint64(30), out=t)
        zz *= _M1
        zz ^= np.right_shift(zz, np.uint64(27), out=t)
        zz *= _M2
        zz ^= np.right_shift(zz, np.uint64(31), out=t)
        keep = np.flatnonzero(zz < threshold) if ratio < 1 else np.arange(m)
        keep += lo
        out.append(keep)
        found += len(keep)
        if stop_after is not None and found > stop_after:
            break
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def random_positions_rows(seeds: Sequence[int], n: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`random_positions` of every seed: the positions back to back, and how many each seed keeps.

    The same splitmix64 test on a ``(seeds, positions)`` matrix, a block of ``_ROWS_BLOCK`` entries at a time
    (temporaries of a few MB), so many rows of a small tensor cost a few numpy calls, not a few a row.
    """
    rows = len(seeds)
    if ratio >= 1 or not rows or not n:
        return np.tile(np.arange(n, dtype=np.int64), rows), np.full(rows, n if ratio >= 1 else 0, np.int64)
    threshold = np.uint64(min(int(ratio * 2.0**64), 2**64 - 1))
    s = np.array(seeds, dtype=np.uint64)[:, None]
    step = max(1, min(n, _ROWS_BLOCK // rows))
    which, where = [], []
    for lo in range(0, n, step):
        z = np.arange(lo + 1, min(n, lo + step) + 1, dtype=np.uint64)[None, :] * _GOLDEN + s  # (rows, m)
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
        r, c = np.nonzero(z < threshold)  # row-major: each row's positions of this block in order
        which.append(r)
        where.append(c + lo)
    row, col = np.concatenate(which), np.concatenate(where).astype(np.int64, copy=False)
    if len(which) > 1:
        col = col[np.argsort(row, kind="stable")]  # blocks in order, so each row's positions stay sorted
    return col, np.bincount(row, minlength=rows).astype(np.int64)


@register_codec
class RandK(Codec):
    """Keep each coordinate with probability ``ratio``, chosen by a seed sent in the metadata (8 bytes).

    Random sparsification (Stich et al. 2018, https://arxiv.org/abs/1809.07599; Wangni et al. 2018,
    https://arxiv.org/abs/1710.09854): positions are regenerated by the receiver from the seed (see
    :func:`random_positions`), so only values travel. ``unbiased=True`` scales kept values by ``1/ratio``,
    making E[decode(encode(x))] = x (at a variance cost of ``(1/ratio - 1) x²`` a coordinate); the default
    sends them as they are, which suits error feedback better.
    """

    structural_check = True  # check() reads lengths and shapes only

    name = "randk"
    sparsifies = True
    positional = ("ratio",)
    tensor_fields = ("values",)

    def __init__(self, *, ratio: float = 0.01, unbiased: bool = False) -> None:
        self.ratio = _check_ratio("randk", ratio)
        self.unbiased = _check_bool("randk", "unbiased", unbiased)

    @property
    def contractive(self) -> bool:
        # rescaled by 1/ratio: E‖C(x) − x‖² = (1/ratio − 1)‖x‖², beyond ‖x‖² whenever ratio < 1/2
        return not (self.unbiased and self.ratio < 0.5)

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        idx = torch.from_numpy(random_positions(seed, flat.numel(), self.ratio))
        values = flat[idx]
        if self.unbiased:
            values = values / self.ratio
        return Encoded(self.spec, tuple(x.shape), {"seed": seed}, {"values": values})

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Every row's positions made at once (:func:`random_positions_rows`) and its values one gather.

        Row ``i`` is ``encode(x[i], rngs[i])`` bit for bit: its seed is the one draw ``encode`` makes from
        ``rngs[i]`` (drawn row after row, as a loop draws them, also when rows share a generator), its
        positions are :func:`random_positions` of that seed, and the ``1/ratio`` scaling is element-wise.
        Rows keep different counts.
        """
        if x.dim() < 1 or x.shape[0] != len(rngs) or not len(rngs) or not x[0].numel():
            return super().encode_rows(x, rngs)
        flat = x.detach().reshape(x.shape[0], -1).float()
        rows, n = flat.shape
        seeds = [int(torch.randint(0, 2**62, (1,), generator=rng)) for rng in rngs]
        idx, counts = random_positions_rows(seeds, n, self.ratio)
        pos = idx + np.repeat(np.arange(rows, dtype=np.int64) * n, counts)
        values = flat.reshape(-1)[torch.from_numpy(pos)]
        if self.unbiased:
            values = values / self.ratio
        spec, shape = self.spec, tuple(x.shape[1:])
        return [
            Encoded(spec, shape, {"seed": seed}, {"values": v})
            for seed, v in zip(seeds, values.split(counts.tolist()), strict=True)
        ]

    def check(self, e: Encoded) -> None:
        """Seed, and a count the seed could plausibly select, before regenerating any position.

        The number of kept positions is Binomial(n, ratio); a count more than 10 standard deviations
        (plus 10) from ``n · ratio`` has probability below 1e-20 for an honest sender, and refusing it up
        front means a payload cannot make the receiver run the generator over positions it will reject.
        """
        super().check(e)
        seed = e.meta.get("seed")
        if type(seed) is not int or not 0 <= seed < 2**63:
            raise DecodeError(f"{e.codec}: meta 'seed' must be an integer in [0, 2^63)")
        values = e.fields["values"]
        if len(values.shape) != 1:
            raise DecodeError(f"{e.codec}: values must be one-dimensional, got shape {list(values.shape)}")
        n, k = e.numel, values.shape[0]
        mean = n * self.ratio
        if not k <= n or abs(k - mean) > 10 * math.sqrt(mean * (1 - self.ratio)) + 10:
            raise DecodeError(f"{e.codec}: {k} values, but the seed keeps about {mean:.0f} of {n} positions")

    def decode(self, e: Encoded) -> Tensor:
        seed = e.meta.get("seed")
        if type(seed) is not int or not 0 <= seed < 2**63:
            raise DecodeError(f"{e.codec}: meta 'seed' must be an integer in [0, 2^63)")
        values = self._field(e, "values", Tensor)
        idx = random_positions(seed, e.numel, self.ratio, stop_after=values.numel())
        if values.numel() != len(idx):
            raise DecodeError(f"{e.codec}: {values.numel()} values, the seed selects {len(idx)} positions")
        return scatter_values(e, idx, values)  # unbiased: the sender already scaled by 1/ratio

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Every row's positions regenerated at once (:func:`random_positions_rows`), one scatter of all rows.

        Rows keep different counts. A row that a check refuses (a seed, a count its seed does not select)
        sends all rows through the default, which raises its own error.
        """
        n = rows[0].numel
        seeds = [e.meta.get("seed") for e in rows]
        if not n or any(e.shape != rows[0].shape for e in rows):
            return super().decode_rows(rows)
        if any(type(seed) is not int or not 0 <= seed < 2**63 for seed in seeds):
            return super().decode_rows(rows)
        try:
            values = [self._field(e, "values", Tensor) for e in rows]
        except DecodeError:
            return super().decode_rows(rows)
        idx, counts = random_positions_rows(cast("list[int]", seeds), n, self.ratio)  # checked just above
        if any(v.dim() != 1 or v.numel() != c for v, c in zip(values, counts.tolist(), strict=True)):
            return super().decode_rows(rows)
        return scatter_rows(rows, idx, counts, torch.cat(values))


@register_codec
class Threshold(Codec):
    """Keep the coordinates whose magnitude is at least ``tau`` (a variable number of them).

    Fixed-threshold sparsification (Strom 2015, "Scalable distributed DNN training using commodity GPU cloud
    computing", https://www.isca-archive.org/interspeech_2015/strom15_interspeech.html); positions use the
    cheapest index coder, values are a float field for the next stage.
    """

    name = "threshold"
    sparsifies = True
    positional = ("tau",)
    byte_fields = ("idx",)
    tensor_fields = ("values",)

    def __init__(self, *, tau: float = 1e-3) -> None:
        try:  # a huge integer overflows float(): still a bad value, not a crash
            ok = not isinstance(tau, bool) and isinstance(tau, int | float) and 0 < float(tau) < math.inf
        except OverflowError:
            ok = False
        if not ok:
            raise CodecError(f"threshold: tau must be a positive finite number. Found {str(tau)[:40]}")
        self.tau = float(tau)

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        idx = magnitude_at_least(flat, self.tau)
        coder, data = encode_indices(idx.numpy(), flat.numel())
        return Encoded(self.spec, tuple(x.shape), {"ix": coder}, {"idx": data, "values": flat[idx]})

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """One scan of the whole stack (:func:`magnitude_at_least`) and every row's positions, a different
        count per row, coded in one call (:func:`~deltaplane.codecs.entropy.encode_indices_ragged`)."""
        if x.dim() < 1 or x.shape[0] != len(rngs) or not x[0].numel():
            return super().encode_rows(x, rngs)
        flat = x.detach().reshape(x.shape[0], -1).float()
        return _ragged_rows(self, flat, magnitude_at_least(flat, self.tau), tuple(x.shape[1:]))

    def check(self, e: Encoded) -> None:
        _check_sparse(self, e, None)

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        return {"idx": _max_index_bytes(e, None)}

    def decode(self, e: Encoded) -> Tensor:
        values = self._field(e, "values", Tensor)
        if values.dim() != 1:
            raise DecodeError(f"{e.codec}: values must be one-dimensional")
        idx = decode_indices(str(e.meta.get("ix")), self._field(e, "idx", bytes), e.numel, values.numel())
        return scatter_values(e, idx, values)

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Every row's positions read at once, one scatter of all rows (a different count per row).

        A row that a check refuses sends all rows through the default, which raises its own error.
        """
        out = _sparse_rows(self, rows, None)
        return super().decode_rows(rows) if out is None else out


@register_codec
class STC(Codec):
    """Sparse ternary compression (Sattler et al. 2019, https://arxiv.org/abs/1903.02891).

    Keep the top ``ratio`` fraction by magnitude, replace every kept value by ``μ · sign`` with ``μ`` the
    mean magnitude of the kept values, and send positions (Golomb-Rice coded at these sparsities; the
    cheapest coder is chosen, see :func:`~deltaplane.codecs.entropy.encode_indices`), one sign bit per kept
    value and ``μ``. Biased: use it with error feedback, as the paper does.
    """

    name = "stc"
    sparsifies = True
    positional = ("ratio",)
    byte_fields = ("idx", "signs", "scales")

    def __init__(self, *, ratio: float = 0.01) -> None:
        self.ratio = _check_ratio("stc", ratio)

    def k_for(self, n: int) -> int:
        return top_count(self.ratio, n)

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        idx = topk_indices(flat, self.k_for(n))
        mu = float(flat[idx].abs().mean()) if idx.numel() else 0.0
        coder, data = encode_indices(idx.numpy(), n)
        signs = np.packbits((flat[idx] >= 0).numpy(), bitorder="little").tobytes()
        fields = {"idx": data, "signs": signs, "scales": struct.pack("<f", mu)}
        return Encoded(self.spec, tuple(x.shape), {"ix": coder}, fields)

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """One selection over all rows (:func:`topk_rows`) and every row's positions coded at once
        (:func:`~deltaplane.codecs.entropy.encode_indices_rows`); ``μ`` and the signs per row."""
        if x.dim() < 1 or x.shape[0] != len(rngs) or not x[0].numel():
            return super().encode_rows(x, rngs)
        flat = x.detach().reshape(x.shape[0], -1).float()
        n = flat.shape[1]
        idx = topk_rows(flat.abs(), self.k_for(n))
        kept = flat.gather(1, idx)
        mags = kept.abs()
        signs = np.packbits((kept >= 0).numpy(), axis=1, bitorder="little")
        shape, spec = tuple(x.shape[1:]), self.spec
        out = []
        for (coder, data), sign, row in zip(
            encode_indices_rows(idx.numpy(), n), signs, mags.unbind(0), strict=True
        ):
            # the mean of each row on its own: a reduction over the whole matrix may sum in another order
            fields = {"idx": data, "signs": sign.tobytes(), "scales": struct.pack("<f", float(row.mean()))}
            out.append(Encoded(spec, shape, {"ix": coder}, fields))
        return out

    def check(self, e: Encoded) -> None:
        super().check(e)
        k = self.k_for(e.numel)
        check_index_stream(e.meta.get("ix"), e.fields["idx"], e.numel, k)
        self._expect_len(e, "signs", e.fields["signs"], ceil_div(k, 8))
        self._expect_len(e, "scales", e.fields["scales"], 4)

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        k = self.k_for(e.numel)
        return {"idx": _max_index_bytes(e, k), "signs": ceil_div(k, 8), "scales": 4}

    def decode(self, e: Encoded) -> Tensor:
        k = self.k_for(e.numel)
        mu = _read_scales(self, e, 1)
        idx = decode_indices(str(e.meta.get("ix")), self._field(e, "idx", bytes), e.numel, k)
        signs = torch.from_numpy(unpack_bits(self._field(e, "signs", bytes), 1, k))
        return scatter_values(e, idx, signs.float().mul_(2).sub_(1).mul_(mu))

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Positions, ``μ`` and the signs of all rows read at once, one scatter of every row.

        Exactly the default's stack of :meth:`decode`: each value is ``(2·sign − 1)·μ`` in float32 as
        there, and any row that a check refuses (a scale, padding bits, an index stream) sends all rows
        through the default, which raises that row's own error.
        """
        n = rows[0].numel
        if not n or any(e.shape != rows[0].shape for e in rows):
            return super().decode_rows(rows)
        k = self.k_for(n)
        nbytes = ceil_div(k, 8)
        try:
            scales = [self._field(e, "scales", bytes) for e in rows]
            signs = [self._field(e, "signs", bytes) for e in rows]
            if any(len(s) != 4 for s in scales) or any(len(s) != nbytes for s in signs):
                return super().decode_rows(rows)
            mu = np.frombuffer(b"".join(scales), dtype="<f4").astype(np.float32)
            if not np.isfinite(mu).all() or (mu < 0).any():
                return super().decode_rows(rows)
            packed = np.frombuffer(b"".join(signs), dtype=np.uint8).reshape(len(rows), nbytes)
            used = k % 8
            if used and (packed[:, -1] >> used).any():  # padding bits must be zero (unpack_bits)
                return super().decode_rows(rows)
            bits = np.unpackbits(packed, axis=1, bitorder="little", count=k)
            coders = [str(e.meta.get("ix")) for e in rows]
            streams = [self._field(e, "idx", bytes) for e in rows]
            idx = decode_indices_rows(coders, streams, n, [k] * len(rows)).reshape(len(rows), k)
        except DecodeError:
            return super().decode_rows(rows)  # the default names the row and its fault
        values = torch.from_numpy(bits).float().mul_(2).sub_(1).mul_(torch.from_numpy(mu).unsqueeze(1))
        out = torch.zeros(len(rows), n, dtype=torch.float32)
        out.scatter_(1, torch.from_numpy(idx), values)
        return out.reshape(len(rows), *rows[0].shape)
