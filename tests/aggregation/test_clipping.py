import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import ConstantClip, QuantileClip


def test_fixed_clip_scales_only_large_updates() -> None:
    agg = dp.Clip(dp.FedAvg(), clip=2.0)
    agg.add(dp.Delta({"w": torch.tensor([6.0, 8.0])}))  # norm 10 -> scaled to norm 2
    agg.add(dp.Delta({"w": torch.tensor([0.0, 1.0])}))  # norm 1 -> untouched
    out = agg.result()["w"]
    assert torch.allclose(out, torch.tensor([0.6, 1.3]))
    m = agg.measurements
    assert m["clip"] == 2.0 and m["clipped_fraction"] == 0.5 and m["mean_norm"] == pytest.approx(5.5)
    assert m["clients"] == 2.0  # inner FedAvg measurements merged in
    assert isinstance(agg.estimator, ConstantClip)


def test_adaptive_clip_tracks_the_median_norm() -> None:
    rng = np.random.default_rng(0)
    est = QuantileClip(initial=0.01, target_quantile=0.5, learning_rate=0.2)
    agg = dp.Clip(dp.FedAvg(), clip=est)
    for _ in range(150):
        agg.reset()
        for n in rng.lognormal(mean=np.log(3.0), sigma=0.3, size=50):
            agg.add(dp.Delta({"w": torch.tensor([float(n), 0.0])}))
        agg.result()
    # median of lognormal(log 3, 0.3) is 3.0
    assert est.value == pytest.approx(3.0, rel=0.1)
    assert est.state.rounds == 150


def test_float_and_string_promotion() -> None:
    assert isinstance(dp.Clip(clip="adaptive").estimator, QuantileClip)
    assert dp.Clip(clip="0.5").estimator.value == 0.5
    with pytest.raises(dp.ConfigError, match="clip must be positive. Found -1.0"):
        dp.Clip(clip=-1.0)
    with pytest.raises(dp.ConfigError, match="target_quantile"):
        QuantileClip(target_quantile=1.5)


def test_norm_bound_is_clip_under_its_robustness_name() -> None:
    agg = dp.NormBound(dp.FedAvg(), max_norm=1.0)
    agg.add(dp.Delta({"w": torch.tensor([0.0, -5.0])}))
    assert agg.result()["w"].tolist() == [0.0, -1.0]
    assert agg.streaming


def test_adaptive_norm_bound_starts_from_the_first_rounds_median_norm() -> None:
    # the old start (0.1, Andrew et al.'s DP default) shrank norm-3 updates ~30x for the first rounds
    rng = np.random.default_rng(1)
    agg = dp.NormBound(dp.FedAvg(), max_norm="adaptive")
    first = rng.lognormal(mean=np.log(3.0), sigma=0.3, size=21)
    for n in first:
        agg.add(dp.Delta({"w": torch.tensor([float(n), 0.0])}))
    assert agg.result()["w"][0].item() == pytest.approx(first.mean(), rel=1e-6)  # round 1: nothing bounded
    assert "clip" not in agg.measurements and agg.measurements["clipped_fraction"] == 0.0
    assert agg.estimator.value == pytest.approx(float(np.median(first)))
    agg.reset()
    agg.add(dp.Delta({"w": torch.tensor([0.0, 100.0])}))  # a boosted update in round 2 is bounded
    assert agg.result()["w"][1].item() == pytest.approx(float(np.median(first)), rel=1e-6)
    assert agg.measurements["clip"] == pytest.approx(float(np.median(first)))


def test_a_start_from_raw_norms_is_refused_under_dp() -> None:
    with pytest.raises(dp.ConfigError, match="public initial clip"):
        QuantileClip(initial=None, count_noise_std=2.0)
    from deltaplane.aggregation import build_aggregator

    with pytest.raises(dp.ConfigError, match="un-noised"):  # DPFedAvg refuses an adaptive bound inside it
        build_aggregator(defense="norm_bound(adaptive)", dp_noise=1.0, clip=1.0, expected_clients=10)
