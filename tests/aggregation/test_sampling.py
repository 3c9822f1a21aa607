import numpy as np
import pytest

import deltaplane as dp
from deltaplane.aggregation.sampling import clients_per_round, sample_round, sampling_rate
from deltaplane.sim import RunConfig

N, FRACTION, ROUNDS = 20, 0.2, 4000


def _inclusion(central_dp: bool) -> np.ndarray:
    """(rounds, clients) booleans: who was in each round."""
    out = np.zeros((ROUNDS, N), dtype=bool)
    for r in range(ROUNDS):
        out[r, sample_round(N, FRACTION, np.random.default_rng([7, r]), central_dp=central_dp)] = True
    return out


def test_central_dp_samples_poisson_at_the_accountants_rate() -> None:
    q = sampling_rate(N, FRACTION)
    cfg = RunConfig(clients=N, sample_fraction=FRACTION, dp_noise=1.0, clip="1.0")
    assert cfg.build_aggregator().find(dp.DPFedAvg).accountant.sampling_rate == q == 0.2
    inc = _inclusion(central_dp=True)
    # each client joins each round with probability q ...
    assert inc.mean() == pytest.approx(q, abs=4 * np.sqrt(q * (1 - q) / inc.size))
    # ... independently of the others: round sizes are Binomial(N, q), not always m (sampling without
    # replacement would make joint inclusions m(m-1)/(N(N-1)) = 0.0316 instead of q² = 0.04)
    sizes = inc.sum(axis=1)
    assert sizes.var() == pytest.approx(N * q * (1 - q), rel=0.1)
    assert (sizes == 0).mean() == pytest.approx((1 - q) ** N, abs=0.006)
    joint = (inc.T.astype(float) @ inc.astype(float)) / ROUNDS
    pairs = joint[~np.eye(N, dtype=bool)].mean()
    assert pairs == pytest.approx(q * q, abs=0.002)


def test_without_central_dp_every_round_has_exactly_m_clients() -> None:
    sizes = _inclusion(central_dp=False).sum(axis=1)
    assert (sizes == clients_per_round(N, FRACTION)).all()
    assert sample_round(N, 1.0, np.random.default_rng(0), central_dp=True) == list(range(N))
    with pytest.raises(dp.ConfigError, match="fraction"):
        sample_round(N, 0.0, np.random.default_rng(0), central_dp=True)
