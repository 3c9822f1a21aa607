import math

import pytest
import torch

import deltaplane as dp


def test_weighted_mean_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [
        dp.Delta({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}) for _ in range(5)
    ]
    weights = [10, 3, 0, 7.5, 1]
    agg = dp.FedAvg()
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, weight=w)
    out = agg.result()
    for k in ("w", "b"):
        expected = sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        assert torch.allclose(out[k].double(), expected, atol=1e-7)
        assert out[k].dtype == torch.float32
    assert agg.count == 5
    agg.reset()
    with pytest.raises(dp.DeltaplaneError, match="no client delta"):
        agg.result()


def test_rejects_bad_updates_without_poisoning() -> None:
    agg = dp.FedAvg()
    agg.add(dp.Delta({"w": torch.ones(2)}), weight=1)
    with pytest.raises(dp.InvalidUpdate):
        agg.add(dp.Delta({"w": torch.tensor([math.inf, 0.0])}))
    with pytest.raises(dp.ShapeMismatch):
        agg.add(dp.Delta({"w": torch.ones(3)}))
    with pytest.raises(dp.InvalidUpdate, match="weight"):
        agg.add(dp.Delta({"w": torch.ones(2)}), weight=-1)
    assert agg.result()["w"].tolist() == [1.0, 1.0]


def test_zero_total_weight() -> None:
    agg = dp.FedAvg()
    agg.add(dp.Delta({"w": torch.ones(2)}), weight=0)
    with pytest.raises(dp.DeltaplaneError, match="sum to zero"):
        agg.result()
