"""An early warning when a run diverges: the global model's test loss turns non-finite or rises well above the
initial model's.

``deltaplane run``'s "learned nothing" warning reads test accuracy and waits for 5 rounds (a shorter run at
chance may not have learned yet). A run whose learning rate is too large for its task (an MSE head at the
default lr 0.2) can end below chance within 2 rounds, which accuracy alone does not tell from a slow start;
its loss does: it is NaN or Inf, or several times the untrained model's. Every driver builds a
:class:`DivergenceWatch` from the initial state and checks each round's global state; the first divergent
round raises one :class:`DivergenceWarning` naming the round, the loss and the fix. It records nothing: a
healthy run's figures are the same with or without it.

A driver that scores the global model on the test set every round anyway hands the watch that loss instead
(:meth:`DivergenceWatch.check_loss` or :meth:`DivergenceWatch.take`, with ``samples=None``): no forward pass of
the watch's own in the round. The in-process simulator (:func:`~deltaplane.engine.metrics.score_round` with the
task's loss; where a forked worker scores the round, ``threads=2``, none on the caller's critical path at all),
the HTTP simulation and the Flower driver (:func:`~deltaplane.engine.metrics.round_scores`) and the population
engine (:func:`~deltaplane.engine.metrics.accuracy_and_loss`) do. The fleet coordinator scores no test set (it
registers each version's predictions on the drift reference's data): its watch runs its own forward pass on at
most :data:`SAMPLES` test samples of each version it fetches (:meth:`DivergenceWatch.check`).
"""

from __future__ import annotations

import math
import warnings

import torch

from deltaplane.delta import StateDict
from deltaplane.engine.config import RunConfig
from deltaplane.engine.metrics import TEST_LOSS, logits
from deltaplane.engine.task import Task
from deltaplane.errors import ConfigError

__all__ = ["RISE", "SAMPLES", "DivergenceWarning", "DivergenceWatch"]

#: A test loss above this multiple of the initial model's has diverged, not merely wobbled: a healthy run's
#: loss falls from the start (the breast-cancer MLP's cross-entropy 0.69 → 0.1, DP-noised digits stay under
#: the initial 2.30), a diverging one leaves it by orders of magnitude within a round or two.
RISE = 3.0
#: The watch scores at most this many test samples (the test set's first ones): a bounded cost a round.
SAMPLES = 1024


class DivergenceWarning(UserWarning):
    """A run's global model diverged (test loss non-finite or :data:`RISE` times the initial loss)."""


class DivergenceWatch:
    """Watches a run's global model for divergence, round by round (see the module).

    Args:
        task: the run's task (its model builder, loss and test set).
        initial: the global model of version 0; None: the first state :meth:`check` sees (a coordinator that
            starts on a version the service already serves).
        config: the run's configuration: its learning rate is named in the advice, and its DP noise, if any, as
            the other cause (noise large against the weights raises the loss without any divergence of SGD).
        samples: how many of the test set's first samples the watch scores; None: all of them, as a driver's
            per-round scoring does when it hands :meth:`check_loss` its test loss (the initial on the same ones).
    """

    def __init__(
        self, task: Task, initial: StateDict | None, *, config: RunConfig, samples: int | None = SAMPLES
    ) -> None:
        self._model = task.build_model(0)  # scratch: every check loads the state it scores
        self._x, self._y = task.test.x[:samples], task.test.y[:samples]
        self._loss = task.loss
        self._lr = config.lr
        self._noised = config.dp_noise > 0 or config.local_dp_noise > 0
        self.initial: float | None = self.loss(initial) if initial is not None else None
        #: the warning given (once a run), or None
        self.warned: str | None = None

    @torch.no_grad()
    def loss(self, state: StateDict) -> float:
        """The task's mean loss of ``state`` on the watched test samples (NaN for an empty test set)."""
        if len(self._y) == 0:
            return math.nan
        self._model.load_state_dict(state)
        self._model.eval()
        # the logits the round's scoring computes (metrics.logits), so a loss handed to check_loss and this
        # one are the same up to float rounding
        return float(self._loss(logits(self._model, self._x), self._y))

    def check(self, rnd: int, state: StateDict, *, where: str | None = None) -> str | None:
        """Warn (:class:`DivergenceWarning`, once a run) if round ``rnd``'s global ``state`` diverged; return
        the warning's text, else None. ``where`` names the state in the text instead of ``round {rnd}``."""
        if self.initial is None:
            self.initial = self.loss(state)
            return None
        if not self._watching():
            return None
        return self._judge(rnd, self.loss(state), where, stacklevel=3)

    def diverged(self, rnd: int, state: StateDict, *, where: str | None = None) -> bool:
        """Whether round ``rnd``'s global ``state`` diverged, judged on every state, not only up to the first
        that did: the fleet coordinator stores this verdict with each version it publishes, so the Fleet page
        marks every diverging version. Warns as :meth:`check` does, once a run. The first state of a watch
        without an initial model is its initial model (not diverged)."""
        if self.initial is None:
            self.initial = self.loss(state)
            return False
        if not math.isfinite(self.initial) or len(self._y) == 0:
            return False
        value = self.loss(state)
        if self._holds(value):
            return False
        if self.warned is None:
            self._judge(rnd, value, where, stacklevel=3)
        return True

    def check_loss(self, rnd: int, value: float) -> str | None:
        """:meth:`check` of a test loss the driver computed (the task's loss of round ``rnd``'s global model
        on the watched samples: :data:`~deltaplane.engine.metrics.TEST_LOSS` from a scoring of the whole test
        set, with ``samples=None``), without a forward pass of the watch's own."""
        if not self._watching():
            return None
        return self._judge(rnd, value, None, stacklevel=3)

    def take(self, rnd: int, scores: dict[str, float]) -> dict[str, float]:
        """:meth:`check_loss` of the test loss in a round's ``scores`` (under
        :data:`~deltaplane.engine.metrics.TEST_LOSS`, as :func:`~deltaplane.engine.metrics.round_scores` given
        the task's loss returns it), and the scores without it: the round's metrics, which record no loss.

        Raises:
            ConfigError: ``scores`` hold no test loss (scored without the task's loss).
        """
        if TEST_LOSS not in scores:
            raise ConfigError(
                f"round {rnd}: the scores hold no {TEST_LOSS!r}; score the round with the task's loss "
                "(round_scores(..., loss=task.loss))"
            )
        rest = {k: v for k, v in scores.items() if k != TEST_LOSS}
        if self._watching():
            self._judge(rnd, scores[TEST_LOSS], None, stacklevel=3)
        return rest

    def _watching(self) -> bool:
        """Whether a round's loss can still warn: not yet warned, a finite initial loss, samples to score."""
        return (
            self.warned is None
            and self.initial is not None
            and math.isfinite(self.initial)
            and len(self._y) > 0
        )

    def _holds(self, value: float) -> bool:
        """Whether a test loss ``value`` has not diverged: finite, at most :data:`RISE` times the initial."""
        assert self.initial is not None
        return math.isfinite(value) and value <= RISE * self.initial

    def _judge(self, rnd: int, value: float, where: str | None, *, stacklevel: int) -> str | None:
        """Warn if round ``rnd``'s test loss ``value`` diverged (see :meth:`check`); ``stacklevel`` points the
        warning at the driver's call."""
        assert self.initial is not None
        if self._holds(value):
            return None
        how = (
            f"is {value}"
            if not math.isfinite(value)
            else f"rose to {value:.4g}, {value / self.initial:.1f}× the initial model's {self.initial:.4g}"
        )
        self.warned = (
            f"{where or f'round {rnd}'}: the global model's test loss {how}: training diverged. Try a smaller learning rate "
            f"(now {self._lr:g}; in a run config: clients: {{lr: ...}}), e.g. a quarter of it"
        )
        if self._noised:
            self.warned += (
                "; or the DP noise is large against the model's weights (noise per value z·clip/devices): more "
                "devices a round, a smaller noise multiplier (a larger ε) or a smaller clip"
            )
        warnings.warn(self.warned, DivergenceWarning, stacklevel=stacklevel)
        return self.warned
