import math

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import epsilon_for, local_epsilon, privatize


def _deltas(n: int, d: int = 1000, seed: int = 0) -> list[dp.Delta]:
    g = torch.Generator().manual_seed(seed)
    return [dp.Delta({"w": torch.randn(d, generator=g)}) for _ in range(n)]


def test_noise_std_on_the_mean_is_z_times_clip_over_expected_clients() -> None:
    z, c, m = 2.0, 0.5, 10
    agg = dp.DPFedAvg(clip=c, noise_multiplier=z, expected_clients=m, seed=3)
    zeros = dp.Delta({"w": torch.zeros(50_000)})
    for _ in range(m):
        agg.add(zeros, weight=123.0)  # weights are ignored: sensitivity is the clip
    out = agg.result()["w"].double()
    assert out.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert out.std().item() == pytest.approx(z * c / m, rel=0.01)
    assert agg.measurements["noise_std"] == pytest.approx(z * c)


def test_without_noise_it_is_the_uniform_mean_of_clipped_updates() -> None:
    deltas = _deltas(5)
    agg = dp.DPFedAvg(dp.Clip(dp.FedAvg(), clip=1.0), noise_multiplier=0.0)
    for i, d in enumerate(deltas):
        agg.add(d, weight=i + 1)
    expected = sum(d["w"] / d.norm() for d in deltas) / 5  # every norm ~31 > 1: all clipped to 1
    assert torch.allclose(agg.result()["w"], expected, atol=1e-6)
    assert agg.measurements["clipped_fraction"] == 1.0


def test_deterministic_given_seed() -> None:
    outs = []
    for _ in range(2):
        agg = dp.DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=3, seed=7)
        for d in _deltas(3):
            agg.add(d)
        outs.append(agg.result()["w"])
    assert torch.equal(outs[0], outs[1])


def test_epsilon_reported_every_round_matches_dp_accounting() -> None:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = dp.PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5)
    agg = dp.DPFedAvg(clip=1.0, noise_multiplier=1.1, expected_clients=3, accountant=acc)
    reported = []
    for rnd in range(1, 4):
        agg.reset()
        for d in _deltas(3, d=10, seed=rnd):
            agg.add(d)
        agg.result()
        reported.append(agg.measurements["epsilon"])
        assert agg.measurements["delta"] == 1e-5
    assert reported[0] < reported[1] < reported[2]
    # independent: a fresh dp-accounting RDP accountant composing the three rounds one by one
    ref = rdp_privacy_accountant.RdpAccountant()
    for _ in range(3):
        ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)))
    assert reported[-1] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_budget_stops_before_exceeding() -> None:
    eps2 = epsilon_for(noise_multiplier=1.0, sampling_rate=0.05, steps=2, delta=1e-5)
    eps3 = epsilon_for(noise_multiplier=1.0, sampling_rate=0.05, steps=3, delta=1e-5)
    budget = (eps2 + eps3) / 2
    acc = dp.PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.05, delta=1e-5, budget=budget)
    assert acc.remaining_rounds() == 2
    agg = dp.DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=2, accountant=acc)
    released = 0
    with pytest.raises(dp.PrivacyBudgetExceeded, match="round 3"):
        for _ in range(10):
            agg.reset()
            for d in _deltas(2, d=10):
                agg.add(d)
            agg.result()
            released += 1
    assert released == 2 and acc.state.steps == 2
    assert acc.epsilon == pytest.approx(eps2) and acc.epsilon <= budget


def test_pld_is_tighter_than_rdp() -> None:
    kw = {"noise_multiplier": 1.0, "sampling_rate": 0.01, "steps": 100, "delta": 1e-5}
    rdp, pld = epsilon_for(**kw, method="rdp"), epsilon_for(**kw, method="pld")
    assert 0 < pld < rdp


def test_adaptive_clip_splits_the_noise() -> None:
    agg = dp.DPFedAvg(clip="adaptive", noise_multiplier=1.0, expected_clients=100)
    sigma_b = 100 / 20
    assert agg.sum_noise_multiplier == pytest.approx((1.0 - (2 * sigma_b) ** -2) ** -0.5)
    assert agg.sum_noise_multiplier > 1.0
    with pytest.raises(dp.ConfigError, match="needs expected_clients"):
        dp.DPFedAvg(clip="adaptive", noise_multiplier=1.0)
    with pytest.raises(dp.ConfigError, match="count_noise_std > 0"):
        dp.DPFedAvg(clip=dp.QuantileClip(expected_clients=10), noise_multiplier=1.0, expected_clients=10)
    with pytest.raises(dp.ConfigError, match="needs its expected_clients"):
        dp.DPFedAvg(clip=dp.QuantileClip(count_noise_std=5.0), noise_multiplier=1.0, expected_clients=10)
    with pytest.raises(dp.ConfigError, match="needs a clip"):
        dp.DPFedAvg(noise_multiplier=1.0, expected_clients=10)
    with pytest.raises(dp.ConfigError, match="needs expected_clients"):
        dp.DPFedAvg(clip=1.0, noise_multiplier=1.0)


def test_local_dp() -> None:
    g = torch.Generator().manual_seed(0)
    d = dp.Delta({"w": torch.full((100_000,), 10.0)})
    out = privatize(d, clip=1.0, noise_multiplier=0.5, generator=g)["w"].double()
    assert out.mean().item() == pytest.approx(1.0 / math.sqrt(100_000), abs=0.01)
    assert out.std().item() == pytest.approx(0.5, rel=0.02)
    # replace-one adjacency: multiplier z/2 per release
    assert local_epsilon(noise_multiplier=4.0, rounds=5, delta=1e-5) == pytest.approx(
        epsilon_for(noise_multiplier=2.0, sampling_rate=1.0, steps=5, delta=1e-5)
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_tensors_are_refused_never_released_exactly(dtype) -> None:
    from deltaplane.aggregation import build_aggregator

    update = dp.Delta({"w": torch.ones(3), "step": torch.tensor([7]).to(dtype)})  # e.g. a step counter
    agg = dp.DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=1)
    with pytest.raises(dp.InvalidUpdate, match="'step'") as refused:
        agg.add(update)
    assert type(refused.value).__name__ == "NotPrivatizable"
    with pytest.raises(dp.InvalidUpdate, match="'step'"):
        privatize(update, clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    chain = build_aggregator(dp_noise=1.0, clip=1.0, expected_clients=1)  # the run's chain refuses the update
    assert not chain.add(update) and type(chain.rejections[0].error) is type(refused.value)


def test_an_adaptive_norm_bound_under_dp_noise_is_refused() -> None:
    from deltaplane.aggregation import build_aggregator

    # its bound would adapt from an exact (un-noised) count of the clients' norms
    with pytest.raises(dp.ConfigError, match="un-noised"):
        build_aggregator(defense="norm_bound:adaptive", dp_noise=1.0, clip=1.0, expected_clients=4)
    inner = dp.Clip(dp.NormBound(dp.FedAvg(), max_norm="adaptive"), clip=1.0)
    with pytest.raises(dp.ConfigError, match="un-noised"):
        dp.DPFedAvg(inner, noise_multiplier=1.0, expected_clients=4)
    # anything but fixed bounds, validation and FedAvg would change the sum's sensitivity
    with pytest.raises(dp.ConfigError, match="cannot sit inside DPFedAvg"):
        dp.DPFedAvg(dp.Clip(dp.TrimmedMean(beta=0.1), clip=1.0), noise_multiplier=1.0, expected_clients=4)
    with pytest.raises(dp.ConfigError, match="cannot sit inside DPFedAvg"):
        dp.DPFedAvg(dp.FedAdam(), clip=1.0, noise_multiplier=1.0, expected_clients=4)
    # Validate skips a bad update without raising: the count would include it and double another's weight
    with pytest.raises(dp.ConfigError, match="cannot sit inside DPFedAvg"):
        dp.DPFedAvg(dp.Clip(dp.Validate(dp.FedAvg()), clip=1.0), noise_multiplier=1.0, expected_clients=2)
    # still fine: a fixed bound under DP, an adaptive one without DP
    build_aggregator(defense="norm_bound:5", dp_noise=1.0, clip="adaptive", expected_clients=40)
    build_aggregator(defense="norm_bound:adaptive", clip=1.0)


def test_noised_rounds_release_only_noised_measurements() -> None:
    from deltaplane.aggregation import build_aggregator

    fractions = set()
    for seed in range(3):
        agg = build_aggregator(
            dp_noise=1.0, clip="adaptive", expected_clients=4, sampling_rate=0.2, seed=seed
        )
        for n in (0.05, 0.2, 0.03):  # the same clients every time: an exact fraction would be 1/3
            agg.add(dp.Delta({"w": torch.tensor([n])}))
        agg.result()
        m = agg.measurements
        assert not {"mean_norm", "clients", "total_weight"} & set(m)  # exact statistics of private updates
        fractions.add(m["clipped_fraction"])
    assert len(fractions) == 3  # released through the noisy count
    fixed = dp.DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=2)
    fixed.add(dp.Delta({"w": torch.tensor([3.0])}))
    fixed.result()
    assert "clipped_fraction" not in fixed.measurements and fixed.measurements["clip"] == 1.0


def test_a_round_without_clients_still_releases_noise_and_spends() -> None:
    acc = dp.PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.2, delta=1e-5)
    agg = dp.DPFedAvg(
        clip="adaptive",
        noise_multiplier=1.0,
        expected_clients=4,
        accountant=acc,
        like={"w": torch.zeros(50_000)},
    )
    out = agg.result()["w"].double()  # Poisson sampling drew nobody
    assert out.std().item() == pytest.approx(agg.sum_noise_multiplier * 0.1 / 4, rel=0.02)
    assert acc.state.steps == 1 and agg.measurements["epsilon"] > 0
    assert agg.clipper.estimator.value != 0.1  # the (noisy) count was released and the clip adapted
    with pytest.raises(dp.DeltaplaneError, match="no client delta"):
        dp.DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=4).result()  # no layout known


def test_remaining_rounds_reaches_the_limit_and_the_budget_exactly() -> None:
    kw = {"noise_multiplier": 1.0, "sampling_rate": 0.05, "delta": 1e-5}
    assert dp.PrivacyAccountant(**kw, budget=100.0).remaining_rounds(limit=7) == 7
    acc = dp.PrivacyAccountant(**kw, budget=epsilon_for(**kw, steps=5))  # exactly five rounds fit
    assert acc.remaining_rounds(limit=5) == 5 and acc.remaining_rounds() == 5
    spent = 0
    with pytest.raises(dp.PrivacyBudgetExceeded):
        while True:
            acc.spend()
            spent += 1
    assert spent == 5 and acc.remaining_rounds() == 0
