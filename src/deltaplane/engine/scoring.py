"""What drivers measure after a round beyond accuracy: personalization, backdoor success, ε — one place."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.aggregation import local_epsilon
from deltaplane.data.dataset import Dataset
from deltaplane.delta import StateDict
from deltaplane.engine.attacks import add_trigger
from deltaplane.engine.client import ClientStep
from deltaplane.engine.config import RunConfig
from deltaplane.engine.federation import Client
from deltaplane.engine.metrics import accuracy, class_accuracy, class_accuracy_stacked, label_mix
from deltaplane.engine.round_params import dp_adjacency  # the coordinator's too, without torch

__all__ = [
    "backdoor_success",
    "dp_adjacency",
    "personal_metrics",
    "personal_row",
    "personal_summary",
    "round_epsilon",
]


def backdoor_success(model: nn.Module, test: Dataset, target: int | None) -> float | None:
    """Share of triggered test inputs of other classes that ``model`` puts in the backdoors ``target``."""
    if target is None:
        return None
    keep = test.y != target
    triggered = Dataset(add_trigger(test.x[keep]), torch.full_like(test.y[keep], target))
    return accuracy(model, triggered)


def personal_metrics(
    step: ClientStep,
    model: nn.Module,
    state: dict[str, Tensor],
    test: Dataset,
    clients: list[Client],
    num_classes: int,
    *,
    stacked: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Global vs personal accuracy on each device's own label mix: the round's summary and per-device rows.

    The global model's per-class accuracy is computed once for all devices (and reused for a device that serves
    the global model, α-mix at α = 0): each of the round's test-set passes was one per device twice over.
    ``stacked`` (the batched engine) scores the devices' personal models together with the model's
    ``forward_stacked`` where it has one (:func:`~deltaplane.engine.metrics.class_accuracy_stacked`: the same
    figures up to the float rounding of the stacked pass)."""
    per_class = class_accuracy(model, state, test, num_classes)
    if not (stacked and callable(getattr(model, "forward_stacked", None))):
        rows = [
            personal_row(step, model, state, test, c, num_classes, global_per_class=per_class)
            for c in clients
        ]
        return personal_summary(rows), rows
    mine = [step.personal_state(c, state) for c in clients]
    own = [i for i, m in enumerate(mine) if not _serves(m, state)]
    theirs = dict(
        zip(own, class_accuracy_stacked(model, [mine[i] for i in own], test, num_classes), strict=True)
    )
    rows = [
        {
            "client": c.cid,
            "global_accuracy": label_mix(per_class, c.train, num_classes),
            "personal_accuracy": label_mix(theirs.get(i, per_class), c.train, num_classes),
            "alpha": c.personal.alpha,
        }
        for i, c in enumerate(clients)
    ]
    return personal_summary(rows), rows


def _serves(mine: StateDict, state: StateDict) -> bool:
    """Whether a device's model ``mine`` is the global ``state`` itself (α-mix at α = 0)."""
    return mine.keys() == state.keys() and all(mine[k] is state[k] for k in state)


def personal_row(
    step: ClientStep,
    model: nn.Module,
    state: dict[str, Tensor],
    test: Dataset,
    client: Client,
    num_classes: int,
    *,
    global_per_class: np.ndarray | None = None,
) -> dict[str, Any]:
    """One device's row: the global and its personal model's accuracy on its label mix, and its α.

    Computed where the device's personal state lives (in process, or on a Flower node); ``global_per_class``
    is :func:`~deltaplane.engine.metrics.class_accuracy` of ``state`` when the caller has it already."""
    if global_per_class is None:
        global_per_class = class_accuracy(model, state, test, num_classes)
    mine = step.personal_state(client, state)
    same = _serves(mine, state)  # serves the global model
    return {
        "client": client.cid,
        "global_accuracy": label_mix(global_per_class, client.train, num_classes),
        "personal_accuracy": label_mix(
            global_per_class if same else class_accuracy(model, mine, test, num_classes),
            client.train,
            num_classes,
        ),
        "alpha": client.personal.alpha,
    }


def personal_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The round's personalization figures from the devices' rows (in device order)."""
    glob = [r["global_accuracy"] for r in rows]
    pers = [r["personal_accuracy"] for r in rows]
    return {
        "client_mix_accuracy_mean": float(np.mean(glob)),
        "personal_accuracy_mean": float(np.mean(pers)),
        "personal_accuracy_min": float(np.min(pers)),
        "personal_gain_min": float(np.min(np.subtract(pers, glob))),
    }


def round_epsilon(config: RunConfig, step: ClientStep, measurements: dict[str, float]) -> float | None:
    """ε spent so far: the worst device's local-DP ε, or the central accountant's (None without DP)."""
    if step.participations:
        return local_epsilon(
            noise_multiplier=config.local_dp_noise,
            rounds=max(step.participations.values()),
            delta=config.dp_delta,
        )
    return measurements.get("epsilon")
