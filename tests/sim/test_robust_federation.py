"""Small federations with attacks and the #21 defences, on the engine (kept short for CI)."""

import pytest
import torch

from deltaplane.sim import RunConfig, run_simulation

TINY = RunConfig(clients=8, rounds=3, local_epochs=1, lr=0.1, attack="backdoor(0.25)")


def test_batched_engine_runs_attacks_like_the_sequential_loop() -> None:
    seq = run_simulation(TINY)
    bat = run_simulation(TINY.replace(engine="batched"))
    for k, v in seq.final_state.items():  # float rounding apart, the same poisoned federation
        assert torch.allclose(bat.final_state[k], v, atol=1e-4), k
    assert bat.final.backdoor_success == pytest.approx(seq.final.backdoor_success, abs=0.02)


@pytest.mark.parametrize("defense", ["flame", "foolsgold", "sign_vote", "norm_bound(adaptive, noise=0.001)"])
def test_defences_run_on_the_default_codec(defense) -> None:
    res = run_simulation(TINY.replace(codec="topk(0.01) | quant(bits=8)", defense=defense, engine="batched"))
    assert all(torch.isfinite(v).all() for v in res.final_state.values())
    assert res.final.test_accuracy > 0.1  # learning, not collapsed to one class
