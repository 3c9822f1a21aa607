"""Personal fine-tuning (``train_sgd``: α-mix, Ditto) is a pure function of the start state and its generator,
dropout included."""

from __future__ import annotations

import torch
from tests.random_layers import check_seeded, dropout_mlp, hash_in_fresh_process, toy_data, weights_hash
from torch import nn

from deltaplane.personalization import Ditto, PersonalState
from deltaplane.personalization.training import train_sgd

_TRAIN = (
    "from deltaplane.personalization.training import train_sgd\n"
    "m = dropout_mlp()\n"
    "out = train_sgd(m, dict(m.state_dict()), toy_data(), epochs=2, lr=0.1, batch_size=8,\n"
    "                generator=torch.Generator().manual_seed(0))\n"
    "print(weights_hash(out))\n"
)


def _train(seed: int, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    model = model if model is not None else dropout_mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return train_sgd(model, start, toy_data(), epochs=2, lr=0.1, batch_size=8, generator=g)


def test_dropout_masks_follow_the_generator_not_the_global_one() -> None:
    """Before: dropout drew from torch's global generator, so a device's personal model (α-mix, Ditto) came
    out different whenever anything else had drawn from it, and two runs of one seed in two processes
    disagreed. Now the masks follow the generator's seed, in this process and in a fresh one, and the
    caller's global state is left as it was."""
    here = check_seeded(_train)
    assert hash_in_fresh_process(_TRAIN) == here


def test_ditto_personal_model_reproduces_with_dropout() -> None:
    x, y = toy_data()

    def personal(seed: int) -> dict[str, torch.Tensor]:
        model = dropout_mlp()
        ditto = Ditto(epochs=2, lr=0.1, batch_size=8)
        state = PersonalState()
        g = torch.Generator().manual_seed(seed)
        ditto.personalize(model, model.state_dict(), state, (x, y), (x[:8], y[:8]), generator=g)
        return state.personal_model

    check_seeded(personal)


def test_a_model_without_random_layers_trains_as_a_plain_loop_over_the_batch_orders() -> None:
    """The generator is only read for the seed: the batch orders, and so the weights of a model without random
    layers, are what they were before, bit for bit."""
    x, y = toy_data()
    plain = nn.Sequential(nn.Linear(16, 4))
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    got = _train(0, plain)
    plain.load_state_dict(start)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(48, generator=g)
        for first in range(0, 48, 8):
            idx = order[first : first + 8]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(plain(x[idx]), y[idx]).backward()
            opt.step()
    assert weights_hash(got) == weights_hash(plain)
