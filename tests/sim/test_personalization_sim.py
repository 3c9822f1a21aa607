"""Personalization inside the simulator: per-client global vs personal accuracy, local layers stay local."""

from typing import Any

import pytest
import torch

import deltaplane as dp
from deltaplane.sim.config import RunConfig
from deltaplane.sim.simulation import run_simulation

SMALL = {"clients": 3, "rounds": 2, "alpha": 0.3, "min_client_samples": 30}


def test_alpha_mix_reports_global_and_personal_per_client() -> None:
    res = run_simulation(RunConfig(personalization="alpha_mix", **SMALL))
    final = res.final
    assert final.personal_accuracy_mean is not None and final.client_mix_accuracy_mean is not None
    assert len(res.clients) == 3
    gains = [c["personal_accuracy"] - c["global_accuracy"] for c in res.clients]
    assert final.personal_gain_min == pytest.approx(min(gains))
    assert all(0.0 <= c["alpha"] <= 1.0 for c in res.clients)
    assert res.to_dict()["clients"] == res.clients
    # each row is label_mix_accuracy of the global and the device's personal model, exactly (the round scores the
    # global model's per-class accuracy once for every device)
    from deltaplane.engine import build_clients, label_mix_accuracy, make_task
    from deltaplane.sim.model import build_model

    cfg = res.config
    task = make_task(cfg)
    model, devices = build_model(0), build_clients(cfg, task)
    for row, c in zip(res.clients, devices, strict=True):
        mine = res.personal_states[c.cid]
        assert row["global_accuracy"] == label_mix_accuracy(model, res.final_state, task.test, c.train, 10)
        assert row["personal_accuracy"] == label_mix_accuracy(model, mine, task.test, c.train, 10)
    # deterministic given the seed
    again = run_simulation(RunConfig(personalization="alpha_mix", **SMALL))
    assert again.clients == res.clients


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_alpha_mix_leaves_the_federation_as_it_was(engine: str) -> None:
    """`deltaplane run` personalizes its compressed run with α-mix by default: only because each device's
    personal model stays beside the federation. Same global weights, test accuracy and bytes every round, on
    the default codec with DGC (its residuals and velocities are per device too)."""
    from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC

    cfg = RunConfig(clients=5, rounds=3, engine=engine, codec=DEFAULT_RUN_CODEC, **DEFAULT_RUN_DGC)
    plain, mixed = run_simulation(cfg), run_simulation(cfg.replace(personalization="alpha_mix"))
    assert mixed.final.personal_accuracy_mean is not None and len(mixed.personal_states) == 5
    assert mixed.final.personal_accuracy_mean != mixed.final.client_mix_accuracy_mean  # it did personalize

    # every figure of every round (bytes, accuracies, devices...) but its time and the personal ones `mixed` adds
    skip = {
        "seconds",
        "client_mix_accuracy_mean",
        "personal_accuracy_mean",
        "personal_accuracy_min",
        "personal_gain_min",
    }

    def federation(r: Any) -> list[dict]:
        return [{k: v for k, v in m.to_dict().items() if k not in skip} for m in r.rounds]

    assert federation(mixed) == federation(plain)
    assert plain.final_state.keys() == mixed.final_state.keys()
    for name, value in plain.final_state.items():
        assert torch.equal(mixed.final_state[name], value), name


def test_fedper_head_never_changes_on_the_server() -> None:
    res = run_simulation(RunConfig(personalization="fedper", **SMALL))
    plain = run_simulation(RunConfig(**SMALL))
    from deltaplane.sim.model import build_model
    from deltaplane.sim.seeding import Stream, derive_seed

    init = build_model(derive_seed(0, Stream.MODEL_INIT)).state_dict()
    # the global head is the initial one: no device ever uploaded it
    assert torch.equal(res.final_state["fc2.weight"], init["fc2.weight"])
    assert not torch.equal(res.final_state["fc1.weight"], init["fc1.weight"])
    assert not torch.equal(plain.final_state["fc2.weight"], init["fc2.weight"])
    assert res.final.personal_accuracy_mean is not None
    # uploads are smaller: the head is not sent
    assert res.final.cumulative_uplink_bytes < plain.final.cumulative_uplink_bytes


def test_no_personalization_keeps_metrics_unset_and_bad_names_fail() -> None:
    res = run_simulation(RunConfig(**SMALL))
    assert res.final.personal_accuracy_mean is None and res.clients == []
    with pytest.raises(dp.ConfigError, match="unknown personalization 'magic'"):
        RunConfig.from_mapping({"personalization": "magic"})
    with pytest.raises(dp.ConfigError, match="batch-norm"):
        run_simulation(RunConfig(personalization="fedbn", **SMALL))


def test_a_fedper_head_over_every_layer_is_refused_before_the_first_round() -> None:
    with pytest.raises(dp.ConfigError, match="nothing would be federated"):
        run_simulation(RunConfig(personalization="fedper", fedper_head="conv1, conv2, fc1, fc2", **SMALL))
