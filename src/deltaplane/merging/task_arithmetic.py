"""Generalized task arithmetic: one engine, registered under five paper names.

Pipeline per tensor (the same as mergekit's ``GeneralizedTaskArithmeticMerge``)::

    τᵢ = θᵢ − θ₀                                  task vectors
    τ̂ᵢ = sparsify(τᵢ, densityᵢ)                   none | magnitude top-k | random drop (DARE) | outlier-trim
    τ̂ᵢ ← wᵢ · τ̂ᵢ                                  per-model weight
    mᵢ = [sgn(τ̂ᵢ) = γ],  γ = sgn(Σᵢ τ̂ᵢ)            sign consensus (TIES), else mᵢ = 1
    τ = Σᵢ mᵢ τ̂ᵢ  /  (Σᵢ mᵢ wᵢ  if normalize)       (disjoint) mean or sum
    θ = θ₀ + λ · τ

Registered settings (name: sparsification, consensus, normalize default, rescale default):

- ``task_arithmetic`` — none, none, False, False. Ilharco et al. 2022, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089: ``θ = θ₀ + λ Σᵢ wᵢ τᵢ``.
- ``ties`` — magnitude, sum, True, False. Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models", https://arxiv.org/abs/2306.01708: trim to the top-k% magnitudes, elect the sign of the summed
  trimmed vectors, average only the agreeing entries (disjoint mean).
- ``dare_linear`` — random, none, False, True; ``dare_ties`` — random, sum, False, True. Yu et al. 2023,
  "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
  https://arxiv.org/abs/2311.03099: drop each entry with probability ``1 − density`` and rescale the survivors
  (the paper: by ``1 / density``, so the expected task vector is unchanged; by default here, as in mergekit, so
  the task vector keeps its L1 norm — see below).
- ``breadcrumbs`` (and ``breadcrumbs_ties``) — outlier trim, none (sum), False, False. Davari & Belilovsky 2023,
  "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", https://arxiv.org/abs/2312.06795:
  drop the largest ``gamma`` fraction (outliers) and the smallest entries, keeping ``density`` of them.

- ``della`` — magnitude-ranked random drop (MagPrune), sum, True, True; ``della_linear`` — the same without sign
  consensus, False, True. Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
  Magnitude-Based Sampling", https://arxiv.org/abs/2406.11617: within each row (mergekit: along dimension 1; a
  1-D tensor is one row) the entry of magnitude rank ``r`` of ``n`` is kept with probability
  ``density − ε + 2ε (r − 1)/(n − 1)``, so large entries survive more often.

Rescaling (``rescale: true``) follows mergekit: the kept entries are scaled so the task vector keeps its L1 norm
(``‖τ‖₁ / ‖τ̂‖₁``, one factor per tensor and model, from a read-only pass over the chunks). ``rescale_norm:
density`` divides by the density instead, as the DARE paper writes it (same expectation, different numbers).

Ties at the top-k threshold (``ties``, ``breadcrumbs``): entries with exactly the k-th largest magnitude are kept in
flat (row-major) index order until ``k`` are kept (``ties: index``, the default; what a stable descending sort
gives), or all of them (``ties: keep_all``, as the TIES reference code's ``kthvalue`` with ``>=`` does; then
slightly more than ``density`` survive). Both are deterministic and independent of chunking. mergekit selects with
an unstable ``argsort``; continuous weights in float32 have few exact ties, half-precision ones many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import (
    ChunkedMergeMethod,
    ChunkPass,
    MergeParams,
    Param,
    TensorChunk,
    in_closed_unit_interval,
    non_negative,
    register_method,
    tensor_generator,
)

__all__ = [
    "SPARSIFIERS",
    "GeneralizedTaskArithmetic",
    "TopK",
    "select_largest",
    "sign_consensus_mask",
    "sparsify",
]


def _keep_count(numel: int, density: float) -> int:
    # at least one entry survives in a non-empty tensor: a positive density never erases a whole tensor (a zero
    # density does, as mergekit's sparsifiers return zeros there)
    return max(1, int(density * numel)) if numel and density > 0 else 0


_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}
_DIGIT = 16  # bits resolved per pass: a 65,536-bin histogram


@dataclass
class TopK:
    """The ``k`` largest entries of a (chunked) non-negative tensor, as a rule any chunk can apply.

    ``value`` is the k-th largest value; all ``n_greater`` entries above it are kept, and of the ``n_equal`` entries
    equal to it the first ``k − n_greater`` in flat (row-major) order — ``torch.topk`` leaves ties unspecified,
    this makes them deterministic and independent of how the tensor is chunked. :meth:`mask` keeps a running
    count of the equal entries seen, so chunks must come in order, each once.
    """

    k: int
    value: Tensor
    n_greater: int
    n_equal: int
    seen_equal: int = 0
    keep_all: bool = False
    """Keep every entry equal to the k-th largest value (the TIES reference code's ``kthvalue`` + ``>=``)."""

    @property
    def takes_every_tie(self) -> bool:
        """Whether every entry equal to ``value`` is kept, so the rule is ``a >= value`` with no running count."""
        return self.keep_all or self.k - self.n_greater == self.n_equal

    def fresh(self) -> TopK:
        """A copy with the running tie count reset, for another pass over the same chunks."""
        return replace(self, seen_equal=0)

    def mask(self, a: Tensor) -> Tensor:
        """Boolean mask of the kept entries of the next chunk ``a`` (non-negative, the same dtype as ``value``)."""
        if self.takes_every_tie:  # usual: continuous values have no partial tie
            return a >= self.value
        keep = (a > self.value).contiguous()
        left = self.k - self.n_greater - self.seen_equal
        if left > 0:  # ties still to keep: the first ones of this chunk, in flat order
            ties = (a == self.value).reshape(-1).nonzero().squeeze(1)
            keep.view(-1)[ties[:left]] = True
            self.seen_equal += ties.numel()
        return keep

    def shrink_(self, tau: Tensor) -> Tensor:
        """Zero, in place, the entries of the next chunk of a signed ``tau`` whose ``|τ|`` the rule drops.

        The same selection as ``tau * mask(|tau|)`` (``value`` in ``tau``'s dtype, float32 or float64; dropped
        entries become ``+0``) as one vectorized ``hardshrink``: by the float just below ``value`` when every tie
        is kept (``|x| > pred(v)`` is ``|x| ≥ v`` in that dtype), by ``value`` itself once the ties' quota is
        used up; a chunk that still holds kept ties has them found and put back after the shrink.
        """
        v = float(self.value)
        if v <= 0:  # the k-th largest is 0: every entry is kept (or is 0)
            return tau
        if self.takes_every_tie:
            below = float(torch.nextafter(self.value, torch.zeros((), dtype=self.value.dtype)))
            return torch.hardshrink(tau, below, out=tau)
        left = self.k - self.n_greater - self.seen_equal
        if left <= 0:
            return torch.hardshrink(tau, v, out=tau)
        if not tau.is_contiguous():  # ties are counted in row-major order
            return tau.mul_(self.mask(tau.abs()))
        flat = tau.view(-1)
        ties = (flat.abs() == v).nonzero().squeeze(1)
        kept = ties[:left]
        values = flat[kept]
        torch.hardshrink(tau, v, out=tau)
        flat[kept] = values
        self.seen_equal += ties.numel()
        return tau


_MEMO_ELEMENTS = 1 << 21
"""TIES/Breadcrumbs keep every model's ``|τ|`` between the selection passes when the tensor has at most this many
entries over all models (8 MiB in float32); larger tensors recompute it on each pass."""

_SMALL = 4096
"""Tensors of at most this many entries are selected directly (``kthvalue`` of the kept first pass): cheaper than
two passes of a 65,536-bin histogram."""


def _direct(values: Tensor, ranks: Sequence[int]) -> list[TopK]:
    """Exact :class:`TopK` rules of a (small) non-negative tensor held whole."""
    n = values.numel()
    out = []
    for k in ranks:
        value = torch.kthvalue(values, n - k + 1).values
        out.append(TopK(k, value, int((values > value).sum()), int((values == value).sum())))
    return out


def _histogram(
    hists: dict[tuple[int, int], Tensor], i: int, chunk: Tensor, prefixes: set[int], level: int, signed: bool
) -> None:
    """Add chunk ``chunk`` of tensor ``i`` to the 16-bit digit histograms ``hists[(i, prefix)]`` of ``level``."""
    itype, bits = _BITS[chunk.dtype]
    shift = bits - _DIGIT * (level + 1)
    v = chunk.reshape(-1).view(itype)
    if signed:
        top = -(1 << (bits - 1))  # the sign bit, as this signed integer type spells it
        v = torch.where(v < 0, v ^ ~top, v) ^ top
    high = (1 << (_DIGIT * level)) - 1  # the bits of the prefix found so far
    for prefix in prefixes:
        if level == 0:
            sel = v
        elif signed:  # keys may have the top bit set: mask the arithmetic shift's sign extension
            sel = v[((v >> (shift + _DIGIT)) & high) == prefix]
        else:
            sel = v[(v >> (shift + _DIGIT)) == prefix]
        d = (sel >> shift) & ((1 << _DIGIT) - 1) if level or signed else sel >> shift
        h = torch.bincount(d, minlength=1 << _DIGIT)
        key = (i, prefix)
        hists[key] = h if key not in hists else hists[key].add_(h)


def select_largest(
    passes: Callable[[], Iterator[tuple[int, Tensor]]], ks: Sequence[Sequence[int]], *, signed: bool = False
) -> list[list[TopK]]:
    """Exact top-k thresholds of several non-negative tensors read in chunks, in ``O(chunk)`` memory.

    ``passes()`` yields ``(i, chunk)`` — the next chunk of tensor ``i`` (float32 or float64) — for every chunk of
    every tensor, and may be called again for another pass. ``ks[i]`` lists the ranks wanted in tensor ``i``
    (1 ≤ k ≤ numel).

    Radix selection on the IEEE-754 bit patterns, which for non-negative floats order like the integers they
    spell: each pass histograms the next 16 bits of the entries whose higher bits match the prefix found so far
    and picks the bin holding the k-th largest. float32 takes 2 passes, float64 4. A sort or ``topk`` would need
    the whole tensor in memory; a sampled estimate would not be exact. A tensor of at most 4,096 entries is
    kept from the first pass and selected directly (``kthvalue``), in that one pass.

    ``signed=True`` accepts negative values too: the bit patterns are first mapped to keys that order like the
    floats (negatives: all bits flipped; non-negatives: the sign bit set), which costs one more elementwise pass
    per chunk; ``-0.0`` then ranks just below ``+0.0``.
    """
    # per (tensor, rank): [prefix, k remaining within the prefix, entries above the prefix, entries equal]
    state = [[[0, k, 0, 0] for k in ranks] for ranks in ks]
    direct: dict[int, list[TopK]] = {}
    dtype: torch.dtype | None = None
    level, levels = 0, 1
    while level < levels and any(state):
        hists: dict[tuple[int, int], Tensor] = {}
        # level 0: chunks of tensors that may turn out small are held back until their size is known
        held: dict[int, list[Tensor]] = {
            i: [] for i, t in enumerate(state) if t and not signed and level == 0
        }
        held_n = dict.fromkeys(held, 0)

        for i, chunk in passes():
            if not state[i]:
                continue
            if dtype is None:
                dtype = chunk.dtype
                levels = _BITS[dtype][1] // _DIGIT
            if i in held:
                held[i].append(chunk.reshape(-1))
                held_n[i] += chunk.numel()
                if held_n[i] <= _SMALL:
                    continue
                for c in held.pop(i):  # too large to select directly: histogram what was held
                    _histogram(hists, i, c, {t[0] for t in state[i]}, level, signed)
                continue
            _histogram(hists, i, chunk, {t[0] for t in state[i]}, level, signed)
        for i, parts in held.items():  # small tensors: done in this one pass
            direct[i] = _direct(torch.cat(parts) if len(parts) > 1 else parts[0], ks[i])
            state[i] = []
        for i, targets in enumerate(state):
            for t in targets:
                h = hists[(i, t[0])]
                below = h.cumsum(0)  # below[d]: entries with a digit ≤ d (so total − below[d − 1] are ≥ d)
                total = int(below[-1])
                digit = int(torch.searchsorted(below, torch.tensor(total - t[1]), right=True))
                above = total - int(below[digit])
                t[0], t[1], t[2], t[3] = (t[0] << _DIGIT) | digit, t[1] - above, t[2] + above, int(h[digit])
        level += 1
    out = []
    for i, (ranks, targets) in enumerate(zip(ks, state, strict=True)):
        if i in direct:
            out.append(direct[i])
            continue
        sel = []
        for k, (prefix, _, greater, equal) in zip(ranks, targets, strict=True):
            assert dtype is not None
            bits = _BITS[dtype][1]
            pattern = prefix
            if signed:  # undo the key mapping
                pattern = prefix ^ (1 << (bits - 1)) if prefix >> (bits - 1) else prefix ^ ((1 << bits) - 1)
            if pattern >= 1 << (bits - 1):  # as the signed integer type holds it
                pattern -= 1 << bits
            value = torch.tensor([pattern], dtype=torch.int64).to(_BITS[dtype][0]).view(dtype)[0]
            sel.append(TopK(k, value, greater, equal))
        out.append(sel)
    return out


def _whole(a: Tensor, ranks: list[int]) -> list[TopK]:
    return select_largest(lambda: iter([(0, a)]), [ranks])[0]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def magnitude_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|τ|`` (TIES "trim"); ties go to lower indices."""
    k = _keep_count(tau.numel(), density)
    if k >= tau.numel():
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    a = tau.abs().to(_compute_dtype(tau))
    return _whole(a, [k])[0].mask(a)


def random_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Keep each entry independently with probability ``density`` (DARE "drop")."""
    return torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density


def _outlier_ranks(n: int, density: float, gamma: float) -> list[int]:
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)  # outlier removal shrinks if it would undercut the density
    if keep == 0:
        return []
    return [keep + n_top, n_top] if n_top else [keep + n_top]


def _outlier_keep(selectors: list[TopK], a: Tensor) -> Tensor:
    if not selectors:  # density rounds to zero entries
        return torch.zeros_like(a, dtype=torch.bool)
    mask = selectors[0].mask(a)
    if len(selectors) > 1:
        mask &= ~selectors[1].mask(a)
    return mask


def outlier_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Drop the top ``gamma`` fraction by ``|τ|`` and the smallest entries, keeping ``density`` (Breadcrumbs).

    Equivalent to sorting ``|τ|`` ascending and keeping ranks ``[n − keep − top, n − top)``: the top
    ``keep + top`` minus the top ``top`` (ties broken by index, so the second set is inside the first).
    """
    ranks = _outlier_ranks(tau.numel(), density, gamma)
    a = tau.abs().to(_compute_dtype(tau))
    return _outlier_keep(_whole(a, ranks) if ranks else [], a)


SPARSIFIERS = {"magnitude": magnitude_mask, "random": random_mask, "outliers": outlier_mask}


def sparsify(
    tau: Tensor,
    *,
    method: str,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> Tensor:
    """Zero all but a ``density`` fraction of ``tau`` chosen by ``method``; divide survivors by ``density`` if
    ``rescale`` (DARE's unbiased rescaling). With ``inplace`` ``tau`` itself is modified and returned."""
    if density >= 1:
        return tau
    if density <= 0:  # every method drops everything, as mergekit's sparsifiers do
        return tau.zero_() if inplace else torch.zeros_like(tau)
    mask = SPARSIFIERS[method](tau, density, gamma, generator or torch.Generator().manual_seed(0))
    out = tau.mul_(mask) if inplace else tau * mask
    return out.div_(density) if rescale else out


def sign_consensus_mask(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES sign election over stacked task vectors ``(N, ...)``: ``True`` where an entry agrees with the elected
    sign. ``"sum"``: γ = sgn(Σᵢ τ̂ᵢ) (mass-weighted, as in the paper); ``"count"``: majority of signs. A tie
    elects ``+``."""
    signs = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


def della_probabilities(a: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities for magnitudes ``a`` (at least 2-D): ranked along dimension 1 as mergekit does,
    ``density − ε`` for the smallest entry up to ``density + ε`` for the largest; ties ranked by index.

    mergekit ranks with two argsorts (``argsort(argsort(a))``); the second only inverts a permutation, which a
    scatter does exactly in one pass. Finite float32 magnitudes with no sign bit set (``abs`` clears ``-0.0``'s)
    order as their bit patterns read as int32; with the row number above those 31 bits, one stable sort of the
    flattened int64 keys (a radix sort in PyTorch's CPU build) orders every row at once, ties by index, about 3×
    faster than a float32 argsort per row. Same ranks, so the same probabilities bit for bit
    (tests/merging/test_chunked.py).
    """
    n = a.shape[1]
    rows = a.movedim(1, -1)  # (..., n): each ranked row last
    if a.dtype == torch.float32 and not bool(torch.signbit(a).any()):
        bits = rows.reshape(-1, n).view(torch.int32).to(torch.int64)
        first = torch.arange(bits.shape[0], device=a.device).view(-1, 1)
        order = torch.argsort((bits | (first << 31)).reshape(-1), stable=True).view(-1, n) - first * n
        order = order.view(rows.shape)
    else:
        order = torch.argsort(rows, dim=-1, stable=True)
    index = torch.arange(n, device=a.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, index).movedim(-1, 1).to(a.dtype)
    rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def _check_della(density: float, epsilon: float, where: str) -> None:
    # density 0 drops everything and 1 keeps everything without drawing (mergekit checks neither)
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"{where}: DELLA needs density ± epsilon inside (0, 1); density {density} with epsilon {epsilon} is "
            "not: lower epsilon or move density away from 0 and 1"
        )


class GeneralizedTaskArithmetic(ChunkedMergeMethod):
    """The task-vector merge pipeline; a paper is a setting of it (see the module docstring).

    Chunked merging: magnitude and outlier trimming need each model's k-th largest ``|τᵢ|`` over the whole tensor,
    found exactly by :func:`select_largest` in two read-only passes (float32) before the merge pass; DARE's and
    DELLA's drop masks are drawn chunk after chunk from one generator per (tensor, model), which yields the very
    numbers one draw over the whole tensor would (``torch.rand`` fills serially); DELLA ranks within rows, which
    chunks never split (a 1-D tensor is merged whole). The L1 rescale factors take one more read-only pass.
    Everything else is elementwise, so a chunked merge is bit-identical to a whole-tensor one.

    Precision: in float32/float64 every step is computed in that dtype. In a half type (a config's ``dtype:
    bfloat16``, as mergekit computes) each elementwise step rounds to it and the sums over models accumulate in
    float32 and round once, as ``torch.sum`` over a stacked half tensor does in mergekit.

    Args:
        name: registry name.
        sparsification: ``None``, ``"magnitude"``, ``"random"``, ``"outliers"`` or ``"della"``.
        consensus: ``None``, ``"sum"`` or ``"count"``.
        default_normalize: divide by the (agreeing) weight sum unless the config says otherwise.
        default_rescale: rescale sparsified vectors (L1 norm) unless the config says otherwise.
        paper, url: the reference.
    """

    needs_base = True
    mergekit_required = ("weight",)

    def __init__(
        self,
        *,
        name: str,
        sparsification: str | None,
        consensus: str | None,
        default_normalize: bool,
        default_rescale: bool,
        paper: str,
        url: str,
    ) -> None:
        if sparsification not in (None, "della", *SPARSIFIERS):
            raise ConfigError(
                f"sparsification must be one of None, 'della', {sorted(SPARSIFIERS)}. Found {sparsification!r}"
            )
        if consensus not in (None, "sum", "count"):
            raise ConfigError(f"consensus must be None, 'sum' or 'count'. Found {consensus!r}")
        self.name = name
        self.sparsification = sparsification
        self.consensus = consensus
        self.default_normalize = default_normalize
        self.default_rescale = default_rescale
        self.paper = paper
        self.url = url
        params = [
            Param("lambda", 1.0, doc="scale of the merged task vector"),
            Param("normalize", default_normalize, kind="bool", doc="divide by the sum of (agreeing) weights"),
            Param("weight", 1.0, per_model=True, plural="weights", doc="weight of this model's task vector"),
            # mergekit accepts it for every task-vector method; it only picks the sign mask's dtype there, and our
            # masks are always 1-byte booleans, so the numbers are the same either way
            Param(
                "int8_mask",
                False,
                kind="bool",
                doc="store sign masks as int8 (same result; masks are bool here)",
            ),
        ]
        if sparsification is not None:
            params += [
                Param("rescale", default_rescale, kind="bool", doc="rescale kept entries (see rescale_norm)"),
                Param("rescale_norm", "l1", kind="choice", choices=("l1", "density"),
                      doc="l1: keep the task vector's L1 norm (mergekit); density: divide by the density (DARE paper)"),
                Param(
                    "density", 1.0, per_model=True, plural="densities", check=in_closed_unit_interval,
                    doc="fraction of task-vector entries kept (0: the model's task vector is dropped)",
                ),
            ]  # fmt: skip
        if sparsification in ("random", "della"):
            params.append(Param("seed", 0, kind="int", doc="seed of the random drop masks"))
        if sparsification in ("magnitude", "outliers"):
            params.append(
                Param("ties", "index", kind="choice", choices=("index", "keep_all", "argsort"),
                      doc="entries tied at the top-k threshold: lowest flat index first, keep all of them, or "
                      "mergekit's choice (torch.argsort of the whole tensor; magnitude trimming only)")
            )  # fmt: skip
        if sparsification == "outliers":
            params.append(
                Param("gamma", 0.01, per_model=True, plural="gammas", check=non_negative,
                      doc="fraction of largest-magnitude entries dropped as outliers")
            )  # fmt: skip
        if sparsification == "della":
            params.append(
                Param("epsilon", 0.15, per_model=True, plural="epsilons", check=non_negative,
                      doc="keep probabilities spread over density ± epsilon by magnitude rank")
            )  # fmt: skip
        self.params = tuple(params)

    def check_params(self, params: MergeParams, where: str) -> None:
        # DELLA's keep probabilities span density ± epsilon: refused with the config, before any tensor is read
        if self.sparsification == "della":
            for i, mp in enumerate(params.per_model):
                _check_della(mp["density"], mp["epsilon"], f"{where}, model {i}")

    def float64_sums_with(self, params: MergeParams) -> str:
        if self.sparsification and params.shared.get("rescale") and params.shared.get("rescale_norm") == "l1":
            return "each model's L1 norms before and after sparsification (rescale)"
        return ""

    def whole_tensor(self, shape: tuple[int, ...], params: MergeParams) -> bool:
        # DELLA ranks along dimension 1; a 1-D tensor is a single row, so it cannot be cut into chunks
        return self.sparsification == "della" and len(shape) < 2

    def _keep(
        self, state: _EngineState, i: int, tau: Tensor, shared: dict[str, Any], mp: dict[str, Any]
    ) -> Tensor:
        """The keep mask of model ``i``'s next chunk of task vector ``tau``."""
        density = mp["density"]
        if self.sparsification == "random":
            return torch.rand(tau.shape, generator=state.generators[i], dtype=torch.float32) < density
        if self.sparsification == "della":
            a = tau.abs().float()
            flat = a.reshape(1, -1) if a.dim() < 2 else a
            probs = della_probabilities(flat, density, mp["epsilon"])
            draw = torch.rand(probs.shape, generator=state.generators[i], dtype=torch.float32)
            return (draw < probs).reshape(tau.shape)
        if state.whole_masks is not None:
            m = state.whole_masks[i]
            if m is None:
                return torch.ones_like(tau, dtype=torch.bool)
            return (
                m
                if not m.dim() or (state.chunk_rows == (0, m.shape[0]))
                else m[state.chunk_rows[0] : state.chunk_rows[1]]
            )
        trim = state.trim[i]
        if trim is None:  # k covers the whole tensor: nothing is trimmed
            return torch.ones_like(tau, dtype=torch.bool)
        a = tau.abs().float() if tau.dtype not in (torch.float32, torch.float64) else tau.abs()
        return trim[0].mask(a) if self.sparsification == "magnitude" else _outlier_keep(trim, a)

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        state = _EngineState()
        if self.sparsification is None:
            return state
        n_models = len(params.per_model)
        n = math.prod(shape)
        if self.sparsification == "della":
            for mp in params.per_model:
                _check_della(mp["density"], mp["epsilon"], f"tensor '{name}'")
        if self.sparsification in ("random", "della"):
            seed = params.shared.get("seed", 0)
            state.generators = [tensor_generator(seed, name, i) for i in range(n_models)]
            state.trim = [None] * n_models
        else:
            keep_all = params.shared.get("ties") == "keep_all"
            if params.shared.get("ties") == "argsort" and self.sparsification == "magnitude":
                state.whole_masks = self._argsort_masks(shape, chunks, params)
            ranks: list[list[int]] = []
            for mp in params.per_model:
                density = mp["density"]
                if density >= 1 or density <= 0:
                    ranks.append([])
                    state.trim.append(None)  # kept whole, as sparsify() does, or zeroed by the merge
                elif self.sparsification == "magnitude":
                    k = _keep_count(n, density)
                    ranks.append([k] if k < n else [])
                    state.trim.append([] if k < n else None)
                else:
                    ranks.append(_outlier_ranks(n, density, mp.get("gamma", 0.0)))
                    state.trim.append([])
            if any(ranks) and state.whole_masks is None:
                # |τᵢ| of a tensor of moderate size is kept from the first pass for the second (a few MB)
                memo: list[tuple[int, Tensor]] | None = [] if n * len(ranks) <= _MEMO_ELEMENTS else None
                complete = False

                def abs_deltas() -> Iterator[tuple[int, Tensor]]:
                    nonlocal complete
                    if complete:
                        assert memo is not None
                        yield from memo
                        return
                    for chunk in chunks():
                        assert chunk.base is not None
                        for i, t in enumerate(chunk.tensors):
                            if ranks[i]:
                                d = torch.sub(t, chunk.base).abs_()
                                d = d if d.dtype in (torch.float32, torch.float64) else d.float()
                                if memo is not None:
                                    memo.append((i, d))
                                yield i, d
                    complete = memo is not None

                found = select_largest(abs_deltas, ranks)
                for i, sel in enumerate(found):
                    if state.trim[i] is not None:
                        for tk in sel:
                            tk.keep_all = keep_all
                        state.trim[i] = sel
        if params.shared.get("rescale") and params.shared.get("rescale_norm") == "l1":
            state.scale = self._l1_factors(state, chunks, params)
        return state

    def _merge_sum_consensus(self, chunk: TensorChunk, state: _EngineState) -> Tensor:
        """:meth:`merge_chunk` for sign consensus by mass in float32/float64, in float arithmetic only.

        The same numbers as the general path below (up to the sign of zero entries) in about half the elementwise
        passes, none of them on boolean tensors (a compare, a ``where`` of booleans or a boolean × float product
        costs several float passes on CPU). With ``s = ±1`` the elected sign (``+`` where ``Σᵢ τ̂ᵢ ≥ 0``), the
        agreeing part of each model is ``qᵢ = max(s τ̂ᵢ, 0)`` — ``|τ̂ᵢ|`` where ``sgn τ̂ᵢ = s``, else 0 — so
        ``Σᵢ mᵢ τ̂ᵢ = s Σᵢ qᵢ`` exactly (negation commutes with rounding; the sum runs in the same model order),
        ``mᵢ = sgn qᵢ`` and the divisor ``Σᵢ wᵢ mᵢ`` is summed as before.
        """
        base = chunk.base
        assert base is not None
        params = chunk.params
        cdt = base.dtype
        weights = params.column("weight")
        rescale = params.shared.get("rescale", False)
        by_density = params.shared.get("rescale_norm") == "density"
        taus = list(chunk.tensors)
        rounded_w = [float(torch.tensor(w, dtype=cdt)) for w in weights]
        for i, tau in enumerate(taus):
            tau.sub_(base)
            mp = params.per_model[i]
            density = mp.get("density", 1.0)
            if self.sparsification is not None and density <= 0:
                tau.zero_()  # mergekit's sparsifiers return zeros: the model adds nothing here
            elif self.sparsification is not None and density < 1:
                self._sparsify_(state, i, tau, params.shared, mp)
                if rescale and by_density:
                    tau.div_(density)
                elif rescale and state.scale and (f := state.scale[i]) is not None:
                    tau.mul_(torch.tensor(f[0], dtype=cdt) / torch.tensor(f[1], dtype=cdt))
            if weights[i] != 1:
                tau.mul_(torch.tensor(weights[i], dtype=cdt))
        # the elected sign: +1 where the votes sum to ≥ 0 (-0.0 votes need every τ̂ᵢ = ±0: nobody agrees there)
        votes = torch.add(taus[0], taus[1]) if len(taus) > 1 else taus[0].clone()
        for tau in taus[2:]:
            votes.add_(tau)
        sign = torch.copysign(torch.ones((), dtype=cdt), votes, out=votes)
        normalize = params.shared["normalize"]
        total: Tensor | None = None
        divisor: Tensor | None = None
        for w, tau in zip(rounded_w, taus, strict=True):
            q = torch.mul(tau, sign, out=tau).clamp_min_(0)  # |τ̂ᵢ| where it agrees, else 0
            if normalize:
                if divisor is None:
                    divisor = torch.sign(q)
                    if w != 1:
                        divisor.mul_(w)
                else:
                    divisor.add_(torch.sign(q), alpha=w)
            total = q if total is None else total.add_(q)
        assert total is not None
        lam = params.shared["lambda"]
        if divisor is not None:
            if all(w == 1 for w in rounded_w):
                divisor.clamp_min_(1)  # a count of agreeing models: none → 1 (the merged entry is 0 anyway)
            else:
                divisor.masked_fill_(divisor == 0, 1)
            divisor.mul_(sign)  # s Σq / d = Σq / (s d), exactly
            if lam == 1:
                return torch.addcdiv(base, total, divisor, out=total)
            total.div_(divisor)
        else:
            total.mul_(sign)
        if lam != 1:
            total.mul_(lam)
        return total.add_(base)

    @staticmethod
    def _argsort_masks(shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> list[Tensor | None]:
        """mergekit's magnitude masks, ties included: ``argsort(|τ|.float(), descending=True)[:k]`` of the whole
        tensor. Holds one whole-tensor ``|τ|`` and a boolean mask per model (the price of replaying its order)."""
        n_models = len(params.per_model)
        parts: list[list[Tensor]] = [[] for _ in range(n_models)]
        for chunk in chunks():
            assert chunk.base is not None
            for i, t in enumerate(chunk.tensors):
                parts[i].append(torch.sub(t, chunk.base).abs_().float().reshape(-1))
        masks: list[Tensor | None] = []
        n = math.prod(shape)
        for i, mp in enumerate(params.per_model):
            if mp["density"] >= 1 or mp["density"] <= 0 or n == 0:  # kept whole, or zeroed by the merge
                masks.append(None)
                continue
            w = torch.cat(parts[i]) if parts[i] else torch.zeros(0)
            parts[i] = []
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.argsort(w, descending=True)[: _keep_count(n, mp["density"])]] = True
            masks.append(keep.reshape(shape))
        return masks

    def _l1_factors(
        self, state: _EngineState, chunks: ChunkPass, params: MergeParams
    ) -> list[tuple[float, float] | None]:
        """``(‖τᵢ‖₁, ‖τ̂ᵢ‖₁)`` per model, the rescale factor's numerator and denominator, kept apart so the merge
        divides in its compute dtype (``None``: unsparsified or a norm under 1e-7, left as is, as mergekit does).

        Replays the masks the merge pass will draw: fresh copies of the top-k rules, saved generator states.
        """
        sparse = [
            0 < mp["density"] < 1 for mp in params.per_model
        ]  # a zero density zeroes τ: nothing to scale
        if not any(sparse):
            return [None] * len(sparse)
        saved = [g.get_state() for g in state.generators]
        trims = state.trim
        state.trim = [None if t is None else [x.fresh() for x in t] for t in trims]
        before = [0.0] * len(sparse)
        after = [0.0] * len(sparse)
        for chunk in chunks():
            assert chunk.base is not None
            state.chunk_rows = (chunk.start, chunk.stop)
            for i, t in enumerate(chunk.tensors):
                if not sparse[i]:
                    continue
                tau = torch.sub(t, chunk.base)
                a = tau.abs()
                before[i] += float(a.sum(dtype=torch.float64))
                after[i] += float(
                    a.mul_(self._keep(state, i, tau, params.shared, params.per_model[i])).sum(
                        dtype=torch.float64
                    )
                )
        state.trim = trims
        for g, s in zip(state.generators, saved, strict=True):
            g.set_state(s)
        return [
            None if not sp or b < 1e-7 or a < 1e-7 else (b, a)
            for sp, b, a in zip(sparse, before, after, strict=True)
        ]

    def _sparsify_(
        self, state: _EngineState, i: int, tau: Tensor, shared: dict[str, Any], mp: dict[str, Any]
    ) -> None:
        """Zero, in place, the entries of model ``i``'s next chunk of ``tau`` that its sparsification drops.

        Magnitude trimming in float32/float64 is :meth:`TopK.shrink_`, one vectorized ``hardshrink`` where
        ``abs``, a compare and a boolean product cost three passes, two of them on (slow) boolean tensors.
        """
        trim = state.trim[i] if state.trim else None
        if (
            self.sparsification == "magnitude"
            and state.whole_masks is None
            and trim
            and tau.dtype in (torch.float32, torch.float64)
        ):
            trim[0].shrink_(tau)
            return
        tau.mul_(self._keep(state, i, tau, shared, mp))

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        base = chunk.base
        assert base is not None  # needs_base is enforced before any tensor is read
        params = chunk.params
        state.chunk_rows = (chunk.start, chunk.stop)
        cdt = base.dtype
        half = cdt not in (torch.float32, torch.float64)
        if self.consensus == "sum" and not half:
            return self._merge_sum_consensus(chunk, state)
        acc = torch.float32 if half else cdt  # sums over models: float32 for half types, as torch.sum does
        weights = params.column("weight")
        rescale = params.shared.get("rescale", False)
        by_density = params.shared.get("rescale_norm") == "density"
        # Each input becomes its task vector in place (the inputs are owned by the merge): peak memory is the
        # inputs plus about three chunks of scratch, not a stacked (N, ...) copy of everything.
        taus = list(chunk.tensors)
        for i, tau in enumerate(taus):
            tau.sub_(base)
            mp = params.per_model[i]
            density = mp.get("density", 1.0)
            if self.sparsification is not None and density <= 0:
                tau.zero_()  # mergekit's sparsifiers return zeros: the model adds nothing here
            elif self.sparsification is not None and density < 1:
                keep = self._keep(state, i, tau, params.shared, mp)
                tau.mul_(keep)
                del keep
                if rescale and by_density:
                    tau.div_(density)
                elif rescale and state.scale and (f := state.scale[i]) is not None:
                    # rounded as mergekit rounds it: two norms in the compute dtype, their ratio, one product
                    tau.mul_(torch.tensor(f[0], dtype=cdt) / torch.tensor(f[1], dtype=cdt))
            if weights[i] != 1:
                tau.mul_(torch.tensor(weights[i], dtype=cdt))
        normalize = params.shared["normalize"]
        divisor: Tensor | None = None
        if self.consensus is not None:
            votes = torch.zeros(base.shape, dtype=acc)
            for tau in taus:
                votes.add_(tau if self.consensus == "sum" else tau.sign())
            positive = votes.to(cdt) >= 0  # elected sign γ (a tie elects +)
            del votes
            divisor = torch.zeros(base.shape, dtype=acc) if normalize else None
            for w, tau in zip(weights, taus, strict=True):
                agree = torch.where(positive, tau > 0, tau < 0)  # sgn(τ̂ᵢ) = γ; zeros never agree
                tau.mul_(agree)
                if divisor is not None:
                    divisor.add_(agree.to(cdt), alpha=float(torch.tensor(w, dtype=cdt)))
                del agree
            if divisor is not None:
                divisor = divisor.to(cdt)
                divisor.masked_fill_(divisor == 0, 1)  # no model agrees → merged entry is 0 anyway
        elif normalize:
            # the weights rounded to the compute dtype, summed exactly and rounded once (torch.sum over models)
            total = float(torch.tensor(sum(float(torch.tensor(w, dtype=cdt)) for w in weights), dtype=cdt))
            divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0, dtype=cdt)
        if half:
            summed = torch.zeros(base.shape, dtype=acc)
            for tau in taus:
                summed.add_(tau)
            merged = summed.to(cdt)
        else:
            merged = taus[0]  # accumulate into the first task vector: no extra tensor
            for tau in taus[1:]:
                merged.add_(tau)
        del taus
        if divisor is not None:
            merged.div_(divisor)
        lam = params.shared["lambda"]
        if lam != 1:
            merged.mul_(lam)
        return merged.add_(base)


@dataclass
class _EngineState:
    """Per-tensor state of one chunked merge: trimming thresholds or random generators per model, L1 factors."""

    trim: list[list[TopK] | None] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    whole_masks: list[Tensor | None] | None = None
    """``ties: argsort``: each model's whole-tensor keep mask (``None``: kept whole)."""
    chunk_rows: tuple[int, int] = (0, 0)
    """Rows of the chunk being merged (to cut ``whole_masks``)."""
    scale: list[tuple[float, float] | None] = field(default_factory=list)


for _spec in (
    dict(name="task_arithmetic", sparsification=None, consensus=None, default_normalize=False,
         default_rescale=False, paper="Ilharco et al. 2022, Editing Models with Task Arithmetic",
         url="https://arxiv.org/abs/2212.04089"),
    dict(name="ties", sparsification="magnitude", consensus="sum", default_normalize=True, default_rescale=False,
         paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
         url="https://arxiv.org/abs/2306.01708"),
    dict(name="dare_linear", sparsification="random", consensus=None, default_normalize=False,
         default_rescale=True, paper="Yu et al. 2023, Language Models are Super Mario (DARE)",
         url="https://arxiv.org/abs/2311.03099"),
    dict(name="dare_ties", sparsification="random", consensus="sum", default_normalize=False,
         default_rescale=True, paper="Yu et al. 2023, Language Models are Super Mario (DARE) + TIES sign consensus",
         url="https://arxiv.org/abs/2311.03099"),
    dict(name="breadcrumbs", sparsification="outliers", consensus=None, default_normalize=False,
         default_rescale=False, paper="Davari & Belilovsky 2023, Model Breadcrumbs",
         url="https://arxiv.org/abs/2312.06795"),
    dict(name="breadcrumbs_ties", sparsification="outliers", consensus="sum", default_normalize=False,
         default_rescale=False, paper="Davari & Belilovsky 2023, Model Breadcrumbs + TIES sign consensus",
         url="https://arxiv.org/abs/2312.06795"),
    dict(name="della", sparsification="della", consensus="sum", default_normalize=True, default_rescale=True,
         paper="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
         "Sampling", url="https://arxiv.org/abs/2406.11617"),
    dict(name="della_linear", sparsification="della", consensus=None, default_normalize=False,
         default_rescale=True, paper="Deep et al. 2024, DELLA-Merging (without sign consensus)",
         url="https://arxiv.org/abs/2406.11617"),
):  # fmt: skip
    register_method(GeneralizedTaskArithmetic(**_spec), replace=True)
