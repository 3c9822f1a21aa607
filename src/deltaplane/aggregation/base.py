"""The streaming :class:`Aggregator` protocol: add client deltas one at a time, read one result.

Memory is O(model), never O(clients × model): aggregators keep running sums, so a server can fold in
thousands of client updates. Wrappers (clipping, DP, server optimizers) hold an inner aggregator and delegate,
in the style of TensorFlow Federated's aggregation factories.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from deltaplane.delta import Delta

__all__ = ["Aggregator"]


@runtime_checkable
class Aggregator(Protocol):
    """Combines many client deltas into one global delta, streaming."""

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        """Fold in one client's delta with a non-negative weight (e.g. its number of samples)."""
        ...

    def result(self) -> Delta:
        """The aggregate of everything added since the last :meth:`reset`."""
        ...

    def reset(self) -> None:
        """Forget the added deltas (start a new round); learned server state, if any, is kept."""
        ...
