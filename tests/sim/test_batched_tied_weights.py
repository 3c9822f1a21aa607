"""The batched and population engines and tied weights (one parameter under two names, as a decoder's output
layer sharing its embedding table): stacked training keeps one copy per tensor but a device's update carries
every state-dict name, so before, every update of round 1 was refused as belonging to another wire session
(an ``InvalidUpdate`` after the run had started). Now the batched engine trains such a model one device at a
time (with a warning; the sequential engine's weights bit for bit) and the population engine refuses it before
the run."""

from __future__ import annotations

import pytest
import torch
from tests.batched_fallback import batched_falls_back, population_refuses
from torch import Tensor, nn

from deltaplane.sim import RunConfig
from deltaplane.sim.batched import batching_blocker


class _Tied(nn.Module):
    """A digits MLP whose two hidden layers share one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


def test_tied_parameters_are_named() -> None:
    reason = batching_blocker(_Tied())
    assert reason is not None and "tied parameters (b.weight is a.weight)" in reason
    assert batching_blocker(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))) is None


def test_the_batched_engine_trains_a_tied_model_as_the_sequential_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = RunConfig(clients=3, rounds=1, local_epochs=1, codec="identity")
    batched_falls_back(monkeypatch, r".*tied parameters", cfg, model=_Tied)


def test_the_population_engine_refuses_tied_weights_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    population_refuses(monkeypatch, r"tied parameters \(b.weight is a.weight\)", model=_Tied)
