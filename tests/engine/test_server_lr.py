"""server_lr is FedAvg's server step, applied once, by the chain, on every driver (it used to drift)."""

from __future__ import annotations

import pytest
import torch

from deltaplane.aggregation import FedAvg, ServerSGD, build_aggregator
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError
from deltaplane.sim import run_simulation


def test_server_sgd_scales_the_mean_and_is_exact_at_one() -> None:
    agg = ServerSGD(FedAvg(), lr=0.5)
    agg.add(Delta({"w": torch.tensor([1.0, 3.0])}), 1.0)
    agg.add(Delta({"w": torch.tensor([3.0, 5.0])}), 1.0)
    assert agg.result()["w"].tolist() == [1.0, 2.0]
    assert "ServerSGD" in repr(build_aggregator(server_lr=0.5))
    assert "ServerSGD" not in repr(build_aggregator(server_lr=1.0))


def test_server_lr_with_an_adaptive_optimizer_is_refused() -> None:
    with pytest.raises(ConfigError, match="server_opt_lr"):
        RunConfig.from_mapping({"aggregator": "fedadam", "server_lr": 0.5})
    with pytest.raises(ConfigError, match="fedavg has no server optimizer lr"):
        RunConfig.from_mapping({"server_opt_lr": 0.1})


def test_first_round_moves_by_server_lr_times_the_mean() -> None:
    """Round 1 trains from the same initial model whatever server_lr is: its update halves exactly."""
    cfg = RunConfig(clients=3, rounds=1, local_epochs=1)
    one, half = run_simulation(cfg), run_simulation(cfg.replace(server_lr=0.5))
    from deltaplane.engine import make_task
    from deltaplane.engine.seeding import Stream, derive_seed

    init = make_task(cfg).build_model(derive_seed(cfg.seed, Stream.MODEL_INIT)).state_dict()
    for k in init:
        full = one.final_state[k] - init[k]
        torch.testing.assert_close(half.final_state[k] - init[k], 0.5 * full, rtol=1e-5, atol=1e-7)
