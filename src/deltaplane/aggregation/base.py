"""The streaming :class:`Aggregator` protocol: add client deltas one at a time, read one result.

Memory is O(model), never O(clients × model): aggregators keep running sums, so a server can fold in
thousands of client updates. Wrappers (clipping, DP, server optimizers, validation) hold an inner aggregator and
delegate, in the style of TensorFlow Federated's aggregation factories
(https://github.com/tensorflow/federated/tree/main/tensorflow_federated/python/aggregators), so
``DPFedAvg(Clip(FedAvg(), clip=1.0), noise_multiplier=1.0)`` reads inside-out like the math.

Every aggregator exposes ``measurements``: a flat ``dict[str, float]`` describing the last round (clipped
fraction, noise std, epsilon...). Wrappers merge their inner aggregator's measurements with their own, so the
outermost object reports everything — measurements are data, never log lines to scrape.

Aggregators that must hold every update of a round (coordinate-wise median, trimmed mean, Krum) set
``streaming = False``; their memory is O(clients × model) and they say so.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from deltaplane.delta import Delta
from deltaplane.errors import InvalidUpdate

__all__ = ["Aggregator", "AggregatorWrapper", "find_in_chain", "refuse_complex"]


def refuse_complex(delta: Delta, rule: str) -> None:
    """Raise :class:`InvalidUpdate` naming the first complex tensor of ``delta``: the aggregation rules sum,
    sort and compare real values (a median or a sign of a complex number is not defined), so ``rule`` refuses
    the update rather than mangling or dropping its imaginary part. Every rule's input check calls this."""
    bad = next((k for k, v in delta.items() if v.is_complex()), None)
    if bad is not None:
        raise InvalidUpdate(
            f"tensor '{bad}' is {str(delta[bad].dtype).removeprefix('torch.')}: {rule} aggregates real tensors "
            "only; send the real and imaginary parts as two real tensors (torch.view_as_real)"
        )


@runtime_checkable
class Aggregator(Protocol):
    """Combines many client deltas into one global delta, streaming."""

    def add(self, delta: Delta, weight: float = 1.0) -> bool | None:
        """Fold in one client's delta with a non-negative weight (e.g. its number of samples).

        Returns None, or (an aggregator that may refuse an update: :class:`~deltaplane.aggregation.Validate`)
        whether it was accepted."""
        ...

    def result(self) -> Delta:
        """The aggregate of everything added since the last :meth:`reset`."""
        ...

    def reset(self) -> None:
        """Forget the added deltas (start a new round); learned server state, if any, is kept."""
        ...


class AggregatorWrapper:
    """Base of aggregators that wrap an inner one.

    A wrapper transforms what goes in (:meth:`add`) and/or what comes out (:meth:`_finish`). :meth:`result` is
    computed once per round and cached until :meth:`reset`, so stateful steps (a server optimizer update, an
    adaptive clip update, spending privacy budget, drawing noise) happen exactly once per round however often
    the result is read.
    """

    def __init__(self, inner: Aggregator) -> None:
        if not isinstance(inner, Aggregator):
            raise TypeError(f"inner must be an Aggregator (add/result/reset), got {type(inner).__name__}")
        self.inner = inner
        self._own: dict[str, float] = {}
        self._result: Delta | None = None

    @property
    def streaming(self) -> bool:
        """A wrapper streams exactly when the aggregator it wraps does."""
        return bool(getattr(self.inner, "streaming", True))

    @property
    def measurements(self) -> dict[str, float]:
        """Measurements of the last round: the inner aggregator's, then this wrapper's own."""
        return {**getattr(self.inner, "measurements", {}), **self._own}

    def add(self, delta: Delta, weight: float = 1.0) -> bool | None:
        self.inner.add(delta, weight)
        return None

    def result(self) -> Delta:
        if self._result is None:
            self._result = self._finish()
        return self._result

    def _finish(self) -> Delta:
        return self.inner.result()

    def reset(self) -> None:
        self.inner.reset()
        self._result = None

    def find(self, kind: type) -> object | None:
        """The first aggregator of type ``kind`` in this chain (self included), or None."""
        return find_in_chain(self, kind)


def find_in_chain(aggregator: object, kind: type) -> object | None:
    """The first aggregator of type ``kind`` in ``aggregator``'s chain (itself, then each ``inner`` in turn), or
    None: :meth:`AggregatorWrapper.find` for any aggregator, a bare rule (which has no ``find``) included."""
    node: object = aggregator
    while node is not None:
        if isinstance(node, kind):
            return node
        node = getattr(node, "inner", None)
    return None
