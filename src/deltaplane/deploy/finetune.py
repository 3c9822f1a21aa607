"""Fine-tuning with pruning masks held: the "fine-tune" half of prune → fine-tune.

Pruned weights must stay zero while the rest recovers: after every optimizer step the masks are re-applied
(or a :class:`~deltaplane.deploy.prune.GradualPruner` raises sparsity on its schedule). Plain SGD with momentum,
the optimizer the simulator's clients use, so a model fine-tuned here behaves like one trained in the fleet.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from deltaplane.deploy.prune import GradualPruner, apply_masks
from deltaplane.errors import ConfigError
from deltaplane.seeding import seeded_random_layers

__all__ = ["masked_finetune"]


def masked_finetune(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    momentum: float = 0.9,
    masks: Mapping[str, Tensor] | None = None,
    pruner: GradualPruner | None = None,
) -> nn.Module:
    """Train a classifier with cross-entropy (SGD, shuffled mini-batches from a seeded generator).

    Args:
        model: trained in place; returned in eval mode.
        x, y: inputs and integer labels.
        epochs, lr, batch_size, momentum: SGD settings. seed: the shuffling order and, through
            :func:`~deltaplane.seeding.seeded_random_layers`, the masks of dropout and any other random layer
            (torch's global generator is seeded in a fork: the caller's state comes back unchanged).
        masks: pruning masks to re-apply after every step (``PruneResult.masks``).
        pruner: a gradual pruner stepped after every optimizer step (its own masks are applied by it).
    """
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"need epochs >= 0, lr > 0, batch_size >= 1. Found {epochs}, {lr}, {batch_size}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    with seeded_random_layers(g):
        step = 0
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                if masks is not None:
                    apply_masks(model, masks)
                if pruner is not None:
                    pruner.step(step)
                step += 1
    return model.eval()
