"""The digits CNN lives in :mod:`deltaplane.data.models` and scoring in :mod:`deltaplane.engine.metrics`;
re-exported here for the simulator's users."""

from deltaplane.data.models import DigitsCNN, build_model
from deltaplane.engine.metrics import accuracy, logits

__all__ = ["DigitsCNN", "accuracy", "build_model", "logits"]
