"""The batched and population engines and tied weights (one parameter under two names, as a decoder's output
layer sharing its embedding table): stacked training keeps one copy per tensor but a device's update carries
every state-dict name, so before, every update of round 1 was refused as belonging to another wire session
(an ``InvalidUpdate`` after the run had started). Now the batched engine trains such a model one device at a
time (with a warning; the sequential engine's weights bit for bit) and the population engine refuses it before
the run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests import random_layers as rl
from torch import Tensor, nn

import deltaplane.sim.population as population
import deltaplane.sim.simulation as simulation
from deltaplane.engine import make_task
from deltaplane.errors import UnsupportedOption
from deltaplane.sim import RunConfig, run_simulation
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
    task = dataclasses.replace(make_task(RunConfig()), model=_Tied)
    monkeypatch.setattr(simulation, "make_task", lambda cfg: task)
    monkeypatch.setattr(simulation, "_REPORTED_FALLBACKS", set())
    cfg = RunConfig(clients=3, rounds=1, local_epochs=1, codec="identity")
    with pytest.warns(UserWarning, match=r"falls back to the sequential client loop: .*tied parameters"):
        batched = run_simulation(cfg.replace(engine="batched")).final_state
    assert rl.weights_hash(batched) == rl.weights_hash(run_simulation(cfg).final_state)


def test_the_population_engine_refuses_tied_weights_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    task = dataclasses.replace(make_task(RunConfig()), model=_Tied)
    monkeypatch.setattr(population, "make_task", lambda cfg: task)
    with pytest.raises(
        UnsupportedOption, match=r"tied parameters \(b.weight is a.weight\).*use the sequential"
    ):
        population.check_supported(RunConfig(clients=4, rounds=1, engine="population"))
