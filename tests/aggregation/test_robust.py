import pytest
import torch

import deltaplane as dp


def _d(*v: float) -> dp.Delta:
    return dp.Delta({"w": torch.tensor(v, dtype=torch.float32)})


def test_median_and_trimmed_mean_by_hand() -> None:
    vals = [(1.0, 10.0), (2.0, -1.0), (100.0, 0.0), (3.0, 2.0), (-50.0, 1.0)]
    med, tm = dp.CoordinateMedian(), dp.TrimmedMean(beta=0.2)
    for v in vals:
        med.add(_d(*v))
        tm.add(_d(*v))
    assert med.result()["w"].tolist() == [2.0, 1.0]
    assert tm.result()["w"].tolist() == [
        2.0,
        1.0,
    ]  # drops 1 per side, means the 3 middle: (1+2+3)/3, (0+1+2)/3
    assert not med.streaming and not tm.streaming
    med.add(_d(4.0, 4.0))  # even count -> mean of the two middle values
    assert med.result()["w"].tolist() == [2.5, 1.5]


def test_krum_and_multikrum_pick_the_honest_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    honest = [torch.ones(20) + 0.1 * torch.randn(20, generator=g) for _ in range(7)]
    attackers = [torch.full((20,), -10.0), torch.full((20,), 8.0)]
    krum, multi = dp.Krum(byzantine=2), dp.Krum(byzantine=2, select=None)
    for t in honest + attackers:
        krum.add(dp.Delta({"w": t}))
        multi.add(dp.Delta({"w": t}))
    assert krum.result()["w"].sub(1.0).abs().max() < 0.5
    assert multi.result()["w"].sub(1.0).abs().max() < 0.15
    assert multi.selected == list(range(7))
    small = dp.Krum(byzantine=2)
    for t in honest[:5]:
        small.add(dp.Delta({"w": t}))
    with pytest.raises(dp.DeltaplaneError, match="needs more than 6"):
        small.result()


def test_fltrust_zeroes_opposed_updates_and_rescales() -> None:
    agg = dp.FLTrust()
    agg.set_reference(_d(1.0, 0.0))
    agg.add(_d(10.0, 0.0))  # cos 1, rescaled to |g0| = 1
    agg.add(_d(-100.0, 0.0))  # cos -1 -> trust 0
    agg.add(_d(0.0, 3.0))  # cos 0 -> trust 0
    assert agg.result()["w"].tolist() == [1.0, 0.0]
    assert agg.measurements["zero_trust"] == 2.0
    agg.reset()
    with pytest.raises(dp.DeltaplaneError, match="set_reference"):
        agg.add(_d(1.0, 0.0))


def test_trimmed_mean_validation() -> None:
    with pytest.raises(dp.ConfigError, match=r"beta must be in \[0, 0.5\). Found 0.5"):
        dp.TrimmedMean(beta=0.5)


def test_norm_bound_ignores_a_claimed_weight_of_a_million() -> None:
    from deltaplane.aggregation import build_aggregator

    agg = build_aggregator(defense="norm_bound:1.0")
    for _ in range(9):
        agg.add(_d(0.5, 0.0), weight=30)  # honest clients with 30 samples each
    agg.add(_d(-100.0, 0.0), weight=1e6)  # bounded to (-1, 0), but claims a million samples
    assert agg.result()["w"].tolist() == pytest.approx([(9 * 0.5 - 1.0) / 10, 0.0])
    with pytest.raises(dp.InvalidUpdate, match="weight"):
        dp.NormBound(dp.FedAvg(), max_norm=1.0).add(_d(0.1), weight=-1.0)
