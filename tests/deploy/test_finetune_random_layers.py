"""Masked fine-tuning is a pure function of the model, the data and its seed, dropout included."""

from __future__ import annotations

import copy

from tests import random_layers as rl
from torch import nn

from deltaplane.deploy.finetune import masked_finetune

_TRAIN = (
    "from deltaplane.deploy.finetune import masked_finetune\n"
    "x, y = rl.toy_data()\n"
    "print(rl.weights_hash(masked_finetune(rl.dropout_mlp(), x, y, epochs=2, lr=0.1, batch_size=8, seed=0)))\n"
)


def _finetune(seed: int, model: nn.Module | None = None) -> nn.Module:
    x, y = rl.toy_data()
    model = model if model is not None else rl.dropout_mlp()
    return masked_finetune(model, x, y, epochs=2, lr=0.1, batch_size=8, seed=seed)


def test_dropout_masks_follow_the_seed_not_the_global_generator() -> None:
    """Before: dropout drew from torch's global generator, so fine-tuning a pruned model with dropout came out
    different whenever anything else had drawn from it, and in another process. Now the masks follow the seed
    and the caller's global state is left as it was."""
    here = rl.check_seeded(_finetune)
    assert rl.hash_in_fresh_process(_TRAIN) == here


def test_a_model_without_random_layers_trains_as_a_plain_loop_over_the_seeds_batch_orders() -> None:
    x, y = rl.toy_data()
    plain = nn.Sequential(nn.Linear(16, 4))
    reference = copy.deepcopy(plain)
    got = _finetune(3, plain)
    rl.plain_sgd(reference, x, y, seed=3)
    assert rl.weights_hash(got) == rl.weights_hash(reference)
