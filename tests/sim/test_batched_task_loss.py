"""The batched and population engines and a task's own loss: the stacked step weighs one loss value per sample
(``reduction="none"``) and, without ``forward_stacked``, computes it under ``torch.func.vmap``. A loss that the
sequential loop trains with (it takes the mean only) but that returns several values per sample or calls what
vmap cannot (``F.one_hot``) raised a bare ``RuntimeError`` in round 1 on both engines (``deltaplane run``'s
default engine is batched). Now the batched engine trains such a task one device at a time, with the reason
in a warning, and the population engine refuses it before the run."""

from __future__ import annotations

import pytest
import torch
from tests.batched_fallback import batched_falls_back, population_refuses
from torch import Tensor, nn

from deltaplane.data.models import build_model
from deltaplane.engine import make_task
from deltaplane.sim import RunConfig
from deltaplane.sim.batched import loss_blocker


def _one_hot_mse(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error against one-hot targets: ``F.one_hot`` reads its input's values, which vmap refuses."""
    return nn.functional.mse_loss(logits, nn.functional.one_hot(y, 10).float(), reduction=reduction)


def _per_logit_mse(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error whose ``reduction="none"`` keeps one value per logit, (batch, classes), not per sample."""
    target = torch.zeros_like(logits).scatter(1, y[:, None], 1.0)
    return nn.functional.mse_loss(logits, target, reduction=reduction)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_a_loss_the_stacked_step_cannot_take_is_named() -> None:
    task = make_task(RunConfig())
    x, y = task.test.x, task.test.y
    reason = loss_blocker(_mlp(), _one_hot_mse, x, y)
    assert reason is not None and reason.startswith(
        "the task's loss cannot run in the stacked step (RuntimeError"
    )
    reason = loss_blocker(_mlp(), _per_logit_mse, x, y)
    assert reason is not None and "one value per sample with reduction='none'" in reason
    assert loss_blocker(_mlp(), nn.functional.cross_entropy, x, y) is None  # the vmap path
    assert loss_blocker(build_model(0), nn.functional.cross_entropy, x, y) is None  # forward_stacked


@pytest.mark.parametrize("loss", [_one_hot_mse, _per_logit_mse])
def test_the_batched_engine_trains_such_a_task_as_the_sequential_one(
    monkeypatch: pytest.MonkeyPatch, loss: object
) -> None:
    cfg = RunConfig(clients=3, rounds=1, local_epochs=1, codec="identity")
    batched_falls_back(monkeypatch, "the task's loss", cfg, model=_mlp, loss=loss)


def test_the_population_engine_refuses_such_a_loss_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    population_refuses(
        monkeypatch, "the task's loss cannot run in the stacked step", model=_mlp, loss=_one_hot_mse
    )
