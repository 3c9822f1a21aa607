"""Byzantine-robust aggregation: defences against poisoned client updates.

Statistical defences compare updates with each other, so they **must hold every update of the round**
(``streaming = False``, memory O(clients × model)): :class:`CoordinateMedian`, :class:`TrimmedMean`,
:class:`Krum`, :class:`GeometricMedian` (RFA), :class:`CenteredClip`, :class:`FLAME`, :class:`FoolsGold`. Updates are kept flattened to one float32 vector each. Three
defences stream in O(model): :class:`~deltaplane.aggregation.clipping.NormBound` (clip each update's norm, with
optional weak DP noise), :class:`FLTrust` (score each update against a trusted server update known before the
round) and :class:`SignVote` (majority vote of signs). These defences ignore client weights: a weight is
something an attacker can claim.

Compressed uplinks: a defence declares the codecs it is valid with in ``sparse_ok``. Coordinate-wise rules
(median, trimmed mean) are not valid over sparsifying codecs (top-k, rand-k, threshold, STC): most coordinates of
most decoded updates are zero, so the per-coordinate median or trimmed mean is zero almost everywhere and the
model stops learning (trimmed mean over ``topk(0.01)`` collapses the default federation to chance);
:func:`~deltaplane.aggregation.factory.check_defense_codec` refuses those combinations with
:class:`~deltaplane.errors.IncompatibleDefense`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from deltaplane.aggregation.base import refuse_complex
from deltaplane.aggregation.checkpoint import flat_state_difference, float_shapes
from deltaplane.aggregation.clipping import NormBound
from deltaplane.aggregation.counters import IntegerMedians
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError, InvalidUpdate, ShapeMismatch, TooFewUpdates

if TYPE_CHECKING:
    from deltaplane.codecs.layout import TensorLayout

__all__ = [
    "FLAME",
    "CenteredClip",
    "CenteredClipState",
    "CoordinateMedian",
    "FLTrust",
    "FoolsGold",
    "FoolsGoldState",
    "GeometricMedian",
    "Krum",
    "NormBound",
    "SignVote",
    "TrimmedMean",
]


def _admit(like: Delta | None, delta: Delta, weight: float, rule: str) -> Delta:
    """The checks every rule makes on an incoming update (finite weight, real and finite values, the round's
    layout); returns the layout reference to keep (the first update of the round)."""
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise InvalidUpdate(f"weight must be a finite non-negative number. Found {weight!r}")
    refuse_complex(delta, rule)
    delta.check_finite()
    if like is None:
        return delta
    check_compatible(like, delta, "aggregate and client delta")
    return like


def _row(delta: Delta) -> torch.Tensor:
    """``delta`` as the one float32 vector the rules compare (:meth:`Delta.flatten`), refusing values beyond
    float32's range: a float64 tensor can hold them finite, and the cast turns them into ±inf, which passed
    every finiteness check and then made FoolsGold release NaN and FLAME's clustering raise (a round lost)."""
    row = delta.flatten()
    if any(v.dtype == torch.float64 for v in delta.values()) and not bool(torch.isfinite(row).all()):
        bad = next(
            k
            for k, v in delta.items()
            if v.dtype == torch.float64 and not bool(torch.isfinite(v.float()).all())
        )
        raise InvalidUpdate(
            f"tensor '{bad}' holds values beyond float32's range (±{torch.finfo(torch.float32).max:.3g}); "
            "robust rules compare updates in float32: refusing the update"
        )
    return row


class _Buffered:
    """Holds the round's updates as rows of an (n, d) float32 matrix, built incrementally."""

    streaming = False
    _coordinatewise = False
    #: whether the rule stays meaningful when most coordinates of most updates are zero (sparsifying codecs)
    sparse_ok = True
    block = 1 << 16

    def __init__(self) -> None:
        self._like: Delta | None = None
        self._rows: list[torch.Tensor] = []
        self._senders: list[str | None] = []  # the client id of each row (None: not told)
        self._next_id: str | None = None
        self._own: dict[str, float] = {}
        self._counters = (
            IntegerMedians()
        )  # each update's integer tensors (see deltaplane.aggregation.counters)

    def identify(self, client_id: str | None) -> None:
        """The id of the client whose update the next :meth:`add` receives
        (:class:`~deltaplane.aggregation.validation.Validate` says it): buckets are drawn over client ids,
        not over arrival positions (:meth:`_bucketed`)."""
        self._next_id = client_id

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        sender, self._next_id = self._next_id, None  # told for this update only, kept or refused
        like = _admit(self._like, delta, weight, type(self).__name__)
        row = _row(delta)
        self._like = like
        self._rows.append(row)
        self._senders.append(sender)
        self._counters.add(delta)

    def result(self) -> Delta:
        if not self._rows or self._like is None:
            raise TooFewUpdates("no client delta was added; nothing to aggregate")
        rows = self._bucketed(self._rows)
        if self._coordinatewise:
            # per-coordinate rules run on column blocks: sorting a block needs O(n · block) scratch, not
            # another O(n · d) for sorted values and int64 indices on top of the held updates
            d = rows[0].numel()
            out = torch.empty(d)
            for lo in range(0, d, self.block):
                hi = min(d, lo + self.block)
                out[lo:hi] = self._combine(torch.stack([r[lo:hi] for r in rows]))
            return self._counters.apply(self._like.unflatten(out))
        # integer tensors: their lower median (unflatten fills them from the first update to arrive)
        return self._counters.apply(self._like.unflatten(self._combine_rows(rows)))

    def _combine_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The rule over the round's rows (each a (d,) float32 vector): :meth:`_combine` of their (n, d) stack,
        unless a rule walks the rows itself in column blocks, without the stacked copy (the geometric median)."""
        return self._combine(torch.stack(rows))

    #: bucket size ``s`` of :meth:`_bucketed` (1: every update is its own bucket, the rule as published)
    bucket = 1

    @property
    def min_rows(self) -> int:
        """Rows (bucket means) :meth:`_combine` needs to give a result: one, unless a rule says otherwise (a
        property, so a rule's count can follow its own settings: ``byzantine``, ``beta``, ``select``)."""
        return 1

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs for this rule to close (the trimmed mean: to trim anything):
        ⌈n/s⌉ buckets must reach :attr:`min_rows`. Run configurations check it against their clients per round
        up front, so a run does not train a whole round only to fail at its close, or run undefended."""
        return (self.min_rows - 1) * self.bucket + 1

    def _bucketed(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Bucketing (Karimireddy, He & Jaggi 2022, ICLR, https://arxiv.org/abs/2006.09365, Algorithm 1).

        The round's updates in a fresh random order, averaged in buckets of ``s`` (the last may be smaller);
        the robust rule then runs over the ⌈n/s⌉ bucket means. Averaging shrinks the spread that non-IID data
        puts between honest updates (a median of skewed updates is a biased mean), while ``b`` attackers still
        spoil at most ``b`` buckets — a rule that tolerates a fraction δ of bad inputs tolerates δ/s attackers.

        The random order permutes the updates sorted by their senders' ids (:func:`sender_order`), not their
        arrival positions: which devices share a bucket, and the result bit for bit, depend only on the round's
        (client id, update) pairs and the seed, whatever order a network or a worker pool delivers them in.
        """
        if self.bucket <= 1 or len(rows) <= 1:
            return rows
        by_sender = sender_order(self._senders)
        drawn = torch.randperm(len(rows), generator=self._bucket_rng).tolist()
        order = [by_sender[i] for i in drawn]
        self._own = {**self._own, "buckets": float(-(-len(rows) // self.bucket))}
        # each bucket's mean in float64: finite float32 updates near ±3.4e38 summed to ±inf in float32, and the
        # mean of finite values always fits float32 again
        return [
            torch.stack([rows[i] for i in order[lo : lo + self.bucket]]).double().mean(dim=0).float()
            for lo in range(0, len(rows), self.bucket)
        ]

    def _set_bucket(self, bucket: int, seed: int) -> None:
        if isinstance(bucket, bool) or not (isinstance(bucket, int) and bucket >= 1):
            raise ConfigError(f"bucket must be a positive integer (1: no bucketing). Found {bucket!r}")
        self.bucket = bucket
        self._bucket_rng = torch.Generator().manual_seed(
            seed
        )  # in the snapshot: a restart continues its order

    def _combine(self, x: torch.Tensor) -> torch.Tensor:  # (n, d) -> (d,)
        raise NotImplementedError

    def reset(self) -> None:
        self._like, self._rows, self._senders, self._next_id = None, [], [], None
        self._counters.reset()

    @property
    def measurements(self) -> dict[str, float]:
        return {"clients": float(len(self._rows)), **self._own}


def _natural(client_id: str) -> tuple[tuple[str | int, ...], str]:
    """``client_id``'s sort key: digit runs compare as numbers (``client-2`` before ``client-10``, ``2``
    before ``10``), then the id itself (``01`` and ``1`` stay apart)."""
    parts = re.split(r"(\d+)", client_id)  # text at even positions, digit runs at odd ones
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), client_id


def sender_order(senders: list[str | None]) -> list[int]:
    """The row positions of ``senders`` (each row's client id, None where unknown) in a fixed order: identified
    rows by id in natural order (digit runs as numbers), so that the same devices sort alike on every driver —
    ``3`` in process and on Flower (device id = partition id), ``client-3`` on the HTTP federation — then
    unidentified rows in arrival order (an aggregator used directly, without
    :class:`~deltaplane.aggregation.validation.Validate`, keeps the order it was fed). Two rows of one id (a
    driver that let a device send twice) keep their arrival order."""
    known = sorted(
        (i for i, s in enumerate(senders) if s is not None), key=lambda i: _natural(str(senders[i]))
    )
    return known + [i for i, s in enumerate(senders) if s is None]


#: bucket size of the plain coordinate-wise median when none is given (see :class:`CoordinateMedian`)
DEFAULT_MEDIAN_BUCKET = 2


class CoordinateMedian(_Buffered):
    """Coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498); mean of the two middle values
    for an even count. Holds all updates (O(clients × model)). Not valid over sparsifying codecs.

    With ``byzantine=b``: *mean around median* (MeaMed, Xie et al. 2018, https://arxiv.org/abs/1802.10116,
    Definition 3): per coordinate, the mean of the ``n − b`` values nearest the median. The plain median of
    skewed non-IID updates is a biased estimate of their mean (it cost 2.2 points on the default federation
    without attackers, identity codec, mean of 3 seeds); MeaMed averages all but the ``b`` values farthest from it, so up to
    ``b`` outliers per coordinate still cannot move it far.

    With ``bucket=s > 1``: the median of the means of random buckets of ``s`` updates (bucketing, see
    :meth:`_Buffered._bucketed`), the remedy Karimireddy et al. give for robust rules on heterogeneous data
    (https://arxiv.org/abs/2006.09365). **The median buckets by 2 unless told otherwise**: on the default
    federation without attackers the plain median lost 2.2 points against FedAvg (mean of 3 seeds, identity
    codec), bucketing by 2 0.8 (``docs/benchmarks.md``, robust aggregation, no attacker). The price is the
    breakdown point: ``b`` attackers can spoil ``b`` buckets of ⌈n/2⌉, so the median of bucket means holds
    while attackers are fewer than a quarter of the updates (the plain median: half); ``bucket=1`` is Yin et
    al.'s rule as published. Mean around median (``byzantine`` given) already averages all but ``b`` values
    and does not bucket unless asked.

    Args:
        byzantine: ``b``, the values per coordinate left out (None: the plain median).
        bucket: ``s``, updates averaged per bucket before the median (1: none; None, the default: 2 for the
            plain median, 1 for mean around median).
        seed: seeds the buckets' random order (a fresh order every round).
    """

    _coordinatewise = True
    sparse_ok = False

    def __init__(self, *, byzantine: int | None = None, bucket: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if byzantine is not None and not (isinstance(byzantine, int) and byzantine >= 0):
            raise ConfigError(f"byzantine must be a non-negative integer or None. Found {byzantine!r}")
        self.byzantine = byzantine
        if bucket is None:
            bucket = DEFAULT_MEDIAN_BUCKET if byzantine is None else 1
        self._set_bucket(bucket, seed)

    @property
    def min_rows(self) -> int:
        return 1 if self.byzantine is None else self.byzantine + 1

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = x.sort(dim=0).values
        # the two middle values summed in float64: two finite float32 values near ±3.4e38 summed to ±inf
        med = s[n // 2] if n % 2 else (0.5 * (s[n // 2 - 1].double() + s[n // 2].double())).to(x.dtype)
        if self.byzantine is None:
            return med
        if n - self.byzantine < 1:
            raise TooFewUpdates(f"mean around median leaving out {self.byzantine} of {n} updates keeps none")
        # the n − b nearest values form a window of consecutive sorted values: slide it and keep the nearest
        m = n - self.byzantine
        spread = torch.maximum(med - s[: n - m + 1], s[m - 1 :] - med)  # (windows, block): farthest value
        best = spread.argmin(dim=0, keepdim=True)  # first (lowest) window on ties
        csum = torch.cat([torch.zeros_like(s[:1]), s.double().cumsum(dim=0)])  # window sums in O(n · block)
        total = csum[m:].gather(0, best) - csum[: n - m + 1].gather(0, best)
        return (total / m).squeeze(0).to(x.dtype)

    def __repr__(self) -> str:
        return f"CoordinateMedian(byzantine={self.byzantine!r}, bucket={self.bucket!r})"


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean (Yin et al. 2018, https://arxiv.org/abs/1803.01498): per coordinate, drop the
    ``⌊beta·n⌋`` largest and smallest values and average the rest. Holds all updates (O(clients × model)).

    Not valid over sparsifying codecs (see the module docstring).

    Args:
        beta: fraction trimmed from *each* end, in [0, 0.5).
        bucket: ``s``, updates averaged per random bucket before trimming (bucketing; 1: none).
        seed: seeds the buckets' random order.
    """

    _coordinatewise = True
    sparse_ok = False

    def __init__(self, *, beta: float = 0.1, bucket: int = 1, seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(beta, int | float) and 0.0 <= beta < 0.5):
            raise ConfigError(f"beta must be in [0, 0.5). Found {beta!r}")
        self.beta = beta
        self._set_bucket(bucket, seed)

    @property
    def min_rows(self) -> int:
        """The fewest rows from which ``⌊β·n⌋ ≥ 1``: with fewer the rule trims nothing and is the plain mean,
        which defends nothing (``trimmed_mean(0.2)`` over 3 updates, the default ``β = 0.1`` under 10). A round
        with fewer still closes (``trimmed_per_side`` says 0); a run configured for fewer is refused."""
        if self.beta == 0:
            return 1
        rows = max(1, math.ceil(1 / self.beta) - 1)
        while math.floor(self.beta * rows) < 1:  # ⌊β·n⌋ as _combine takes it, float rounding included
            rows += 1
        return rows

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        k = math.floor(self.beta * n)
        if n - 2 * k < 1:
            raise TooFewUpdates(f"trimmed mean with beta={self.beta} leaves no update out of {n}")
        self._own = {**self._own, "trimmed_per_side": float(k)}
        # averaged in float64 (a float32 sum of finite values near ±3.4e38 overflowed to ±inf; their mean fits)
        return x.sort(dim=0).values[k : n - k].double().mean(dim=0).to(x.dtype)

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta!r}, bucket={self.bucket!r})"


class Krum(_Buffered):
    """Krum and multi-Krum (Blanchard et al. 2017, https://papers.nips.cc/paper/6617): score each update by the
    sum of squared distances to its ``n − f − 2`` nearest neighbours, keep the ``m`` best-scored and average
    them. ``m=1`` is Krum. Needs ``n > 2f + 2``. Holds all updates (O(clients × model)).

    Args:
        byzantine: ``f``, the number of malicious clients to tolerate.
        select: ``m``, how many updates to average (None: ``n − f``, the usual multi-Krum choice). A run
            needs ``m + f`` updates a round (refused up front with fewer); a round that ends up with fewer
            averages its ``n − f`` best.
    """

    def __init__(self, *, byzantine: int = 1, select: int | None = 1) -> None:
        super().__init__()
        if not (isinstance(byzantine, int) and byzantine >= 0):
            raise ConfigError(f"byzantine must be a non-negative integer. Found {byzantine!r}")
        if select is not None and not (isinstance(select, int) and select >= 1):
            raise ConfigError(f"select must be a positive integer or None. Found {select!r}")
        self.byzantine = byzantine
        self.select = select
        self.selected: list[int] = []

    @property
    def min_rows(self) -> int:
        """``n > 2f + 2`` for the scores, and ``n ≥ m + f`` for multi-Krum's ``m``: averaging more than the
        ``n − f`` honest updates a round of ``n`` is sure to hold takes an attacker's in with them."""
        return max(2 * self.byzantine + 3, (self.select or 0) + self.byzantine)

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n, f = x.shape[0], self.byzantine
        if n <= 2 * f + 2:
            raise TooFewUpdates(f"Krum tolerating {f} byzantine clients needs more than {2 * f + 2}; got {n}")
        # rows in their senders' order (sender_order): a tie of scores (duplicates, symmetric updates) goes to
        # the same update on every driver, whatever order a network delivered the round's updates in
        order = sender_order(self._senders) if len(self._senders) == n else list(range(n))
        dist = _squared_distances(x[order])
        dist.fill_diagonal_(math.inf)
        scores = dist.sort(dim=1).values[:, : n - f - 2].sum(dim=1)
        # at most the n − f updates sure to be honest (a round that ended up smaller than its run's m + f)
        m = min(self.select, n - f) if self.select is not None else n - f
        kept = sorted(int(i) for i in scores.argsort(stable=True)[: min(m, n)])  # ties: the earlier sender
        self.selected = sorted(order[i] for i in kept)  # (arrival positions)
        self._own = {"selected": float(len(self.selected))}
        # the kept updates averaged in float64 (a float32 sum of finite values near ±3.4e38 overflowed to ±inf),
        # summed in sender order like the scores
        return x[[order[i] for i in kept]].double().mean(dim=0).float()

    def __repr__(self) -> str:
        return f"Krum(byzantine={self.byzantine!r}, select={self.select!r})"


def _column_blocks(rows: list[torch.Tensor], block: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """The rows' columns ``block`` at a time: (the columns, their (n, ≤ block) float64 block). Each block is
    copied into one reused buffer (float32 → float64 in one pass, no float32 stack), so a rule that walks the
    updates this way holds O(n · block) float64 beside them, never a stacked float64 copy of them; the next
    block overwrites it, so a rule may change a block in place."""
    d = rows[0].numel()
    buffer = torch.empty(len(rows), min(d, block), dtype=torch.float64)
    for lo in range(0, d, block):
        cols = slice(lo, min(d, lo + block))
        xb = buffer[:, : cols.stop - lo]  # (n, block)
        for i, r in enumerate(rows):
            xb[i].copy_(r[cols])
        yield cols, xb


class GeometricMedian(_Buffered):
    """Geometric median by the smoothed Weiszfeld algorithm: RFA (Pillutla, Kakade & Harchaoui 2022, IEEE TSP,
    "Robust Aggregation for Federated Learning", https://arxiv.org/abs/1912.13445, Algorithm 2).

    The aggregate is ``z* = argmin_z Σᵢ αᵢ ‖z − xᵢ‖`` over the round's updates ``xᵢ``. From a start ``z⁰``,
    each iteration is a Weiszfeld step made safe near a data point by ``ν``::

        βᵢ = αᵢ / max(ν, ‖zᵗ − xᵢ‖)
        zᵗ⁺¹ = Σ βᵢ xᵢ / Σ βᵢ

    and the loop stops after ``max_iter`` steps or once the objective ``g(z) = Σ αᵢ ‖z − xᵢ‖`` improves by
    less than ``ftol · g(zᵗ⁺¹)``. Unlike a coordinate-wise median it is one point of the update space, so it
    keeps the updates' joint structure (valid over sparsifying codecs), and its breakdown point is ½: fewer
    than half the updates (by weight), however large, move it at most a bounded distance from the others.

    **The start** is the coordinate-wise (lower) median (``start="median"``, the default), not the weighted
    mean (``start="mean"``, the usual choice in RFA's experiments, whose attackers are not orders of magnitude
    off). The stop on *relative* improvement cannot tell a start far off: with one update of 1e30 among 11,
    ``g`` is ~1e30 wherever ``z`` lies near the others, so from the mean (~1e29) the loop stopped with ``z``
    still ~1e22 away. Weiszfeld steps never increase ``g``, so from a start that is itself robust every
    iterate stays within a bounded distance of ``z*`` whenever the rule stops.

    Weights: ``αᵢ`` are equal (``weighted=False``, the default, as every deltaplane defence: a weight is
    something an attacker can claim) or the claimed weights normalised to sum 1 (``weighted=True``, the
    paper's ``αᵢ = nᵢ / n``). Every sum runs in float64 over the updates in their senders' order
    (:func:`sender_order`), so the result is the same bit for bit whatever order a network delivers them in.
    Holds all updates (O(clients × model), float32); while it iterates, only O(model) more: ``z`` in float64
    and one column block of the updates at a time (:attr:`block` columns, cast to float64). Each step walks
    the updates in column blocks, taking ``zᵗ⁺¹`` and the squared distances ``‖zᵗ⁺¹ − xᵢ‖²`` block by block
    in float64 (the distances summed over the blocks); until 2026-12-07 it stacked the updates and held a
    float64 copy of them, 20–28 bytes a value more than the updates themselves (100 updates of 1M values:
    2.5 GiB peak RSS, now 0.7 GiB, and twice as fast; ``docs/aggregation.md``). The block sums round differently from one
    norm over a whole row, so the result is the stacked computation's to rounding, not bit for bit: the
    objective to 1e-13 relative, the aggregate within 1e-6 on updates of order 1 (the objective is flat at
    its minimum, so many steps carry a float64 rounding of it into ``z`` at about its square root; checked
    against the stacked computation in ``tests/aggregation/test_rfa_centered_clip.py``).

    Args:
        nu: ``ν`` > 0, the smoothing: distances below it count as ``ν`` (no division by zero at a data point).
        max_iter: the most Weiszfeld steps a round takes (≥ 1).
        ftol: stop when the objective's relative improvement falls below this (0: always ``max_iter`` steps).
        weighted: weight updates by their claimed weights (the paper's ``αᵢ``) instead of equally.
        start: ``"median"`` (the coordinate-wise median) or ``"mean"`` (the weighted mean): ``z⁰``.
    """

    #: the legal starts ``z⁰``
    STARTS = ("median", "mean")

    def __init__(
        self,
        *,
        nu: float = 1e-6,
        max_iter: int = 100,
        ftol: float = 1e-6,
        weighted: bool = False,
        start: str = "median",
    ) -> None:
        super().__init__()
        if not (isinstance(nu, int | float) and not isinstance(nu, bool) and math.isfinite(nu) and nu > 0):
            raise ConfigError(f"nu must be a positive number. Found {nu!r}")
        if isinstance(max_iter, bool) or not (isinstance(max_iter, int) and max_iter >= 1):
            raise ConfigError(f"max_iter must be a positive integer. Found {max_iter!r}")
        if not (isinstance(ftol, int | float) and not isinstance(ftol, bool) and 0 <= ftol < 1):
            raise ConfigError(f"ftol must be in [0, 1). Found {ftol!r}")
        if not isinstance(weighted, bool):
            raise ConfigError(f"weighted must be true or false. Found {weighted!r}")
        if start not in self.STARTS:
            raise ConfigError(f"start must be one of {list(self.STARTS)}. Found {start!r}")
        self.start = start
        self.nu = nu
        self.max_iter = max_iter
        self.ftol = ftol
        self.weighted = weighted
        self._weights: list[float] = []

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        super().add(delta, weight)  # admitted (a finite, non-negative weight) before it is kept
        self._weights.append(float(weight))

    def _combine_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        n = len(rows)
        order = sender_order(self._senders) if len(self._senders) == n else list(range(n))
        rows = [rows[i] for i in order]  # the same tensors, in their senders' order (no copy)
        if self.weighted:
            alpha = torch.tensor([self._weights[i] for i in order], dtype=torch.float64)
            if float(alpha.sum()) == 0:
                raise TooFewUpdates("every update of the round claims weight 0: no weighted median to take")
            alpha = alpha / alpha.sum()
        else:
            alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
        # z⁰: robust by default (see the class docstring), else the weighted mean; the lower median picks one
        # of the values, so taking it in float64 of the float32 values is exact
        if self.start == "median":
            z, dist = self._step(rows, lambda xb: xb.median(dim=0).values)
        else:
            z, dist = self._step(rows, lambda xb: alpha @ xb)
        objective = float(alpha @ dist)  # g(zᵗ)
        steps = 0
        for steps in range(1, self.max_iter + 1):  # noqa: B007 (the count is reported)
            beta = alpha / dist.clamp_min(self.nu)

            def weiszfeld(xb: torch.Tensor, beta: torch.Tensor = beta) -> torch.Tensor:
                return (beta @ xb) / beta.sum()  # zᵗ⁺¹ = Σ βᵢ xᵢ / Σ βᵢ, on the block's columns

            z, dist = self._step(rows, weiszfeld)
            previous, objective = objective, float(alpha @ dist)
            if abs(previous - objective) <= self.ftol * objective:
                break
        self._own = {"geomed_iterations": float(steps), "geomed_objective": objective}
        return z.float()

    def _step(
        self, rows: list[torch.Tensor], point: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``z``, ``‖z − xᵢ‖`` for each row) in float64, ``z``'s columns ``point`` of the rows' same columns,
        in one pass over the rows in blocks of :attr:`block` columns: a block is stacked and cast to float64
        at a time, so the whole float64 copy of the updates never is, and the squared distances are summed
        over the blocks."""
        z = torch.empty(rows[0].numel(), dtype=torch.float64)
        squares = torch.zeros(len(rows), dtype=torch.float64)
        for cols, xb in _column_blocks(rows, self.block):
            z[cols] = point(xb)
            squares += xb.sub_(z[cols]).square_().sum(dim=1)  # in place: no second block
        return z, squares.sqrt()

    def reset(self) -> None:
        super().reset()
        self._weights = []

    def __repr__(self) -> str:
        return (
            f"GeometricMedian(nu={self.nu!r}, max_iter={self.max_iter!r}, ftol={self.ftol!r}, "
            f"weighted={self.weighted!r}, start={self.start!r})"
        )


def _round_floats(
    like: Delta | None, state: CenteredClipState | FoolsGoldState, held: str
) -> dict[str, tuple[int, ...]]:
    """The float tensors (name -> shape) of the round's updates, refusing a rule's learned ``state`` (``held``:
    what of it, with its verb) kept for another model: restored from another model's snapshot without the
    model's layout at hand, it would otherwise fail as a bare shape error inside the rule.

    Raises:
        ShapeMismatch: naming the first tensor that differs.
    """
    assert like is not None
    floats = float_shapes(like)
    problem = state.layout_problem(floats)
    if problem:
        raise ShapeMismatch(
            f"{problem} in this round's update: the {held} to another model (a snapshot of another model's "
            "run restored?)"
        )
    return floats


def _refuse_another_model(problem: str, held: str) -> None:
    """Refuse at restore a rule's learned state (``held``: what of it, with its verb) that ``problem`` says is
    another model's (empty: it fits).

    Raises:
        ConfigError: ``problem``, and what to restore instead.
    """
    if problem:
        raise ConfigError(
            f"{problem}: the snapshot's {held} to another model; restore a snapshot taken from a run of this model"
        )


#: centered clipping's radius when none is given (see :class:`CenteredClip`, ``tau``): measured, not the paper's
DEFAULT_TAU = 3.0


@dataclass
class CenteredClipState:
    """Centered clipping's server-side memory: the previous round's aggregate (the centre the next round's
    clipping starts from), one flat float64 vector over the model's float tensors, None before the first
    round. Kept apart from the rule so that a checkpoint or a service snapshot carries it."""

    center: torch.Tensor | None = None
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The float tensors (name -> shape) the centre's values belong to, recorded at the first round."""

    def check_state(self) -> None:
        """Refuse a centre no run produces (a corrupted or hand-made snapshot): a finite, flat float64 vector of
        the recorded tensors' length.

        Raises:
            ConfigError: saying what is wrong with it.
        """
        c = self.center
        if c is None:
            return
        if not (isinstance(c, torch.Tensor) and c.dtype == torch.float64 and c.dim() == 1):
            raise ConfigError("centered clipping state: center must be a flat float64 tensor")
        if not bool(torch.isfinite(c).all()):
            raise ConfigError("centered clipping state: center holds NaN or Inf")
        if self.tensors and c.numel() != sum(math.prod(s) for s in self.tensors.values()):
            raise ConfigError(
                "centered clipping state: center and the tensors it is of differ in length "
                f"({c.numel()} values for {sum(math.prod(s) for s in self.tensors.values())})"
            )

    def layout_problem(self, floats: dict[str, tuple[int, ...]]) -> str:
        """How the centre differs from a model whose float tensors are ``floats``; empty if it fits."""
        if self.center is None:
            return ""
        problem = flat_state_difference(self.tensors, {"center": self.center}, floats)
        return f"centered clipping state: {problem}" if problem else ""

    def check_layout(self, layout: Mapping[str, TensorLayout]) -> None:
        """Refuse, at restore, a centre taken from a run of another model.

        Raises:
            ConfigError: naming the first tensor that differs.
        """
        _refuse_another_model(self.layout_problem(float_shapes(layout)), "centre belongs")


class CenteredClip(_Buffered):
    """Centered clipping (Karimireddy, He & Jaggi 2021, ICML, "Learning from History for Byzantine Robust
    Optimization", https://arxiv.org/abs/2012.10333, eq. (CC) and Algorithm 2).

    Starting from ``v⁰``, the previous round's aggregate, ``L`` iterations of::

        vˡ⁺¹ = vˡ + (1/n) Σᵢ clip_τ(xᵢ − vˡ),    clip_τ(u) = u · min(1, τ / ‖u‖)

    over the round's ``n`` updates; ``v^L`` is the aggregate and the next round's ``v⁰``. An update within ``τ``
    of the centre counts in full (``‖u‖ = τ`` exactly is not scaled), one farther away moves it by at most
    ``τ / n``, so ``f`` attackers move a round's aggregate at most ``L·f·τ / n`` from where the honest updates
    alone take it; ``τ = ∞`` is the plain mean after one iteration whatever ``v⁰``. The centre lives in
    :attr:`state` (:class:`CenteredClipState`), which server checkpoints and the service's snapshot carry: a
    restarted server continues from the centre it had. **The first round** (no centre yet, or a server that
    lost its snapshot) starts from ``v⁰ = 0``, where one iteration is the mean of the updates norm-bounded at
    ``τ`` (:class:`~deltaplane.aggregation.clipping.NormBound`); a later round starts from the last aggregate,
    the paper's momentum-like choice. Updates count equally (claimed weights are ignored), every sum runs in
    float64 in the senders' order (:func:`sender_order`). Valid over sparsifying codecs (not coordinate-wise).
    Holds all updates (O(clients × model), float32); while it iterates, only O(model) more: ``v`` in float64
    and one column block of the updates at a time (:attr:`block` columns, cast to float64), as
    :class:`GeometricMedian`. Each iteration walks the updates twice in column blocks: once summing the squared
    norms ``‖xᵢ − vˡ‖²`` over the blocks, once adding the blocks' clipped mean to ``v``; until 2026-12-07 it
    stacked the updates and held a float64 copy of them with float64 temporaries of its size (100 updates of
    1M values: 3.3 GB peak RSS; ``docs/aggregation.md``). The block sums round differently from one norm over a
    whole row, so the result is the stacked computation's to float rounding, not bit for bit (checked against it
    in ``tests/aggregation/test_rfa_centered_clip.py``).

    Args:
        tau: ``τ`` > 0, the clipping radius around the centre, in update-norm units (``math.inf``: no clipping).
            **3 by default**, chosen by measurement (``benchmarks/centered_clip_tau.py``, ``docs/benchmarks.md``,
            *Centered clipping: the radius τ under attack*): on the default federation τ = 3 kept FedAvg's
            accuracy without attackers (0.942, FedAvg 0.922) and had the best worst case over 20% sign flip,
            scaled sign flip and Gaussian attackers (0.861; τ = 10, the default until 2026-12-07: 0.755 under
            the scaled sign flip; τ = 30: 0.097; τ = 1 lost accuracy without attackers, 0.755). Choose it
            near the honest updates' distance from the last aggregate: a ``τ`` above every honest distance
            lets an attacker move a round by up to ``τ / n`` each; one below most honest distances clips
            honest updates too (the ``clipped`` measurement counts the updates clipped in a round).
        iterations: ``L`` ≥ 1, clipping iterations per round (the paper finds one enough when ``v⁰`` is the
            previous aggregate).
        state: the centre to resume from; fresh (first round from 0) when None.
    """

    def __init__(
        self, *, tau: float = DEFAULT_TAU, iterations: int = 1, state: CenteredClipState | None = None
    ) -> None:
        super().__init__()
        if isinstance(tau, bool) or not (isinstance(tau, int | float) and tau > 0 and not math.isnan(tau)):
            raise ConfigError(f"tau must be a positive number (math.inf: no clipping). Found {tau!r}")
        if isinstance(iterations, bool) or not (isinstance(iterations, int) and iterations >= 1):
            raise ConfigError(f"iterations must be a positive integer. Found {iterations!r}")
        self.tau = tau
        self.iterations = iterations
        if state is not None:
            state.check_state()
        self.state = state if state is not None else CenteredClipState()

    def _combine_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        floats = _round_floats(self._like, self.state, "centre belongs")
        n = len(rows)
        order = sender_order(self._senders) if len(self._senders) == n else list(range(n))
        rows = [rows[i] for i in order]  # the same tensors, in their senders' order (no copy)
        c = self.state.center
        v = c.clone() if c is not None else torch.zeros(rows[0].numel(), dtype=torch.float64)
        clipped = 0
        for _ in range(self.iterations):
            squares = torch.zeros(n, dtype=torch.float64)  # ‖xᵢ − vˡ‖², summed over the column blocks
            for cols, xb in _column_blocks(rows, self.block):
                squares += xb.sub_(v[cols]).square_().sum(dim=1)
            norms = squares.sqrt()
            far = norms > self.tau  # (never at ‖u‖ = 0, nor at τ = ∞)
            scale = torch.where(far, self.tau / norms.clamp_min(1e-300), torch.ones_like(norms))
            # vˡ⁺¹ = vˡ + mean of the clipped xᵢ − vˡ, block by block: a block's columns of v are read before
            # they are written, and no other block reads them, so v is updated in place
            for cols, xb in _column_blocks(rows, self.block):
                v[cols] += xb.sub_(v[cols]).mul_(scale[:, None]).mean(dim=0)
            clipped = int(far.sum())
        self.state.center, self.state.tensors = v, floats
        self._own = {"clipped": float(clipped), "center_norm": float(v.norm())}
        return v.float()

    def __repr__(self) -> str:
        return f"CenteredClip(tau={self.tau!r}, iterations={self.iterations!r})"


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``‖xᵢ − xⱼ‖²`` for the rows of ``x`` (n, d), in float64, by the Gram identity ``‖xᵢ‖² + ‖xⱼ‖² − 2xᵢ·xⱼ`` on
    rows centred at one of them (distances do not change under a shift).

    The identity's cancellation error is float64 ε times the rows' squared norms: uncentred, updates sharing
    a large common part (six of norm ~3·10⁵ about 0.05 apart) were scored by rounding noise, and Krum picked
    another update than the paper's distances do. Centred at the mean first, then at the row nearest the
    others (an honest one whenever attackers are far: a far attacker moves the mean, not that row), the error
    shrinks to the honest updates' spread. Differences computed one by one are exact but cost 3–10× the time
    of the matrix product (20 updates of 500k coordinates)."""
    xd = x.double()
    xd -= xd.mean(dim=0)
    xd -= xd[int(_gram_distances(xd).sum(dim=1).argmin())].clone()
    return _gram_distances(xd)


def _gram_distances(xd: torch.Tensor) -> torch.Tensor:
    sq = (xd * xd).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * xd @ xd.T).clamp_min(0.0)
    return 0.5 * (dist + dist.T)  # one value per pair, whichever side the product computed it from


class FLTrust:
    """FLTrust (Cao et al. 2021, https://arxiv.org/abs/2012.13995): trust bootstrapped from a server update.

    Before each round the server computes its own update ``g₀`` on a small clean root dataset and passes it to
    :meth:`set_reference`. Each client update ``gᵢ`` gets trust ``TSᵢ = ReLU(cos(gᵢ, g₀))`` and is rescaled to
    ``‖g₀‖``; the result is ``Σ TSᵢ · (‖g₀‖/‖gᵢ‖) gᵢ / Σ TSᵢ``. Because scores need only ``g₀``, this streams in
    O(model). If every client scores 0, the result is zero (nothing trusted, nothing applied).
    """

    streaming = True
    sparse_ok = True

    def __init__(self) -> None:
        self._ref: Delta | None = None
        self._ref_flat: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._trust = 0.0
        self._count = 0
        self._zero = 0
        self._own: dict[str, float] = {}
        self._counters = IntegerMedians()  # the trusted updates' integer tensors, not the reference's

    def set_reference(self, reference: Delta) -> None:
        """The server's trusted update ``g₀`` for this round (must be set before :meth:`add`)."""
        refuse_complex(reference, "FLTrust")
        reference.check_finite()
        flat = _row(reference).double()
        if float(flat.norm()) == 0.0:
            raise InvalidUpdate("the FLTrust reference update is zero; it cannot score client updates")
        self._ref, self._ref_flat = reference, flat

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        if self._ref is None or self._ref_flat is None:
            raise DeltaplaneError("FLTrust needs the server reference update: call set_reference() first")
        refuse_complex(delta, "FLTrust")
        delta.check_finite()
        check_compatible(self._ref, delta, "reference and client delta")
        g = _row(delta).double()
        gn, rn = float(g.norm()), float(self._ref_flat.norm())
        ts = max(0.0, float(g @ self._ref_flat) / (gn * rn)) if gn > 0 else 0.0
        if self._sum is None:
            self._sum = torch.zeros_like(self._ref_flat)
        if ts > 0:
            self._sum.add_(g, alpha=ts * rn / gn)
            self._counters.add(delta)
        else:
            self._zero += 1
        self._trust += ts
        self._count += 1

    def result(self) -> Delta:
        if self._ref is None or self._sum is None:
            raise TooFewUpdates("no client delta was added; nothing to aggregate")
        self._own = {"clients": float(self._count), "zero_trust": float(self._zero), "trust_sum": self._trust}
        flat = self._sum / self._trust if self._trust > 0 else torch.zeros_like(self._sum)
        return self._counters.apply(self._ref.unflatten(flat.float()))

    def reset(self) -> None:
        self._sum, self._trust, self._count, self._zero = None, 0.0, 0, 0
        self._ref, self._ref_flat = None, None
        self._counters.reset()

    @property
    def measurements(self) -> dict[str, float]:
        return self._own

    def __repr__(self) -> str:
        return "FLTrust()"


class FLAME(_Buffered):
    """FLAME (Nguyen et al. 2022, USENIX Security, https://arxiv.org/abs/2101.02281): cluster, clip, noise.

    1. **Filter**: HDBSCAN (scikit-learn's) over the pairwise cosine distances ``1 − cos(gᵢ, gⱼ)`` with
       ``min_cluster_size = ⌊n/2⌋ + 1``, so only a majority can form a cluster; the updates of that cluster are
       kept, every other one is dropped as an outlier. If HDBSCAN finds no majority cluster, every update is
       kept and ``flame_no_cluster`` says so.
    2. **Adaptive clipping**: ``S = median ‖gᵢ‖`` over all updates of the round; each kept update is scaled to
       norm at most ``S`` (a boosted update loses its boost).
    3. **Noise**: the mean of the kept updates gets ``N(0, (λ·S)²)`` per coordinate (``λ = noise``; the paper's
       image-classification setting is 0.001). The noise stream is seeded and continues across rounds.

    Holds all updates (O(clients × model)) and the n × n distance matrix.

    Args:
        noise: ``λ``, the noise std as a multiple of the clipping bound ``S`` (0: no noise).
        seed: seeds the noise.
    """

    def __init__(self, *, noise: float = 0.001, seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
            raise ConfigError(f"noise must be a finite non-negative number. Found {noise!r}")
        self.noise = noise
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self.kept: list[int] = []

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        from sklearn.cluster import HDBSCAN

        n = x.shape[0]
        xd = x.double()
        norms = xd.norm(dim=1)
        if n >= 3:
            unit = xd / norms.clamp_min(1e-30)[:, None]
            dist = (1.0 - unit @ unit.T).clamp_min(0.0).numpy()
            np.fill_diagonal(dist, 0.0)
            labels = HDBSCAN(
                min_cluster_size=n // 2 + 1,
                min_samples=1,
                metric="precomputed",
                allow_single_cluster=True,
                copy=True,
            ).fit_predict(dist)
            found = labels[labels >= 0]
            if found.size:
                majority = np.bincount(found).argmax()
                keep = np.flatnonzero(labels == majority)
            else:
                keep = np.arange(n)
        else:  # fewer than 3 updates cannot form a majority cluster against an outlier
            keep = np.arange(n)
        self.kept = [int(i) for i in keep]
        bound = float(norms.median())
        kept = xd[keep]
        kn = norms[keep]
        scale = torch.where(kn > bound, bound / kn.clamp_min(1e-30), torch.ones_like(kn))
        out = (kept * scale[:, None]).mean(dim=0)
        if self.noise > 0 and bound > 0:
            out += self.noise * bound * torch.randn(out.shape, generator=self._gen, dtype=out.dtype)
        self._own = {
            "flame_kept": float(len(keep)),
            "flame_bound": bound,
            "flame_no_cluster": float(len(keep) == n and n >= 3 and not (labels >= 0).any())
            if n >= 3
            else 0.0,
        }
        return out.float()

    def __repr__(self) -> str:
        return f"FLAME(noise={self.noise!r}, seed={self.seed!r})"


@dataclass
class FoolsGoldState:
    """FoolsGold's server-side memory: each client's running sum of every update it has sent (by client id).
    Kept apart from the rule so that it can be checkpointed and inspected."""

    history: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The float tensors (name -> shape) whose flattened values the histories hold, recorded at the first round:
    a history is one flat vector, so without them a restore could tell another model only by its length."""

    def check_state(self) -> None:
        """Refuse histories no run produces (a corrupted or hand-made snapshot): each is a finite, flat float64
        vector of the recorded tensors' length.

        Raises:
            ConfigError: naming the client.
        """
        for cid, h in self.history.items():
            if not (isinstance(h, torch.Tensor) and h.dtype == torch.float64 and h.dim() == 1):
                raise ConfigError(f"FoolsGold state: history[{cid!r}] must be a flat float64 tensor")
            if not bool(torch.isfinite(h).all()):
                raise ConfigError(f"FoolsGold state: history[{cid!r}] holds NaN or Inf")
        lengths = {h.numel() for h in self.history.values()}
        if self.tensors:
            lengths.add(sum(math.prod(shape) for shape in self.tensors.values()))
        if len(lengths) > 1:
            raise ConfigError(
                f"FoolsGold state: the client histories and the tensors they are of differ in length ({sorted(lengths)})"
            )

    def layout_problem(self, floats: dict[str, tuple[int, ...]]) -> str:
        """How the histories differ from a model whose float tensors are ``floats`` (name -> shape); empty if
        they fit (a state with no history fits any model)."""
        if not self.history:
            return ""
        histories = {f"history[{cid!r}]": h for cid, h in self.history.items()}
        problem = flat_state_difference(self.tensors, histories, floats)
        return f"FoolsGold state: {problem}" if problem else ""

    def check_layout(self, layout: Mapping[str, TensorLayout]) -> None:
        """Refuse client histories of another model at restore. They used to load, and the next round's close
        failed with a bare RuntimeError (a sum of vectors of two lengths) after a round of client training.

        Raises:
            ConfigError: naming the first tensor that differs (or the client, for a snapshot without the record).
        """
        _refuse_another_model(self.layout_problem(float_shapes(layout)), "client histories belong")


class FoolsGold(_Buffered):
    """FoolsGold (Fung et al. 2020, RAID, https://arxiv.org/abs/1808.04866): down-weight clients whose update
    *histories* look alike.

    Sybils pushing one poisoning objective (a backdoor) keep sending updates in a shared direction, while honest
    non-IID clients differ; summed over rounds the difference shows even when single updates are sparse (top-k
    payloads of different supports fill in over rounds). With ``cs`` the pairwise cosine similarity of this
    round's clients' histories (diagonal 0) and ``vᵢ = maxⱼ csᵢⱼ``: *pardoning* rescales
    ``csᵢⱼ ← csᵢⱼ · vᵢ / vⱼ`` when ``vᵢ < vⱼ``; ``αᵢ = 1 − maxⱼ csᵢⱼ`` clipped to [0, 1] and divided by its max
    (a max of 1 becomes 0.99); the logit ``αᵢ ← κ (ln(αᵢ / (1 − αᵢ)) + 0.5)`` clipped to [0, 1] is the client's
    weight — a per-client learning rate: the result is ``Σ αᵢ gᵢ / n`` over the round's ``n`` clients, as in
    the reference code (``DistributedML/FoolsGold``: ``Σ wv[c]·grad[c] / len(grads)``). Dividing by ``Σ αᵢ``
    instead, as this class once did, hands the whole step to whichever few clients keep a weight: without any
    attacker, on the default federation with top-k, FoolsGold leaves one client weighted from round 1 (every
    update shares the first descent direction, so all look alike), the unheard clients' error-feedback residuals
    keep growing in one shared direction, and the run collapsed to 0.326; with ``/ n`` it reaches 0.891.

    Needs each update's client id (:meth:`identify`, called by
    :class:`~deltaplane.aggregation.validation.Validate`); histories live in :attr:`state`
    (:class:`FoolsGoldState`). Holds all updates of the round plus one history per client seen.

    Args:
        confidence: ``κ``, the logit's confidence.
        centred: compare histories after subtracting their mean over the round's clients (not in the paper:
            honest histories share the global descent direction, which makes honest non-IID clients look alike
            as training goes on; centring leaves what sets each client apart, and sybils still share theirs).
        binary: give every client with a non-zero FoolsGold weight the weight 1 (not in the paper: the logit's
            partial weights down-weight honest non-IID clients, and with them their labels).
    """

    def __init__(
        self,
        *,
        confidence: float = 1.0,
        centred: bool = False,
        binary: bool = False,
        state: FoolsGoldState | None = None,
    ) -> None:
        super().__init__()
        for name, flag in (("centred", centred), ("binary", binary)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be true or false. Found {flag!r}")
        self.centred = centred
        self.binary = binary
        if not (isinstance(confidence, int | float) and math.isfinite(confidence) and confidence > 0):
            raise ConfigError(f"confidence must be positive. Found {confidence!r}")
        self.confidence = confidence
        self.state = state if state is not None else FoolsGoldState()
        self._ids: list[str] = []
        self.weights: list[float] = []

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        cid = self._next_id  # (super().add consumes it)
        if cid is None or cid in self._ids:
            self._next_id = None
            if cid is None:
                raise InvalidUpdate(
                    "FoolsGold needs the sender of every update: pass client_id to Validate.add"
                )
            raise InvalidUpdate(f"client {cid} sent two updates in one round")
        super().add(delta, weight)
        self._ids.append(cid)

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        floats = _round_floats(self._like, self.state, "client histories belong")
        self.state.tensors = floats
        hist = self.state.history
        for cid, row in zip(self._ids, x, strict=True):
            hist[cid] = hist[cid] + row.double() if cid in hist else row.double().clone()
        h = torch.stack([hist[cid] for cid in self._ids])
        if self.centred:  # compare what sets clients apart, not the descent direction they all share
            h = h - h.mean(dim=0)
        alpha = self._weights(h)
        if self.binary:  # keep FoolsGold's verdict (weight 0: a sybil), but count every other client fully
            alpha = (alpha > 0).double()
        self.weights = [float(a) for a in alpha]
        total = float(alpha.sum())
        self._own = {"foolsgold_weight_sum": total, "foolsgold_zero": float((alpha == 0).sum())}
        # Σ αᵢ gᵢ / n, as the reference code (a weight is a per-client learning rate): normalising by Σ αᵢ
        # instead hands the whole step to the few clients left with a weight, which collapsed a clean top-k run
        return ((alpha[:, None] * x.double()).sum(dim=0) / x.shape[0]).float()

    def _weights(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        if n == 1:
            return torch.ones(1, dtype=torch.float64)
        unit = h / h.norm(dim=1).clamp_min(1e-30)[:, None]
        cs = unit @ unit.T
        cs.fill_diagonal_(0.0)
        v = cs.max(dim=1).values
        pardon = v[:, None] < v[None, :]
        cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(1e-30), cs)
        alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
        if float(alpha.max()) == 0:
            return alpha
        alpha = alpha / alpha.max()
        alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
        with np.errstate(divide="ignore"):
            logit = self.confidence * (torch.log(alpha / (1.0 - alpha)) + 0.5)
        return torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)

    def reset(self) -> None:
        super().reset()
        self._ids, self._next_id = [], None

    def __repr__(self) -> str:
        return f"FoolsGold(confidence={self.confidence!r}, centred={self.centred!r}, binary={self.binary!r})"


class SignVote:
    """signSGD with majority vote (Bernstein et al. 2019, ICLR, https://arxiv.org/abs/1810.05291): the result is
    ``γ · sign(Σᵢ sign(gᵢ)) · vⱼ / n`` with ``γ`` the median over clients of each update's mean absolute value over
    its non-zero coordinates (a sign codec's decoded magnitude) and ``vⱼ`` the number of clients that voted on
    coordinate ``j`` (sent a non-zero value). A minority of attackers can flip a coordinate only where honest
    clients are split; every client's vote counts once, whatever its norm or claimed weight. Streaming: O(model)
    for the vote and the voter count plus one float per client.

    Valid with every codec: a sparsified update abstains where it sent nothing, and an abstention counts in the
    denominator as it does in a mean. With dense updates ``vⱼ = n`` and this is the paper's rule. Without the
    ``vⱼ / n`` factor a coordinate that one client of ``n`` sent moved by that client's full ``γ`` instead of
    ``γ / n``: over ``stc(0.002)`` (about 43 coordinates a client, rarely the same) that is an ``n``-fold step on
    almost every coordinate, and the default federation collapsed to chance (0.100) without any attacker."""

    streaming = True
    sparse_ok = True

    def __init__(self) -> None:
        self._votes: torch.Tensor | None = None
        self._voters: torch.Tensor | None = None
        self._like: Delta | None = None
        self._scales: list[float] = []
        self._own: dict[str, float] = {}
        self._counters = IntegerMedians()  # integer tensors get no vote: their lower median

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        like = _admit(self._like, delta, weight, type(self).__name__)
        g = _row(delta)
        self._like = like
        self._counters.add(delta)
        s = torch.sign(g)
        voted = s.abs()  # 0 where the client abstained (sent nothing)
        if self._votes is None or self._voters is None:
            self._votes, self._voters = s, voted
        else:
            self._votes, self._voters = self._votes + s, self._voters + voted
        nnz = int((g != 0).sum())
        self._scales.append(float(g.abs().sum()) / nnz if nnz else 0.0)

    def result(self) -> Delta:
        if self._like is None or self._votes is None or self._voters is None:
            raise TooFewUpdates("no client delta was added; nothing to aggregate")
        n = len(self._scales)
        gamma = float(np.median(self._scales))
        turnout = float(self._voters.sum()) / (n * self._voters.numel()) if self._voters.numel() else 0.0
        self._own = {"clients": float(n), "sign_scale": gamma, "turnout": turnout}
        return self._counters.apply(
            self._like.unflatten(gamma * torch.sign(self._votes) * (self._voters / n))
        )

    def reset(self) -> None:
        self._votes, self._voters, self._like, self._scales = None, None, None, []
        self._counters.reset()

    @property
    def measurements(self) -> dict[str, float]:
        return self._own

    def __repr__(self) -> str:
        return "SignVote()"
