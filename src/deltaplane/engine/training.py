"""Local training on one device: the client step's first stage, written once for every driver.

:func:`local_train` is SGD with momentum from the global model over the device's data, optionally with
FedProx's proximal term; the batched driver (``deltaplane.sim.batched``) computes exactly the same steps for
many devices at once, drawing each device's batch order from the same generator in the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.delta import Delta, StateDict
from deltaplane.seeding import seeded_random_layers

__all__ = ["local_train"]


def local_train(
    model: nn.Module,
    start_state: StateDict,
    data: Dataset,
    generator: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    prox_mu: float = 0.0,
    loss: Callable[..., Tensor] = nn.functional.cross_entropy,
) -> Delta:
    """Train ``model`` from ``start_state`` for ``epochs`` passes of SGD over ``data``; return the change.

    ``model`` is a scratch module (its weights are overwritten); ``generator`` alone decides the batch order
    (one ``torch.randperm`` per epoch) and, through its initial seed, the masks of dropout and any other random
    layer (torch's global generator, seeded per update in a fork that leaves the caller's state as it was),
    so an update is a pure function of the start state and the generator.
    With ``prox_mu > 0`` the loss gets FedProx's proximal term ``μ/2 ‖w − w_start‖²`` (Li et al. 2020,
    https://arxiv.org/abs/1812.06127), which keeps non-IID clients from drifting far from the global model.
    ``loss(logits, y)`` is the task's loss (mean over the batch).
    """
    # Dropout (and any random layer) draws from torch's global generator, which nothing seeds per device: two
    # runs of one seed trained different updates. It is seeded here from this update's own generator (its
    # initial seed, so the batch orders drawn from it stay as they were), in a fork of the global state that
    # the caller gets back unchanged.
    with seeded_random_layers(generator):
        # A private copy of the start point: callers may pass the model's own state_dict, whose tensors
        # training would otherwise change under us (and the delta would come out as zero).
        start = {k: v.detach().clone() for k, v in start_state.items()}
        model.load_state_dict(start)
        model.train()
        # A fresh optimizer per round: momentum is not carried over, as a device would not keep it either.
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        n = len(data)
        anchors = [start[name] for name, _ in model.named_parameters()] if prox_mu > 0 else []
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for first in range(0, n, batch_size):
                idx = order[first : first + batch_size]
                value = loss(model(data.x[idx]), data.y[idx])
                if anchors:
                    prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
                    value = value + 0.5 * prox_mu * prox
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
        return Delta.between(start, model.state_dict())
