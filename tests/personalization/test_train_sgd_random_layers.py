"""Personal fine-tuning (``train_sgd``: α-mix, Ditto) is a pure function of the start state and its generator,
dropout included."""

from __future__ import annotations

import torch
from tests import random_layers as rl
from torch import nn

from deltaplane.personalization import Ditto, PersonalState
from deltaplane.personalization.training import train_sgd

_TRAIN = (
    "from deltaplane.personalization.training import train_sgd\n"
    "m = rl.dropout_mlp()\n"
    "out = train_sgd(m, dict(m.state_dict()), rl.toy_data(), epochs=2, lr=0.1, batch_size=8,\n"
    "                generator=torch.Generator().manual_seed(0))\n"
    "print(rl.weights_hash(out))\n"
)


def _train(seed: int, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    model = model if model is not None else rl.dropout_mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return train_sgd(model, start, rl.toy_data(), epochs=2, lr=0.1, batch_size=8, generator=g)


def test_dropout_masks_follow_the_generator_not_the_global_one() -> None:
    """Before: dropout drew from torch's global generator, so a device's personal model (α-mix, Ditto) came
    out different whenever anything else had drawn from it, and two runs of one seed in two processes
    disagreed. Now the masks follow the generator's seed, in this process and in a fresh one, and the
    caller's global state is left as it was."""
    here = rl.check_seeded(_train)
    assert rl.hash_in_fresh_process(_TRAIN) == here


def test_ditto_personal_model_reproduces_with_dropout() -> None:
    x, y = rl.toy_data()

    def personal(seed: int) -> dict[str, torch.Tensor]:
        model = rl.dropout_mlp()
        ditto = Ditto(epochs=2, lr=0.1, batch_size=8)
        state = PersonalState()
        g = torch.Generator().manual_seed(seed)
        ditto.personalize(model, model.state_dict(), state, (x, y), (x[:8], y[:8]), generator=g)
        return state.personal_model

    rl.check_seeded(personal)


def test_a_model_without_random_layers_trains_as_a_plain_loop_over_the_batch_orders() -> None:
    """The generator is only read for the seed: the batch orders, and so the weights of a model without random
    layers, are what they were before, bit for bit."""
    x, y = rl.toy_data()
    plain = nn.Sequential(nn.Linear(16, 4))
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    got = _train(0, plain)
    plain.load_state_dict(start)
    rl.plain_sgd(plain, x, y, seed=0)
    assert rl.weights_hash(got) == rl.weights_hash(plain)
