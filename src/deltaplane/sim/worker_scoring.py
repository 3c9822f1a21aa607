"""Scoring a round's global model in a forked training worker, in the time it would otherwise idle.

With a second share of training in a forked worker (``threads=2``, :class:`~deltaplane.sim.batched.BatchedTrainer`)
the batched simulator starts round r+1's training as soon as round r's model exists. The worker then trains its
share and waits while this process encodes and delivers the worker's updates, closes round r+1 and sends the
next job: about 7 ms a round on the default workload (docs/sim-speed.md). Scoring round r's model (test set
and every device's held-out data, ~3.5 ms) fits in that wait, so the worker does it there, after its share,
instead of this process before its own share: this process's round is shorter by the scoring and the worker's
otherwise idle time is used. The scores are the same bits as scored here (the same functions and data, one
torch thread in both processes); they arrive a round later, so the run reports each round's metrics once the
next round has closed. Rounds that ``RunConfig.client_eval_every`` leaves unscored score the test set only.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine.metrics import score_round
from deltaplane.engine.scoring import backdoor_success
from deltaplane.engine.task import Loss
from deltaplane.sim.batched import BatchedTrainer
from deltaplane.sim.forked_workers import ForkContexts

__all__ = ["WorkerScoring"]

#: What each run's forked worker scores with (a copy of the model, the test set, the devices).
_CONTEXT = ForkContexts("scoring")


def _score_forked(key: int, state: dict[str, np.ndarray], scored: bool) -> dict[str, float | None]:
    """:func:`~deltaplane.engine.metrics.score_round` and the backdoor's success
    (:func:`~deltaplane.engine.scoring.backdoor_success`, ``None`` without a backdoor) in a forked worker, with
    the context it inherited at the fork; the devices' held-out data only where ``scored`` (else their fields
    are NaN, as in the caller: ``RunConfig.client_eval_every``)."""
    model, test, clients, target, loss = _CONTEXT.of(key)
    scores: dict[str, float | None] = dict(
        score_round(
            model,
            {k: torch.from_numpy(v) for k, v in state.items()},
            test,
            clients if scored else [],
            loss=loss,
        )
    )
    scores["backdoor_success"] = backdoor_success(model, test, target)
    return scores


class WorkerScoring:
    """Round scores computed by ``trainer``'s forked worker (see the module's docstring).

    Create it before the trainer's first :meth:`~deltaplane.sim.batched.BatchedTrainer.start` (the fork) and
    :meth:`close` it after the run. The devices' held-out data must not change during the run (the worker
    holds their copy from the fork); neither an attack (which poisons a copy of a device's training data)
    nor α-mix / Ditto (which adapt a device's personal state, scored by the caller) changes it.
    ``backdoor_target``: the class a backdoor attack aims at, whose success the worker scores too
    (:func:`~deltaplane.engine.scoring.backdoor_success`); ``None`` without one. ``loss``: the task's loss,
    whose value on the test set the scores carry too (:data:`~deltaplane.engine.metrics.TEST_LOSS`, for the
    run's divergence watch); ``None``: none.
    """

    def __init__(
        self,
        trainer: BatchedTrainer,
        model: nn.Module,
        test: Dataset,
        clients: list[Any],
        *,
        backdoor_target: int | None = None,
        loss: Loss | None = None,
    ) -> None:
        self._trainer = trainer
        # a copy: in the worker, the trainer's own model (whose weights a forward may read) stays untouched
        self._key = _CONTEXT.register(trainer, (copy.deepcopy(model), test, clients, backdoor_target, loss))

    def submit(self, state: dict[str, Tensor], *, clients: bool = True) -> Future | None:
        """Score the global model ``state`` in the worker once it has done the jobs already sent to it (the
        next round's share: send that first), on the test set and, with ``clients``, on every device's held-out
        data; ``None`` where the trainer has no forked worker."""
        arrays = {k: v.detach().numpy() for k, v in state.items()}  # numpy crosses the pipe by value
        return self._trainer.run_in_worker(_score_forked, self._key, arrays, clients)

    def close(self) -> None:
        """Forget the run's context (the worker keeps its copy until the trainer stops it)."""
        _CONTEXT.forget(self._key)
