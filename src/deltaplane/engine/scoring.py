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
    "has_global_model",
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
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Global vs personal accuracy on each device's own label mix: the round's summary and per-device rows.

    The global model's per-class accuracy is computed once for all devices (and reused for a device that serves
    the global model, α-mix at α = 0): each of the round's test-set passes was one per device twice over.
    ``stacked`` (the batched engine) scores the devices' personal models together with the model's
    ``forward_stacked`` where it has one (:func:`~deltaplane.engine.metrics.class_accuracy_stacked`: the same
    figures up to the float rounding of the stacked pass). Under partial personalization (FedPer, FedBN) no
    device has a global figure (:func:`has_global_model`), and the global model is not scored."""
    whole = has_global_model(step, model)
    per_class = class_accuracy(model, state, test, num_classes) if whole else None
    if not (stacked and callable(getattr(model, "forward_stacked", None))):
        rows = [
            personal_row(step, model, state, test, c, num_classes, global_per_class=per_class)
            for c in clients
        ]
        return personal_summary(rows), rows
    mine = [step.personal_state(c, state) for c in clients]
    own = [i for i, m in enumerate(mine) if per_class is None or not _serves(m, state)]
    theirs = dict(
        zip(own, class_accuracy_stacked(model, [mine[i] for i in own], test, num_classes), strict=True)
    )
    rows = []
    for i, c in enumerate(clients):
        own_per_class = theirs.get(i)
        if own_per_class is None:  # the device serves the global model, which was scored (whole)
            assert per_class is not None
            own_per_class = per_class
        rows.append(
            {
                "client": c.cid,
                "global_accuracy": None if per_class is None else label_mix(per_class, c.train, num_classes),
                "personal_accuracy": label_mix(own_per_class, c.train, num_classes),
                "alpha": c.personal.alpha,
            }
        )
    return personal_summary(rows), rows


def has_global_model(step: ClientStep, model: nn.Module) -> bool:
    """Whether the federation's global state is a model worth scoring on its own: not under partial
    personalization (FedPer's head, FedBN's norm layers), whose local layers never reach the server, so the
    global state holds them as they were initialised, never trained.

    FedPer (Arivazhagan et al. 2019, https://arxiv.org/abs/1912.00818) and Flower's FedPer baseline report the
    personalized model only (the global body with the device's own head) and compare it with a separate FedAvg
    run; the global body with the untrained head scores near chance and made every device's "gain" look large.
    Such a device's row therefore has no global figure (``global_accuracy`` None), and the round no global mean
    or gain: compare ``personal_accuracy`` with a FedAvg run of the same seed (docs/personalization.md)."""
    return not step.personalizer.local_keys(model)


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
    is :func:`~deltaplane.engine.metrics.class_accuracy` of ``state`` when the caller has it already. Under
    partial personalization the global figure is None (:func:`has_global_model`)."""
    mine = step.personal_state(client, state)
    glob: float | None = None
    if has_global_model(step, model):
        if global_per_class is None:
            global_per_class = class_accuracy(model, state, test, num_classes)
        glob = label_mix(global_per_class, client.train, num_classes)
        # a device serving the global model (α-mix at α = 0) is not scored twice
        own = global_per_class if _serves(mine, state) else class_accuracy(model, mine, test, num_classes)
    else:
        own = class_accuracy(model, mine, test, num_classes)
    return {
        "client": client.cid,
        "global_accuracy": glob,
        "personal_accuracy": label_mix(own, client.train, num_classes),
        "alpha": client.personal.alpha,
    }


def personal_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The round's personalization figures from the devices' rows (in device order); without a global model
    (partial personalization: rows whose ``global_accuracy`` is None) the global mean and the gain are None."""
    glob = [r["global_accuracy"] for r in rows]
    pers = [r["personal_accuracy"] for r in rows]
    whole = all(g is not None for g in glob)
    return {
        "client_mix_accuracy_mean": float(np.mean(glob)) if whole else None,
        "personal_accuracy_mean": float(np.mean(pers)),
        "personal_accuracy_min": float(np.min(pers)),
        "personal_gain_min": float(np.min(np.subtract(pers, glob))) if whole else None,
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
