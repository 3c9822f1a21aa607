"""FedAvg: the sample-weighted mean of client deltas (McMahan et al. 2017, https://arxiv.org/abs/1602.05629)."""

from __future__ import annotations

import math

import torch

from deltaplane.aggregation.base import refuse_complex
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import InvalidUpdate, TooFewUpdates

__all__ = ["FedAvg"]

_FLOAT64_MAX = torch.finfo(torch.float64).max


def _peak(delta: Delta) -> float:
    """A bound on ``max |Δ|``: measured for float64 tensors, the largest finite value of the dtype for the other
    floating-point ones (float32, float16 and bfloat16 values cannot come near overflowing a float64 sum), and
    measured for the rest (integer buffers, usually a few values)."""
    peak = 0.0
    for v in delta.values():
        if not v.numel():
            continue
        if v.is_floating_point() and v.dtype != torch.float64:
            peak = max(peak, float(torch.finfo(v.dtype).max))
        elif v.dtype == torch.bool:
            peak = max(peak, 1.0)
        else:
            peak = max(peak, float(v.detach().abs().max()))
    return peak


class FedAvg:
    """Weighted mean ``Σ wᵢ·Δᵢ / Σ wᵢ`` kept as a running float64 sum (memory O(model), order-independent
    to within float64 rounding).

    Example:
        >>> import torch, deltaplane as dp
        >>> agg = dp.FedAvg()
        >>> agg.add(dp.Delta({"w": torch.tensor([1.0])}), weight=1)
        >>> agg.add(dp.Delta({"w": torch.tensor([4.0])}), weight=2)
        >>> agg.result()["w"].item()
        3.0
    """

    streaming = True

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self._like: Delta | None = None
        self._total = 0.0
        self._bound = 0.0  # Σ wᵢ·maxⱼ|Δᵢⱼ| (by dtype, below): no running sum can exceed it
        self.count = 0

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InvalidUpdate(f"weight must be a finite non-negative number. Found {weight!r}")
        refuse_complex(delta, "FedAvg")
        delta.check_finite()
        if self._like is not None:
            check_compatible(self._like, delta, "aggregate and client delta")
        bound = self._bound + float(weight) * _peak(delta)
        if not (bound < _FLOAT64_MAX and self._total + float(weight) < _FLOAT64_MAX):
            # a finite weight times finite values can still overflow the float64 sums: the mean would be ±inf or
            # NaN (inf/inf). Refused before it touches them, so the round goes on with the others
            raise InvalidUpdate(
                f"weight {float(weight):.3g} times this update's values would overflow the float64 sum; "
                "refusing the update"
            )
        if self._sum is None:
            self._like = delta
            self._sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in delta.items()}
        if self._sum:  # (an update of no tensors has nothing to add)
            # one multi-tensor add, each float32 value promoted into its float64 sum (no float64 temporaries)
            torch._foreach_add_(
                [self._sum[k] for k in delta], [v.detach() for v in delta.values()], alpha=float(weight)
            )
        self._total += float(weight)
        self._bound = bound
        self.count += 1

    def result(self) -> Delta:
        if self._sum is None or self._like is None:
            raise TooFewUpdates("no client delta was added; nothing to aggregate")
        if self._total <= 0:
            raise TooFewUpdates("the weights of the added deltas sum to zero; nothing to average")
        return Delta({k: self._mean(s, self._like[k].dtype) for k, s in self._sum.items()})

    def _mean(self, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The float64 sum over the total weight, in ``dtype``: integer tensors (a counter such as BatchNorm's
        ``num_batches_tracked`` delta) rounded to the nearest integer (half to even, as numpy's ``rint``); a bare
        cast truncated toward zero, so clients that ran 2, 2 and 3 batches counted 2."""
        mean = total / self._total
        return (mean if dtype.is_floating_point else mean.round()).to(dtype)

    def reset(self) -> None:
        self._sum, self._like, self._total, self._bound, self.count = None, None, 0.0, 0.0, 0

    @property
    def measurements(self) -> dict[str, float]:
        """Clients folded in and their total weight since the last reset."""
        return {"clients": float(self.count), "total_weight": self._total}

    def __repr__(self) -> str:
        return "FedAvg()"
