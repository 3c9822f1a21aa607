"""The batched and population engines and random layers: a device's dropout masks come from its own seed on the
sequential loop, which stacked training cannot do, so a model with dropout trains one device at a time on the
batched engine (with a warning; the same weights as the sequential engine, bit for bit) and is refused by the
population engine. Before, torch's vmap raised a bare RuntimeError in round 1."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests import random_layers as rl
from tests.batched_fallback import batched_falls_back, population_refuses
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.errors import ConfigError
from deltaplane.sim import RunConfig, run_simulation
from deltaplane.sim.batched import BatchedTrainer, batching_blocker


class _FunctionalDropout(nn.Module):
    """Dropout called in ``forward``, no module to find by type."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(nn.functional.dropout(x, 0.5, self.training))


def _digits_dropout() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def _shards() -> list[Dataset]:
    x, y = rl.toy_data()
    return [Dataset(x[:20], y[:20]), Dataset(x[20:], y[20:])]


def test_random_layers_are_named_by_type_and_found_by_a_forward_pass() -> None:
    reason = batching_blocker(rl.dropout_mlp())
    assert reason is not None and "random layers (2: Dropout)" in reason and "its own seed" in reason
    assert batching_blocker(nn.Sequential(nn.Linear(16, 4), nn.Dropout(0.0))) is None  # p = 0 draws nothing
    assert batching_blocker(nn.Sequential(nn.Linear(16, 4), nn.RReLU())) is not None
    functional = _FunctionalDropout().eval()
    assert batching_blocker(functional) is None  # nothing to see without running it
    reason = batching_blocker(functional, rl.toy_data()[0])
    assert reason is not None and "forward pass draws from torch's generator" in reason
    assert not functional.training  # its mode is left as it was
    # the probe runs in a fork: the caller's generator is as it was
    model, x = _FunctionalDropout(), rl.toy_data()[0]
    before = torch.get_rng_state()
    batching_blocker(model, x)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_trainer_refuses_random_layers_with_a_typed_error_naming_the_fix() -> None:
    for model in (rl.dropout_mlp(), rl.dropout_mlp().eval()):  # eval mode too: training switches dropout on
        with pytest.raises(ConfigError, match=r"random layers .*engine='sequential'"):
            BatchedTrainer(model)
    trainer = BatchedTrainer(_FunctionalDropout())
    start = trainer.model.state_dict()
    with pytest.raises(ConfigError, match=r"forward pass draws .*engine='sequential'"):
        trainer.train(start, _shards(), [1, 2], epochs=1, batch_size=8, lr=0.1, momentum=0.9)


def test_the_batched_engine_trains_a_dropout_model_as_the_sequential_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = RunConfig(clients=3, rounds=2, local_epochs=1, codec="identity")
    sequential = batched_falls_back(
        monkeypatch, r".*random layers \(3: Dropout\)", cfg, model=_digits_dropout
    )
    torch.manual_seed(7)  # another global state: the same run all the same
    again = run_simulation(cfg).final_state
    assert rl.weights_hash(again) == rl.weights_hash(sequential)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = run_simulation(cfg.replace(engine="batched", seed=1)).final_state  # said once
    assert rl.weights_hash(other) != rl.weights_hash(sequential)


def test_the_population_engine_refuses_random_layers_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    population_refuses(monkeypatch, r"random layers \(3: Dropout\)", model=_digits_dropout)
