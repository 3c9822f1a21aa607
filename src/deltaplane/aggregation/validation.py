"""Validation of incoming client updates: one bad client never poisons or aborts a round.

Every update is checked *before* it touches the running aggregate — layout (names, shapes, dtypes) against the
model, finite values, the base model version it was computed against, and its L2 norm against a bound. A bad
update is rejected with a typed error (:class:`~deltaplane.errors.ShapeMismatch`,
:class:`~deltaplane.errors.InvalidUpdate`, :class:`~deltaplane.errors.VersionMismatch`), logged on the
``deltaplane.aggregation`` logger and recorded as data in :attr:`Validate.rejections` (failures as data, like
Flower's ``failures`` list); the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.delta import Delta, StateDict, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError, InvalidUpdate, VersionMismatch

__all__ = ["Rejection", "Validate", "validate_update"]

log = logging.getLogger("deltaplane.aggregation")

ON_INVALID = ("skip", "raise")


def validate_update(
    delta: object,
    *,
    like: StateDict | None = None,
    weight: float = 1.0,
    base_version: str | int | None = None,
    expected_version: str | int | None = None,
    max_norm: float | None = None,
) -> Delta:
    """Check one client update and return it; raise a typed error saying what is wrong.

    Args:
        delta: the update; must be a :class:`Delta`.
        like: the model (or a reference delta) whose names, shapes and dtypes the update must have.
        weight: the client's aggregation weight; must be finite and non-negative.
        base_version: the model version the client trained from (e.g. from the wire header).
        expected_version: the version this round was sent out with; a different (or missing) base is refused.
        max_norm: largest acceptable L2 norm (an update far larger than its peers is a fault or an attack).
    """
    if not isinstance(delta, Delta):
        raise InvalidUpdate(f"an update must be a deltaplane.Delta, got {type(delta).__name__}")
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise InvalidUpdate(f"weight must be a finite non-negative number. Found {weight!r}")
    if expected_version is not None and str(base_version) != str(expected_version):
        raise VersionMismatch(
            f"update was computed against base version {base_version!r}, but this round aggregates updates "
            f"to version {expected_version!r}; the client must fetch the current model"
        )
    if like is not None:
        check_compatible(like, delta, "model and client update")
    delta.check_finite()
    if max_norm is not None:
        norm = delta.norm()
        if norm > max_norm:
            raise InvalidUpdate(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}; refusing it")
    return delta


@dataclass(frozen=True)
class Rejection:
    """One refused update: who sent it and the typed error saying why."""

    client_id: str | None
    error: DeltaplaneError


class Validate(AggregatorWrapper):
    """Check every update before it reaches the inner aggregator; skip (or raise on) bad ones.

    Args:
        inner: the aggregator that receives accepted updates.
        like: layout the updates must have; the first accepted update sets it when None.
        expected_version: base model version of the round; updates must declare it in :meth:`add`.
        max_norm: largest acceptable update norm.
        on_invalid: ``"skip"`` (log, record in :attr:`rejections`, go on) or ``"raise"`` (log, record, raise).

    Measurements: ``accepted`` and ``rejected`` counts of the round.

    Example:
        >>> import math, torch, deltaplane as dp
        >>> agg = dp.Validate(dp.FedAvg(), max_norm=10.0)
        >>> agg.add(dp.Delta({"w": torch.ones(2)}), client_id="a")
        True
        >>> agg.add(dp.Delta({"w": torch.tensor([math.nan, 0.0])}), client_id="b")
        False
        >>> agg.result()["w"].tolist(), [r.client_id for r in agg.rejections]
        ([1.0, 1.0], ['b'])
    """

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        like: StateDict | None = None,
        expected_version: str | int | None = None,
        max_norm: float | None = None,
        on_invalid: str = "skip",
    ) -> None:
        from deltaplane.aggregation.fedavg import FedAvg

        super().__init__(inner if inner is not None else FedAvg())
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"max_norm must be positive. Found {max_norm!r}")
        if on_invalid not in ON_INVALID:
            raise ConfigError(f"on_invalid must be one of {ON_INVALID}. Found {on_invalid!r}")
        self.like = like
        self.expected_version = expected_version
        self.max_norm = max_norm
        self.on_invalid = on_invalid
        self.rejections: list[Rejection] = []
        self._like = like
        self._accepted = 0
        # a rule that keeps per-client history (FoolsGold) is told who sent the update it receives next
        node: object = self.inner
        self._identify = None
        while node is not None and self._identify is None:
            self._identify = getattr(node, "identify", None)
            node = getattr(node, "inner", None)

    def add(
        self,
        delta: Delta,
        weight: float = 1.0,
        *,
        base_version: str | int | None = None,
        client_id: str | None = None,
    ) -> bool:
        """Validate and fold in one update; True if accepted, False if skipped."""
        try:
            validate_update(
                delta,
                like=self._like,
                weight=weight,
                base_version=base_version,
                expected_version=self.expected_version,
                max_norm=self.max_norm,
            )
            if self._identify is not None:
                self._identify(client_id)
            self.inner.add(delta, weight)
        except DeltaplaneError as exc:
            log.warning("rejected update from client %s: %s: %s", client_id, type(exc).__name__, exc)
            self.rejections.append(Rejection(client_id, exc))
            if self.on_invalid == "raise":
                raise
            return False
        if self._like is None:
            self._like = delta
        self._accepted += 1
        return True

    def _finish(self) -> Delta:
        self._own = {"accepted": float(self._accepted), "rejected": float(len(self.rejections))}
        return self.inner.result()

    def reset(self) -> None:
        super().reset()
        self.rejections = []
        self._accepted = 0
        self._like = self.like

    def __repr__(self) -> str:
        return f"Validate({self.inner!r}, expected_version={self.expected_version!r}, max_norm={self.max_norm!r})"
