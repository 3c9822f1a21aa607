import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import parse_defense


def _d(*v: float) -> dp.Delta:
    return dp.Delta({"w": torch.tensor(v, dtype=torch.float32)})


def test_median_and_trimmed_mean_by_hand() -> None:
    vals = [(1.0, 10.0), (2.0, -1.0), (100.0, 0.0), (3.0, 2.0), (-50.0, 1.0)]
    med, tm = dp.CoordinateMedian(bucket=1), dp.TrimmedMean(beta=0.2)
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


def _meamed_reference(x: np.ndarray, b: int) -> np.ndarray:
    """Xie et al. 2018's mean around median, straight from its definition: per coordinate, sort the values by
    their distance to the median and average the n − b nearest (a loop, nothing shared with the class)."""
    n, d = x.shape
    out = np.empty(d)
    for j in range(d):
        col = x[:, j]
        med = np.median(col)
        out[j] = col[np.argsort(np.abs(col - med), kind="stable")[: n - b]].mean()
    return out


@pytest.mark.parametrize(("n", "b"), [(20, 4), (7, 2), (10, 0), (5, 4)])
def test_mean_around_median_matches_its_definition(n, b) -> None:
    rng = np.random.default_rng(n + b)
    x = rng.standard_t(df=2, size=(n, 300))  # heavy tails: the nearest set is not the trimmed one
    agg = parse_defense(f"median({b})")
    for row in x:
        agg.add(dp.Delta({"w": torch.tensor(row, dtype=torch.float32)}))
    got = agg.result()["w"].double().numpy()
    np.testing.assert_allclose(got, _meamed_reference(x.astype(np.float32).astype(np.float64), b), atol=1e-5)
    if b == 0:  # nothing left out: the mean
        np.testing.assert_allclose(got, x.mean(0), atol=1e-5)


def test_mean_around_median_bounds_b_outliers_and_is_unbiased_where_the_median_is_not() -> None:
    rng = np.random.default_rng(3)
    honest = rng.exponential(1.0, size=(16, 500))  # skewed, like non-IID update coordinates
    poisoned = np.vstack([honest, np.full((4, 500), 1e6)])
    agg, med = parse_defense("median(byzantine=4)"), parse_defense("median(bucket=1)")
    for row in poisoned:
        for a in (agg, med):
            a.add(dp.Delta({"w": torch.tensor(row, dtype=torch.float32)}))
    out, plain = agg.result()["w"].numpy(), med.result()["w"].numpy()
    assert out.max() < 10  # four values of 1e6 per coordinate never enter the mean
    # the honest values' mean is 1; the plain median of this skewed sample (pushed up by the outliers) is not
    assert abs(float(out.mean()) - 1.0) < abs(float(plain.mean()) - 1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dp.CoordinateMedian(),
        lambda: dp.TrimmedMean(beta=0.2, bucket=2),
        lambda: dp.CoordinateMedian(bucket=3),
    ],
    ids=["median", "trimmed_mean-bucket2", "median-bucket3"],
)
def test_buckets_follow_client_ids_not_arrival_order(make) -> None:
    """The same (client id, update) pairs in any arrival order give the same result bit for bit, round after
    round (the bucket generator continues across rounds); ids sort alike on every driver: `3` in process and on
    Flower, `client-3` on the HTTP federation (digit runs compare as numbers)."""
    g = torch.Generator().manual_seed(0)
    updates = {i: _d(*torch.randn(50, generator=g).tolist()) for i in range(11)}

    def rounds(order: list[int], name) -> list[torch.Tensor]:
        agg = dp.Validate(make())
        out = []
        for _ in range(3):
            agg.reset()
            for i in order:
                assert agg.add(updates[i], client_id=name(i))
            out.append(agg.result()["w"])
        return out

    arrival = list(range(11))
    shuffled = torch.randperm(11, generator=g).tolist()
    want = rounds(arrival, str)
    for order, name in (
        (shuffled, str),
        (arrival[::-1], lambda i: f"client-{i}"),
        (shuffled, lambda i: f"d{i}"),
    ):
        got = rounds(order, name)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # without ids (an aggregator fed directly) the buckets follow the arrival order: the orders above matter
    bare = make()
    for i in shuffled:
        bare.add(updates[i])
    assert not torch.equal(bare.result()["w"], want[0])


@pytest.mark.parametrize(
    "spec",
    [
        "median",
        "trimmed_mean(0.2)",
        "multi_krum(1)",
        "geometric_median",
        "centered_clip",
        "flame(noise=0)",
        "foolsgold",
        "sign_vote",
        "fltrust",
    ],
)
def test_float64_values_beyond_float32_are_refused_before_they_reach_a_robust_rule(spec: str) -> None:
    """A float64 update can hold finite values that float32 (the rules' working precision) cannot: 1e39 passed
    every finiteness check and became inf in the flattened row, so FoolsGold released NaN and FLAME's HDBSCAN
    raised a ValueError (the round was lost). Refused on arrival; the honest updates aggregate as without it."""
    rule = parse_defense(spec)
    if isinstance(rule, dp.FLTrust):
        rule.set_reference(dp.Delta({"w": torch.ones(3, dtype=torch.float64)}))
    agg = dp.Validate(rule)
    honest = [
        dp.Delta({"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (1 + i / 10)}) for i in range(6)
    ]
    huge = dp.Delta({"w": torch.tensor([1e39, 2.0, 3.0], dtype=torch.float64)})
    assert huge.is_finite()  # finite in float64: only the cast to float32 overflows
    assert not agg.add(huge, client_id="attacker")
    assert isinstance(agg.rejections[0].error, dp.InvalidUpdate)
    assert "float32" in str(agg.rejections[0].error)
    for i, d in enumerate(honest):
        assert agg.add(d, client_id=str(i))
    out = agg.result()
    assert out.is_finite()
    assert out["w"].dtype == torch.float64
    assert float(out["w"].abs().max()) < 10.0


@pytest.mark.parametrize(
    "spec",
    [
        "median",
        "median(bucket=1)",
        "trimmed_mean(0.2)",
        "krum(1)",
        "multi_krum(1)",
        "geometric_median",
        "centered_clip(0.1)",
        "flame",
        "foolsgold",
        "norm_bound(1.0)",
        "norm_bound(1.0, noise=0.01)",
        "sign_vote",
    ],
)
def test_integer_tensors_take_the_median_whatever_arrives_first(spec):
    """Robust rules filled integer tensors (BatchNorm's num_batches_tracked delta) from the first update to
    arrive: an attacker arriving first set the count to 10**9, and the result depended on arrival order.
    NormBound averaged them (the norm is taken over floats only: 10**9/7 got through) and SignVote took the
    first update's."""
    import numpy as np

    from deltaplane.aggregation import build_aggregator

    counts = [10**9, 1, 2, 2, 3, 1, 2]
    updates = [
        dp.Delta({"w": torch.full((4,), 0.01 * (i + 1)), "n": torch.tensor([c], dtype=torch.int64)})
        for i, c in enumerate(counts)
    ]
    expected = int(np.sort(counts)[(len(counts) - 1) // 2])  # numpy's lower median: 2
    results = []
    for order in (range(7), reversed(range(7)), [3, 0, 6, 1, 5, 2, 4]):
        agg = build_aggregator(defense=spec)
        for i in order:
            agg.add(updates[i], 1.0, client_id=f"c{i}")
        results.append(int(agg.result()["n"][0]))
    assert results == [expected] * 3


def test_fltrust_takes_the_integer_median_of_the_trusted_updates_not_the_references():
    """FLTrust filled integer tensors from the server's reference (its few root batches), whatever the clients
    counted; a client it does not trust (score 0) must not vote on the count either."""
    ref = dp.Delta({"w": torch.tensor([1.0, 0.0]), "n": torch.tensor([99], dtype=torch.int64)})
    honest = [(torch.tensor([1.0, 0.1 * i]), c) for i, c in enumerate([3, 5, 4, 4])]
    liar = (torch.tensor([-1.0, 0.0]), 10**9)  # opposite direction: trust 0
    updates = [liar, *honest]
    expected = int(np.sort([c for _, c in honest])[(len(honest) - 1) // 2])  # numpy's lower median: 4
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        agg = dp.FLTrust()
        agg.set_reference(ref)
        for i in order:
            w, c = updates[i]
            agg.add(dp.Delta({"w": w, "n": torch.tensor([c], dtype=torch.int64)}))
        results.append(int(agg.result()["n"][0]))
    assert results == [expected] * 3


@pytest.mark.parametrize("bad", [complex(float("nan"), 1.0), complex(1.0, float("inf"))])
def test_complex_nan_or_inf_is_not_finite(bad):
    # a complex tensor is checked on both parts: nan+1j and 1+inf·j used to pass every finiteness check
    d = dp.Delta({"w": torch.tensor([1.0]), "z": torch.tensor([1 + 1j, bad], dtype=torch.complex64)})
    assert dp.Delta({"z": torch.tensor([1 + 1j])}).is_finite()
    assert not d.is_finite()
    with pytest.raises(dp.InvalidUpdate, match="tensor 'z' holds NaN or Inf"):
        d.check_finite()


@pytest.mark.parametrize(
    "rule",
    [
        "fedavg",
        "median",
        "trimmed_mean(0.2)",
        "krum(1)",
        "geometric_median",
        "centered_clip",
        "flame",
        "foolsgold",
        "sign_vote",
        "fltrust",
    ],
)
def test_every_rule_refuses_complex_updates(rule):
    # every rule's input check is one refuse_complex: a typed refusal naming the tensor, not a torch error
    # or a silently dropped imaginary part
    d = dp.Delta({"w": torch.ones(3), "z": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)})
    if rule == "fedavg":
        agg = dp.FedAvg()
    else:
        from deltaplane.aggregation.robust import FLTrust

        agg = parse_defense(rule)
        if isinstance(agg, FLTrust):
            agg.set_reference(dp.Delta({"w": torch.ones(3), "z": torch.zeros(2)}))
        if hasattr(agg, "identify"):
            agg.identify("c0")
    with pytest.raises(dp.InvalidUpdate, match="tensor 'z' is complex64: .* aggregates real tensors only"):
        agg.add(d, 1.0)
