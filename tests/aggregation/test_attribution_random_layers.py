"""trigger_attribution runs the server's model in inference mode: dropout does not make its results depend on
torch's global generator, and BatchNorm does not write into the global model it inverts."""

from __future__ import annotations

import torch
from tests import random_layers as rl
from torch import nn

from deltaplane.aggregation.attribution import TriggerProbe


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
        )


def test_the_probe_is_deterministic_and_leaves_the_global_state_alone() -> None:
    """Before: the scratch model was in training mode, so every inversion and score drew dropout masks from the
    unseeded global generator (two servers of one seed disagreed) and BatchNorm wrote its batch statistics into
    the round's global state, which the server then published."""
    model = _model()
    x, y = torch.randn(30, 1, 4, 4), torch.arange(30) % 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    served = rl.weights_hash(state)
    probe = TriggerProbe(model, x, y, state)
    torch.manual_seed(1)
    first = probe.logits(state, x)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    assert torch.equal(probe.logits(state, x), first)
    assert torch.equal(torch.get_rng_state(), before)
    assert rl.weights_hash(state) == served
    assert model.training  # the model's own mode is left as it was
    assert torch.equal(first, model.eval()(x))  # what the served model answers


def test_a_model_without_random_layers_or_buffers_gives_the_same_logits_as_before() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(30, 1, 4, 4), torch.arange(30) % 3
    probe = TriggerProbe(model, x, y, model.state_dict())
    assert torch.equal(probe.logits(model.state_dict(), x), model.train()(x))
