"""Integer tensors of client updates under robust rules: their coordinate-wise lower median.

A model's integer buffers (BatchNorm's ``num_batches_tracked``, a step counter) travel in its deltas as the change
the client made, raw (no codec touches them), and :meth:`~deltaplane.delta.Delta.apply` adds them as they are.
Robust rules compare updates on their floating-point tensors only — norms, distances, signs and trust scores are
taken over :meth:`~deltaplane.delta.Delta.flatten` — so an integer tensor escapes every check a rule makes. Taken
from one update (the first to arrive, or the server's reference) it is a value that update's sender chose and
that depends on arrival order; averaged, one client claiming 10⁹ batches moves it by 10⁹/n. The lower median of
the updates' integer tensors is an integer, does not depend on the order they arrived in, and stays between
honest values while fewer than half the updates lie: a count is not something one device decides.
"""

from __future__ import annotations

import torch

from deltaplane.delta import Delta

__all__ = ["IntegerMedians"]


class IntegerMedians:
    """Each admitted update's integer tensors, by name; :meth:`apply` puts their lower medians into a result.

    Memory: one copy of every update's integer tensors (a few values per model), whatever the rule streams.
    """

    def __init__(self) -> None:
        self.held: dict[str, list[torch.Tensor]] = {}

    def add(self, delta: Delta) -> None:
        """Keep ``delta``'s integer tensors (call it once the rule has admitted the update)."""
        for k, v in delta.items():
            if not v.is_floating_point():
                self.held.setdefault(k, []).append(v.detach())

    def apply(self, out: Delta) -> Delta:
        """``out`` with each integer tensor replaced by the coordinate-wise lower median of the held ones (zeros
        where nothing was held: no update counted, nothing to apply)."""
        if not any(not v.is_floating_point() for v in out.values()):
            return out
        return Delta({k: v if v.is_floating_point() else self._median(k, v) for k, v in out.items()})

    def _median(self, name: str, like: torch.Tensor) -> torch.Tensor:
        held = self.held.get(name)
        if not held:
            return torch.zeros_like(like)
        # int64 for the order statistic (torch has no median of bools), then back to the tensor's dtype
        return torch.stack(held).to(torch.int64).median(dim=0).values.to(like.dtype)

    def reset(self) -> None:
        self.held = {}
