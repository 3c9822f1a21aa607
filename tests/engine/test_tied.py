"""Tied weights (one parameter under two names) travel as one tensor: the clip counts the parameter once and
central DP noises it once, on every driver (engine.tied)."""

from __future__ import annotations

import math

import pytest
import torch

from deltaplane.apps.runner import run_federation
from deltaplane.delta import Delta
from deltaplane.engine import ClientStep, RunConfig, build_clients, make_task
from deltaplane.engine.seeding import Stream, derive_seed


def _model_and_state(cfg: RunConfig):
    task = make_task(cfg)
    model = task.build_model(derive_seed(cfg.seed, Stream.MODEL_INIT))
    return task, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_aliases_are_the_names_load_state_dict_overwrites(tied_task) -> None:
    """The kept name is the one torch's load_state_dict copies last: a state whose alias is stale still loads
    the kept name's value into the shared parameter."""
    from deltaplane.engine.tied import retie, tied_aliases, untie

    _, model, state = _model_and_state(RunConfig(task=tied_task, clients=2))
    assert tied_aliases(model) == {"hidden.weight": "again.weight"}
    stale = {**state, "hidden.weight": torch.zeros_like(state["hidden.weight"])}
    model.load_state_dict(stale)
    assert torch.equal(model.hidden.weight, state["again.weight"])
    d = Delta.zeros_like(state)
    assert "hidden.weight" not in untie(d, tied_aliases(model))
    assert retie(untie(d, tied_aliases(model)), tied_aliases(model)).keys() == d.keys()


def test_a_devices_update_holds_a_tied_parameter_once_and_its_norm_counts_it_once(tied_task) -> None:
    """The update leaving the device's clip/DP stage: one tensor per parameter, and its L2 norm is the norm of
    the unique parameters' change computed with plain torch (it was √(‖Δw‖² + ‖Δtied‖²·2) before)."""
    cfg = RunConfig(task=tied_task, clients=2, lr=0.1, secagg=True, clip=1e6, codec="identity")
    task, model, state = _model_and_state(cfg)
    client = build_clients(cfg, task)[0]
    step = ClientStep(cfg, task, base_id="m")
    trained = step.train(client, model, state, 1)
    sent = step.transform(client, trained, model=model, global_state=state, rnd=1)
    before, after = task.build_model(0), task.build_model(0)
    before.load_state_dict(state)
    after.load_state_dict(trained.apply(state))
    unique = [
        (a - b).detach().flatten() for a, b in zip(after.parameters(), before.parameters(), strict=True)
    ]
    assert set(sent) == set(state) - {"hidden.weight"}
    assert sum(t.numel() for t in sent.values()) == sum(p.numel() for p in model.parameters())
    expected = float(torch.cat(unique).norm())
    assert expected > 0
    assert math.isclose(sent.norm(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("transport", ["inproc", "http"])
def test_central_dp_noises_the_shared_weight_once_with_the_accountants_std(tied_task, transport) -> None:
    """Central DP (clip C, noise multiplier z, m devices a round): the noise the shared weight gets is one draw
    of std z·C/m — measured as the difference between a noised and a noise-free run of the same updates — and
    both names hold the same values after the round (they held independent draws before)."""
    z, clip, m = 2.0, 1.0, 4
    cfg = RunConfig(
        task=tied_task,
        task_options={"width": 48},
        clients=m,
        rounds=1,
        lr=0.05,
        clip=clip,
        codec="identity",
        transport=transport,
    )
    quiet = run_federation(cfg).final_state
    noised = run_federation(cfg.replace(dp_noise=z)).final_state
    assert torch.equal(noised["hidden.weight"], noised["again.weight"])
    noise = (noised["again.weight"] - quiet["again.weight"]).double()
    # 48² = 2304 draws: the sample std is within 5% of σ with probability > 0.999
    assert noise.std().item() == pytest.approx(z * clip / m, rel=0.05)
    assert abs(noise.mean().item()) < 4 * z * clip / m / math.sqrt(noise.numel())


def test_secagg_with_distributed_dp_keeps_the_tied_names_equal(tied_task) -> None:
    """SecAgg sums what the devices masked: the tied parameter once, so each device's noise share covers it once
    and the published model keeps its two names equal."""
    cfg = RunConfig(
        task=tied_task, clients=4, rounds=2, lr=0.05, clip=1.0, dp_noise=0.5, secagg=True, codec="identity"
    )
    s = run_federation(cfg).final_state
    assert torch.equal(s["hidden.weight"], s["again.weight"])
    assert run_federation(cfg.replace(engine="batched")).final_state.keys() == s.keys()


def test_fltrust_scores_a_tied_models_updates_against_a_reference_of_the_same_layout(tied_task) -> None:
    """FLTrust's server reference is trained as a device's update is: its tied parameter once, as in the
    updates it is compared with (it held both names while the updates held one)."""
    cfg = RunConfig(task=tied_task, clients=3, rounds=2, lr=0.05, defense="fltrust", codec="identity")
    result = run_federation(cfg)
    assert [r.rejected for r in result.rounds] == [0, 0]
    assert torch.equal(result.final_state["hidden.weight"], result.final_state["again.weight"])
