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


def test_mixed_dtypes_and_views_against_numpy() -> None:
    """The multi-tensor add promotes every dtype into the float64 sum exactly as a float64 numpy mean does:
    bf16 and fp16 tensors, an integer buffer, an empty tensor, and row views of one stack (what the server's
    batch decoder hands over)."""
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 6, 5, generator=g)
    deltas = [
        dp.Delta(
            {
                "w": stack[i],  # a row view, not a tensor of its own
                "h": torch.randn(7, generator=g).to(torch.bfloat16),
                "f": torch.randn(3, generator=g).to(torch.float16),
                "n": torch.randint(-5, 5, (2,), generator=g),
                "e": torch.empty(0),
            }
        )
        for i in range(4)
    ]
    weights = [2.0, 0.5, 3.0, 1.0]
    agg = dp.FedAvg()
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, weight=w)
    out = agg.result()
    for k in ("w", "h", "f", "n", "e"):
        ref = sum(w * d[k].double().numpy() for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        want = torch.from_numpy(ref).to(deltas[0][k].dtype)
        assert out[k].dtype == deltas[0][k].dtype and torch.equal(out[k], want), k
    assert torch.equal(stack[0], deltas[0]["w"])  # the inputs are left as they were
