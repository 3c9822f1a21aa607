import math

import numpy as np
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
        if not deltas[0][k].is_floating_point():  # an integer mean rounds to the nearest (numpy's rint)
            ref = np.rint(ref)
        want = torch.from_numpy(ref).to(deltas[0][k].dtype)
        assert out[k].dtype == deltas[0][k].dtype and torch.equal(out[k], want), k
    assert torch.equal(stack[0], deltas[0]["w"])  # the inputs are left as they were


@pytest.mark.parametrize(
    ("dtype", "uploads"),
    [
        (torch.float32, [(0.5, 1.0), (1e10, 1e300), (-0.25, 3.0)]),  # weight × value overflows
        (torch.float64, [(0.5, 1.0), (1e308, 1.0), (1e308, 1.0), (-0.25, 3.0)]),  # the second 1e308 overflows
        (torch.float64, [(0.5, 1.0), (1.0, 1e308), (1.0, 1e308), (-0.25, 3.0)]),  # the total weight overflows
    ],
)
def test_an_update_that_would_overflow_the_float64_sum_is_refused(dtype, uploads) -> None:
    """Finite weights times finite values can overflow the float64 running sums (or the total weight): the mean
    was released as inf, or NaN (inf/inf). The update that would overflow is refused before it touches the sums;
    the mean of the accepted ones is exact (numpy)."""
    agg = dp.Validate(dp.FedAvg())
    accepted = [
        (v, w) for v, w in uploads if agg.add(dp.Delta({"w": torch.tensor([v], dtype=dtype)}), weight=w)
    ]
    assert len(accepted) == len(uploads) - 1
    assert isinstance(agg.rejections[0].error, dp.InvalidUpdate) and "overflow" in str(
        agg.rejections[0].error
    )
    out = float(agg.result()["w"])
    assert math.isfinite(out)
    assert out == pytest.approx(np.average([v for v, _ in accepted], weights=[w for _, w in accepted]))


def test_an_update_of_no_tensors_aggregates_to_none() -> None:
    """A layout with nothing in it (every tensor kept on the device) was a RuntimeError from the multi-tensor
    add; it is the empty mean, as in the robust rules."""
    agg = dp.FedAvg()
    agg.add(dp.Delta({}), weight=2.0)
    agg.add(dp.Delta({}), weight=1.0)
    assert dict(agg.result()) == {}
    assert agg.count == 2


def test_integer_tensors_are_rounded_to_the_nearest_not_truncated():
    """FedAvg cast the float64 mean of integer tensors (BatchNorm's num_batches_tracked delta) back with a bare
    cast: 2.75 became 2 and -2.75 became -2. It rounds to the nearest integer, half to even, as numpy's rint."""
    counts = [[2, -2, 1, 7, 3], [3, -3, 2, 0, 2], [3, -3, 2, 0, 3], [3, -3, 0, 0, 2]]
    weights = [1.0, 1.0, 1.0, 1.0]
    agg = dp.FedAvg()
    for c, w in zip(counts, weights, strict=True):
        agg.add(dp.Delta({"n": torch.tensor(c, dtype=torch.int64)}), weight=w)
    expected = np.rint(np.average(np.array(counts, dtype=np.float64), axis=0, weights=weights))
    assert agg.result()["n"].tolist() == expected.astype(np.int64).tolist() == [3, -3, 1, 2, 2]
