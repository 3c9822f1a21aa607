"""The errors of the secure aggregation protocol (both are :class:`~deltaplane.errors.DeltaplaneError`)."""

from __future__ import annotations

from deltaplane.errors import DeltaplaneError

__all__ = ["SecAggError", "SecAggOrderError"]


class SecAggError(DeltaplaneError, RuntimeError):
    """The secure aggregation protocol cannot go on (too few clients left, a refused request)."""


class SecAggOrderError(SecAggError):
    """A message arrived at the wrong stage: too early, late (its stage is closed), twice, from a client that
    is not part of the stage, or for another round. The message is refused and the protocol state is unchanged.

    ``stage`` names the stage the receiver is in, so a transport can say what to do instead.
    """

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage
