"""Byzantine-robust aggregation: defences against poisoned client updates.

Statistical defences compare updates with each other, so they **must hold every update of the round**
(``streaming = False``, memory O(clients × model)): :class:`CoordinateMedian`, :class:`TrimmedMean`,
:class:`Krum`. Updates are kept flattened to one float32 vector each. Two defences stream in O(model):
:class:`~deltaplane.aggregation.clipping.NormBound` (clip each update's norm) and :class:`FLTrust` (score each
update against a trusted server update known before the round). These defences ignore client weights: a weight is
something an attacker can claim.
"""

from __future__ import annotations

import math

import torch

from deltaplane.aggregation.clipping import NormBound
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError, InvalidUpdate

__all__ = ["CoordinateMedian", "FLTrust", "Krum", "NormBound", "TrimmedMean"]


class _Buffered:
    """Holds the round's updates as rows of an (n, d) float32 matrix, built incrementally."""

    streaming = False
    _coordinatewise = False
    block = 1 << 16

    def __init__(self) -> None:
        self._like: Delta | None = None
        self._rows: list[torch.Tensor] = []
        self._own: dict[str, float] = {}

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InvalidUpdate(f"weight must be a finite non-negative number. Found {weight!r}")
        delta.check_finite()
        if self._like is None:
            self._like = delta
        else:
            check_compatible(self._like, delta, "aggregate and client delta")
        self._rows.append(delta.flatten())

    def result(self) -> Delta:
        if not self._rows or self._like is None:
            raise DeltaplaneError("no client delta was added; nothing to aggregate")
        if self._coordinatewise:
            # per-coordinate rules run on column blocks: sorting a block needs O(n · block) scratch, not
            # another O(n · d) for sorted values and int64 indices on top of the held updates
            d = self._rows[0].numel()
            out = torch.empty(d)
            for lo in range(0, d, self.block):
                hi = min(d, lo + self.block)
                out[lo:hi] = self._combine(torch.stack([r[lo:hi] for r in self._rows]))
            return self._like.unflatten(out)
        return self._like.unflatten(self._combine(torch.stack(self._rows)))

    def _combine(self, x: torch.Tensor) -> torch.Tensor:  # (n, d) -> (d,)
        raise NotImplementedError

    def reset(self) -> None:
        self._like, self._rows = None, []

    @property
    def measurements(self) -> dict[str, float]:
        return {"clients": float(len(self._rows)), **self._own}


class CoordinateMedian(_Buffered):
    """Coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498); mean of the two middle values
    for an even count. Holds all updates (O(clients × model))."""

    _coordinatewise = True

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = x.sort(dim=0).values
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def __repr__(self) -> str:
        return "CoordinateMedian()"


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean (Yin et al. 2018, https://arxiv.org/abs/1803.01498): per coordinate, drop the
    ``⌊beta·n⌋`` largest and smallest values and average the rest. Holds all updates (O(clients × model)).

    Args:
        beta: fraction trimmed from *each* end, in [0, 0.5).
    """

    _coordinatewise = True

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if not (isinstance(beta, int | float) and 0.0 <= beta < 0.5):
            raise ConfigError(f"beta must be in [0, 0.5). Found {beta!r}")
        self.beta = beta

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        k = math.floor(self.beta * n)
        if n - 2 * k < 1:
            raise DeltaplaneError(f"trimmed mean with beta={self.beta} leaves no update out of {n}")
        self._own = {"trimmed_per_side": float(k)}
        return x.sort(dim=0).values[k : n - k].mean(dim=0)

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta!r})"


class Krum(_Buffered):
    """Krum and multi-Krum (Blanchard et al. 2017, https://papers.nips.cc/paper/6617): score each update by the
    sum of squared distances to its ``n − f − 2`` nearest neighbours, keep the ``m`` best-scored and average
    them. ``m=1`` is Krum. Needs ``n > 2f + 2``. Holds all updates (O(clients × model)).

    Args:
        byzantine: ``f``, the number of malicious clients to tolerate.
        select: ``m``, how many updates to average (None: ``n − f``, the usual multi-Krum choice).
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

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        n, f = x.shape[0], self.byzantine
        if n <= 2 * f + 2:
            raise DeltaplaneError(
                f"Krum tolerating {f} byzantine clients needs more than {2 * f + 2}; got {n}"
            )
        xd = x.double()
        sq = (xd * xd).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * xd @ xd.T).clamp_min(0.0)
        dist.fill_diagonal_(math.inf)
        scores = dist.sort(dim=1).values[:, : n - f - 2].sum(dim=1)
        m = self.select if self.select is not None else n - f
        chosen = scores.argsort()[: min(m, n)]
        self.selected = sorted(int(i) for i in chosen)
        self._own = {"selected": float(len(self.selected))}
        return x[chosen].mean(dim=0)

    def __repr__(self) -> str:
        return f"Krum(byzantine={self.byzantine!r}, select={self.select!r})"


class FLTrust:
    """FLTrust (Cao et al. 2021, https://arxiv.org/abs/2012.13995): trust bootstrapped from a server update.

    Before each round the server computes its own update ``g₀`` on a small clean root dataset and passes it to
    :meth:`set_reference`. Each client update ``gᵢ`` gets trust ``TSᵢ = ReLU(cos(gᵢ, g₀))`` and is rescaled to
    ``‖g₀‖``; the result is ``Σ TSᵢ · (‖g₀‖/‖gᵢ‖) gᵢ / Σ TSᵢ``. Because scores need only ``g₀``, this streams in
    O(model). If every client scores 0, the result is zero (nothing trusted, nothing applied).
    """

    streaming = True

    def __init__(self) -> None:
        self._ref: Delta | None = None
        self._ref_flat: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._trust = 0.0
        self._count = 0
        self._zero = 0
        self._own: dict[str, float] = {}

    def set_reference(self, reference: Delta) -> None:
        """The server's trusted update ``g₀`` for this round (must be set before :meth:`add`)."""
        reference.check_finite()
        flat = reference.flatten().double()
        if float(flat.norm()) == 0.0:
            raise InvalidUpdate("the FLTrust reference update is zero; it cannot score client updates")
        self._ref, self._ref_flat = reference, flat

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        if self._ref is None or self._ref_flat is None:
            raise DeltaplaneError("FLTrust needs the server reference update: call set_reference() first")
        delta.check_finite()
        check_compatible(self._ref, delta, "reference and client delta")
        g = delta.flatten().double()
        gn, rn = float(g.norm()), float(self._ref_flat.norm())
        ts = max(0.0, float(g @ self._ref_flat) / (gn * rn)) if gn > 0 else 0.0
        if self._sum is None:
            self._sum = torch.zeros_like(self._ref_flat)
        if ts > 0:
            self._sum.add_(g, alpha=ts * rn / gn)
        else:
            self._zero += 1
        self._trust += ts
        self._count += 1

    def result(self) -> Delta:
        if self._ref is None or self._sum is None:
            raise DeltaplaneError("no client delta was added; nothing to aggregate")
        self._own = {"clients": float(self._count), "zero_trust": float(self._zero), "trust_sum": self._trust}
        flat = self._sum / self._trust if self._trust > 0 else torch.zeros_like(self._sum)
        return self._ref.unflatten(flat.float())

    def reset(self) -> None:
        self._sum, self._trust, self._count, self._zero = None, 0.0, 0, 0
        self._ref, self._ref_flat = None, None

    @property
    def measurements(self) -> dict[str, float]:
        return self._own

    def __repr__(self) -> str:
        return "FLTrust()"
