"""A real device's local DP noise comes from the OS CSPRNG: the server (the adversary) cannot reproduce it."""

from __future__ import annotations

import torch

from deltaplane.delta import Delta
from deltaplane.engine import ClientStep, RunConfig, build_clients, make_task
from deltaplane.engine.seeding import Stream, torch_generator

CFG = RunConfig(clients=2, local_dp_noise=1.0, clip="1.0", dp_delta=1e-3)


def _noised(simulation: bool, config: RunConfig = CFG) -> tuple[Delta, Delta]:
    task = make_task(config)
    client = build_clients(config, task)[0]
    model = task.build_model(0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = ClientStep(config, task, base_id="b", simulation=simulation)
    delta = Delta({k: torch.zeros_like(v) for k, v in state.items()})  # norm 0: only the noise is released
    return step.transform(client, delta, model=model, global_state=state, rnd=1), delta


def test_a_device_step_draws_local_noise_the_server_cannot_reproduce() -> None:
    out, _ = _noised(simulation=False)
    again, _ = _noised(simulation=False)
    assert any(not torch.equal(out[k], again[k]) for k in out)
    # the seed-derived stream (what a server knowing the config computes) is not the noise
    g = torch_generator(CFG.seed, Stream.LOCAL_DP, 1, 0)
    guess = {
        k: (CFG.local_dp_noise * torch.randn(v.shape, generator=g, dtype=torch.float64)).float()
        for k, v in out.items()
    }
    assert max(float((out[k] - guess[k]).abs().max()) for k in out) > 1e-2


def test_a_simulation_keeps_seeded_local_noise() -> None:
    a, _ = _noised(simulation=True)
    b, _ = _noised(simulation=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_seeded_dp_run_says_in_its_report_that_it_is_not_private_against_the_seed() -> None:
    from deltaplane.engine.results import RunResult

    def note(cfg: RunConfig) -> str | None:
        return RunResult(cfg, [], 0, 0, 0.0).privacy_note

    assert "not private against anyone who knows the seed" in note(CFG)
    assert note(CFG.replace(dp_noise_source="secure")) is None
    assert note(RunConfig()) is None  # no DP, nothing to say
