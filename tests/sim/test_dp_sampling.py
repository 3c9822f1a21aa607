"""A central-DP run samples its clients as the accountant assumes (Poisson), including rounds nobody joins."""

import pytest

from deltaplane.aggregation import epsilon_for
from deltaplane.sim import RunConfig, run_simulation


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_a_dp_run_samples_poisson_and_releases_noise_in_empty_rounds(engine) -> None:
    cfg = RunConfig(
        engine=engine,
        clients=4,
        rounds=5,
        local_epochs=1,
        lr=0.1,
        dp_noise=1.0,
        clip="1.0",
        sample_fraction=0.25,
        dp_delta=1e-3,
    )
    res = run_simulation(cfg)
    sizes = [r.clients for r in res.rounds]
    assert sizes == [0, 0, 0, 2, 1]  # seed 0's Poisson draws at q = 1/4 (a fixed-size sample is always 1)
    for rnd, r in enumerate(res.rounds, start=1):  # an empty round is a released round: it spends too
        assert r.epsilon == pytest.approx(
            epsilon_for(noise_multiplier=1.0, sampling_rate=0.25, steps=rnd, delta=1e-3), rel=1e-9
        )
