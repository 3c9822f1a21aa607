"""Shared checks for models and losses the stacked engines cannot train: the batched engine falls back to the
sequential loop (with its reason in a warning, the sequential engine's weights bit for bit) and the population
engine refuses them before the run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from tests import random_layers as rl
from torch import Tensor

import deltaplane.sim.population as population
import deltaplane.sim.simulation as simulation
from deltaplane.engine import make_task
from deltaplane.errors import UnsupportedOption
from deltaplane.sim import RunConfig, run_simulation


def batched_falls_back(
    monkeypatch: pytest.MonkeyPatch, match: str, cfg: RunConfig, **task_fields: Any
) -> Mapping[str, Tensor]:
    """The digits task with ``task_fields`` replaced, run on the batched engine: it warns ``match`` and ends
    on the sequential engine's weights bit for bit; returns the sequential run's final state."""
    task = dataclasses.replace(make_task(RunConfig()), **task_fields)
    monkeypatch.setattr(simulation, "make_task", lambda _cfg: task)
    monkeypatch.setattr(simulation, "_REPORTED_FALLBACKS", set())
    with pytest.warns(UserWarning, match=rf"falls back to the sequential client loop: {match}"):
        batched = run_simulation(cfg.replace(engine="batched")).final_state
    sequential = run_simulation(cfg).final_state
    assert rl.weights_hash(batched) == rl.weights_hash(sequential)
    return sequential


def population_refuses(monkeypatch: pytest.MonkeyPatch, match: str, **task_fields: Any) -> None:
    """The digits task with ``task_fields`` replaced is refused by the population engine before the run."""
    task = dataclasses.replace(make_task(RunConfig()), **task_fields)
    monkeypatch.setattr(population, "make_task", lambda _cfg: task)
    with pytest.raises(UnsupportedOption, match=rf"{match}.*use the sequential engine"):
        population.check_supported(RunConfig(clients=4, rounds=1, engine="population"))
