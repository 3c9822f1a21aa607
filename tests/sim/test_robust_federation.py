"""Small federations with attacks and the #21 defences, on the engine (kept short for CI)."""

import pytest
import torch

from deltaplane.sim import RunConfig, run_simulation

TINY = RunConfig(clients=8, rounds=3, local_epochs=1, lr=0.1, attack="backdoor(0.25)")
SMALL = RunConfig(clients=10, rounds=10, engine="batched")  # the default federation's recipe, cut down for CI


def test_batched_engine_runs_attacks_like_the_sequential_loop() -> None:
    seq = run_simulation(TINY)
    bat = run_simulation(TINY.replace(engine="batched"))
    for k, v in seq.final_state.items():  # float rounding apart, the same poisoned federation
        assert torch.allclose(bat.final_state[k], v, atol=1e-4), k
    assert bat.final.backdoor_success == pytest.approx(seq.final.backdoor_success, abs=0.02)


@pytest.mark.parametrize("defense", ["flame", "foolsgold", "sign_vote", "norm_bound(adaptive, noise=0.001)"])
def test_defences_run_on_the_default_codec(defense) -> None:
    res = run_simulation(
        SMALL.replace(codec="topk(0.01) | quant(bits=8)", defense=defense, attack="backdoor(0.2)")
    )
    assert all(torch.isfinite(v).all() for v in res.final_state.values())
    assert res.final.test_accuracy > 0.1  # learning, not collapsed to one class


def test_a_backdoor_is_stopped_on_the_engine_with_a_compressed_uplink() -> None:
    # two boosted backdoor attackers out of ten, top-5% + 8-bit uplink: undefended the trigger takes over
    attacked = SMALL.replace(attack="backdoor(0.2, boost=2)", codec="topk(0.05) | quant(bits=8)")
    undefended = run_simulation(attacked).final
    defended = run_simulation(attacked.replace(defense="multi_krum(2)")).final
    assert undefended.backdoor_success > 0.5
    assert defended.backdoor_success < 0.1
    assert defended.test_accuracy > undefended.test_accuracy - 0.02


@pytest.mark.parametrize(
    "defense",
    [
        "foolsgold",
        "flame",
        "fltrust",
        "multi_krum(2)",
        "norm_bound(2.0, noise=0.001)",
        "sign_vote",
        "trimmed_mean(0.2)",
        "median",
        "median(2)",
        "norm_bound(adaptive)",
    ],
)
def test_no_defence_collapses_a_clean_run(defense) -> None:
    # 10 rounds: FedAvg ≈ 0.90; the slower rules (FLAME's clipping and noise, sign vote) trail it by
    # up to ~17 points this early and catch up over the default 80 rounds (benchmarks/robustness.py clean);
    # a collapse (FoolsGold once handed a clean round to one client) ends near chance, 0.1-0.3
    fedavg = _clean_fedavg()
    res = run_simulation(SMALL.replace(defense=defense)).final
    assert res.test_accuracy > fedavg - 0.25, (defense, res.test_accuracy, fedavg)


_CLEAN: dict[str, float] = {}


def _clean_fedavg() -> float:
    if "acc" not in _CLEAN:
        _CLEAN["acc"] = run_simulation(SMALL).final.test_accuracy
    return _CLEAN["acc"]
