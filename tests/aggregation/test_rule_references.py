"""Server-side aggregation rules against independent references, on identical inputs.

Server optimizers: a numpy transcription of Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2
(``v₋₁ = τ²``, no bias correction) and Flower's own strategies (``flwr.server.strategy.FedAdam``, ``FedYogi``,
``FedAdagrad``, ``FedAvgM``) run over several rounds of weighted client updates. Flower starts ``v`` at 0 and its
FedAdam multiplies ``η`` by ``√(1−β₂^(t+1))/(1−β₁^(t+1))`` (its round ``t`` counted from 1): started from the same
moments deltaplane's Yogi, Adagrad and momentum give Flower's steps, and its Adam gives Flower's moments and
Flower's step over that factor.

Robust rules: Krum / multi-Krum written from Blanchard et al. 2017 (exact pairwise distances), scipy's
``trim_mean`` and numpy's ``median`` (Yin et al. 2018), Flower's ``aggregate_krum``, ``aggregate_median`` and
``aggregate_trimmed_avg``, on random inputs, ties, duplicates, a large common offset, values near float32's
limit, claimed weights and the smallest rounds each rule closes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.server.strategy import FedAdam as FlowerFedAdam
from flwr.server.strategy import FedAvgM as FlowerFedAvgM
from flwr.server.strategy import FedYogi as FlowerFedYogi
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from scipy.stats import trim_mean

import deltaplane as dp
from deltaplane.aggregation import ServerOptimizerState, SignVote, build_aggregator

SHAPES = {"a": (7,), "b": (2, 3)}
ROUNDS = 5


def _rounds(seed: int, clients: int = 4) -> list[list[tuple[dict[str, np.ndarray], int]]]:
    """``ROUNDS`` rounds of (client delta, example count); deltas of different scales per round."""
    rng = np.random.default_rng(seed)
    return [
        [
            (
                {k: rng.normal(scale=0.1 * (r + 1), size=s) for k, s in SHAPES.items()},
                int(rng.integers(1, 50)),
            )
            for _ in range(clients)
        ]
        for r in range(ROUNDS)
    ]


def _mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {k: sum(n * d[k] for d, n in updates) / total for k in SHAPES}


def reddi_algorithm2(rounds, opt: str, eta: float, b1: float, b2: float, tau: float) -> list[dict]:
    """Reddi et al. 2021, Algorithm 2, transcribed: ``Δₜ`` the example-weighted mean client delta,
    ``mₜ = β₁mₜ₋₁ + (1−β₁)Δₜ``, ``vₜ`` per optimizer from ``v₋₁ = τ²``, ``xₜ₊₁ = xₜ + η mₜ/(√vₜ + τ)``."""
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, tau**2) for k, s in SHAPES.items()}
    steps = []
    for updates in rounds:
        delta = _mean(updates)
        step = {}
        for k, d in delta.items():
            m[k] = b1 * m[k] + (1 - b1) * d
            if opt == "adagrad":
                v[k] = v[k] + d**2
            elif opt == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            else:
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            step[k] = eta * m[k] / (np.sqrt(v[k]) + tau)
        steps.append(step)
    return steps


def _deltaplane_steps(agg, rounds) -> list[dict]:
    steps = []
    for updates in rounds:
        agg.reset()
        for d, n in updates:
            agg.add(dp.Delta({k: torch.from_numpy(a) for k, a in d.items()}), weight=n)
        steps.append({k: t.numpy() for k, t in agg.result().items()})
    return steps


def _close(got: list[dict], want: list[dict], rtol: float = 1e-9) -> None:
    for rnd, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=1e-12, err_msg=f"round {rnd}, {k}")


OPTIMIZERS = {
    "adam": lambda **kw: dp.FedAdam(**kw),
    "yogi": lambda **kw: dp.FedYogi(**kw),
    "adagrad": lambda beta2, **kw: dp.FedAdagrad(**kw),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(("eta", "b1", "b2", "tau"), [(0.1, 0.9, 0.99, 1e-3), (1.0, 0.0, 0.5, 0.05)])
def test_fedopt_follows_reddi_algorithm_2_over_rounds(opt, eta, b1, b2, tau) -> None:
    rounds = _rounds(seed=1)
    if opt == "adagrad":
        b2 = 0.0
    want = reddi_algorithm2(rounds, opt, eta, b1, b2, tau)
    _close(_deltaplane_steps(OPTIMIZERS[opt](lr=eta, beta1=b1, beta2=b2, tau=tau), rounds), want)


@pytest.mark.parametrize(
    ("name", "opt", "b1"),
    [("fedadam", "adam", 0.9), ("fedyogi", "yogi", 0.9), ("fedadagrad", "adagrad", 0.0)],
)
def test_the_factorys_server_optimizers_follow_algorithm_2_at_their_defaults(name, opt, b1) -> None:
    # the chain a run configuration builds (Validate outermost): β₂ = 0.99, τ = 10⁻³, FedAdagrad without momentum
    rounds = _rounds(seed=6)
    want = reddi_algorithm2(rounds, opt, 0.3, b1, 0.99, 1e-3)
    _close(_deltaplane_steps(build_aggregator(aggregator=name, lr=0.3), rounds), want)


def _fit_results(weights: list[np.ndarray], updates) -> list:
    """Flower FitRes for clients that send ``weights + delta`` (Flower strategies take full weights)."""
    ok = Status(code=Code.OK, message="")
    return [
        (
            None,
            FitRes(
                ok, ndarrays_to_parameters([w + d[k] for w, k in zip(weights, SHAPES, strict=True)]), n, {}
            ),
        )
        for d, n in updates
    ]


def _flower_steps(strategy, rounds, weights: list[np.ndarray]) -> list[dict]:
    steps = []
    for rnd, updates in enumerate(rounds, start=1):
        params, _ = strategy.aggregate_fit(rnd, _fit_results(weights, updates), [])
        new = parameters_to_ndarrays(params)
        steps.append({k: n - w for k, n, w in zip(SHAPES, new, weights, strict=True)})
        weights = new
    return steps


def _zero_moments() -> ServerOptimizerState:
    """Flower's start: ``m`` and ``v`` zero (deltaplane and the paper start ``v`` at ``τ²``)."""
    zeros = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    return ServerOptimizerState(m=dict(zeros), v={k: z.clone() for k, z in zeros.items()})


@pytest.mark.parametrize(
    ("opt", "flower"), [("yogi", FlowerFedYogi), ("adagrad", FlowerFedAdagrad), ("adam", FlowerFedAdam)]
)
def test_fedopt_takes_flowers_steps_from_flowers_start(opt, flower) -> None:
    rounds = _rounds(seed=2)
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=s) for s in SHAPES.values()]
    kw = {"initial_parameters": ndarrays_to_parameters(weights), "eta": eta, "tau": tau}
    if opt == "adagrad":  # Flower's FedAdagrad has no momentum (β₁ = 0) and no β₂
        b1, b2 = 0.0, 0.0
    else:
        kw |= {"beta_1": b1, "beta_2": b2}
    strategy = flower(**kw)
    theirs = _flower_steps(strategy, rounds, weights)
    agg = OPTIMIZERS[opt](lr=eta, beta1=b1, beta2=b2, tau=tau, state=_zero_moments())
    ours = _deltaplane_steps(agg, rounds)
    if opt == "adam":  # Flower's FedAdam scales η by its bias correction; the moments are the same
        for k, m, v in zip(SHAPES, strategy.m_t, strategy.v_t, strict=True):
            np.testing.assert_allclose(agg.state.m[k].numpy(), m, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(agg.state.v[k].numpy(), v, rtol=1e-9, atol=1e-15)
        for t, step in enumerate(ours, start=1):
            factor = np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            for k in SHAPES:
                step[k] = step[k] * factor
    _close(ours, theirs, rtol=1e-7)  # Flower's steps are differences of full weights (cancellation)


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.9), (0.7, 0.5), (0.5, 0.0)])
def test_server_momentum_and_server_lr_take_flowers_fedavgm_steps(lr, momentum) -> None:
    rounds = _rounds(seed=4)
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=s) for s in SHAPES.values()]
    strategy = FlowerFedAvgM(
        initial_parameters=ndarrays_to_parameters(weights), server_learning_rate=lr, server_momentum=momentum
    )
    theirs = _flower_steps(strategy, rounds, weights)
    ours = _deltaplane_steps(
        dp.FedAvgM(lr=lr, momentum=momentum) if momentum else build_aggregator(server_lr=lr), rounds
    )
    _close(ours, theirs, rtol=1e-7)


# -- robust rules ------------------------------------------------------------------------------------------


def krum_reference(x: np.ndarray, f: int, m: int) -> tuple[np.ndarray, list[int]]:
    """Blanchard et al. 2017: score each update by the sum of squared distances (exact differences, float64) to
    its ``n − f − 2`` nearest others; average the ``m`` best (ties: the lower index)."""
    x = x.astype(np.float64)
    n = len(x)
    d = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    scores = [np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)]
    kept = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    return x[kept].mean(axis=0), kept


def _rule_out(rule, rows: np.ndarray, ids: list[int] | None = None, weights=None) -> np.ndarray:
    rule.reset()
    order = list(range(len(rows))) if ids is None else ids
    for i in order:
        if ids is not None:
            rule.identify(str(i))
        rule.add(
            dp.Delta({"w": torch.tensor(rows[i], dtype=torch.float32)}),
            1.0 if weights is None else weights[i],
        )
    return rule.result()["w"].double().numpy()


def _random_rows(seed: int, n: int, d: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, d)).astype(np.float32)
    k = int(rng.integers(0, n // 3 + 1))  # a few far attackers, and a duplicated update
    rows[:k] += rng.normal(scale=20.0, size=(k, d)).astype(np.float32)
    rows[-1] = rows[-2]
    return rows


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "f"), [(3, 0), (5, 1), (9, 2), (12, 3)])
def test_krum_and_multi_krum_match_the_paper_and_flower(seed, n, f) -> None:
    rows = _random_rows(seed, n)
    weights = np.random.default_rng(seed).integers(1, 1000, size=n).astype(float)
    for select in (1, None, 2):
        m = n - f if select is None else select
        want, kept = krum_reference(rows, f, m)
        rule = dp.Krum(byzantine=f, select=select)
        np.testing.assert_allclose(_rule_out(rule, rows, weights=weights), want, rtol=1e-6, atol=1e-6)
        # the kept updates (of two identical ones, either: their exact tie is broken by rounding)
        assert sorted(map(tuple, rows[rule.selected])) == sorted(map(tuple, rows[kept]))
    flower = aggregate_krum([([r.astype(np.float64)], 1) for r in rows], num_malicious=f, to_keep=0)
    np.testing.assert_allclose(krum_reference(rows, f, 1)[0], flower[0], rtol=1e-6)


def test_krum_scores_updates_sharing_a_large_common_part_by_their_distances() -> None:
    # six updates a common 10⁴-scale vector apart by ~10⁻³: the Gram identity on the raw rows cancels to
    # rounding noise (float64 ε · ‖x‖² ≈ 10⁻⁵ against distances of ~10⁻³) and chose another update than the paper
    rng = np.random.default_rng(0)
    base = rng.normal(size=1000) * 1e4
    rows = np.array([base + rng.normal(size=1000) * 1e-3 * (1 if i < 4 else 5) for i in range(6)], np.float32)
    rows = np.vstack([rows, (base + 1e8).astype(np.float32)])  # and a far attacker, which moves the mean
    for n in (6, 7):
        rule = dp.Krum(byzantine=1)
        got = _rule_out(rule, rows[:n])
        want, kept = krum_reference(rows[:n], 1, 1)
        assert rule.selected == kept
        np.testing.assert_array_equal(got, want)


def test_krum_breaks_a_tie_by_sender_not_by_arrival_order() -> None:
    # 0, ±1, ±2 on a line (f = 1, two neighbours): 0, 1 and −1 all score 2. The pick must not depend on which
    # update the network delivered first, or two drivers of one round publish different models
    rows = np.array([[0.0], [1.0], [-1.0], [2.0], [-2.0]], np.float32)
    outs = set()
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 2, 0, 3, 4]):
        outs.add(float(_rule_out(dp.Krum(byzantine=1), rows, ids=order)[0]))
    assert outs == {float(krum_reference(rows, 1, 1)[0][0])} == {0.0}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 5, 10, 11])
def test_trimmed_mean_and_median_match_scipy_numpy_and_flower(seed, n) -> None:
    rows = (
        _random_rows(seed, n)
        if n > 2
        else np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)
    )
    rows[:, :3] = np.round(rows[:, :3])  # ties within a coordinate
    weights = np.random.default_rng(seed).integers(1, 1000, size=n).astype(float)
    as_flower = [([r.astype(np.float64)], 1) for r in rows]
    for beta in (0.0, 0.1, 0.2, 0.3, 0.45):
        want = trim_mean(rows.astype(np.float64), beta, axis=0)
        got = _rule_out(dp.TrimmedMean(beta=beta), rows, weights=weights)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(aggregate_trimmed_avg(as_flower, beta)[0], want, rtol=1e-12)
    want = np.median(rows.astype(np.float64), axis=0)
    np.testing.assert_allclose(
        _rule_out(dp.CoordinateMedian(bucket=1), rows, weights=weights), want, rtol=1e-6
    )
    np.testing.assert_allclose(aggregate_median(as_flower)[0], want, rtol=1e-12)


def test_norm_bound_is_the_unweighted_mean_of_the_bounded_updates() -> None:
    rows = _random_rows(7, 8)
    weights = np.random.default_rng(7).integers(1, 10**6, size=8).astype(float)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    want = (rows * np.minimum(1.0, 2.0 / norms)[:, None]).mean(axis=0)
    np.testing.assert_allclose(_rule_out(dp.NormBound(max_norm=2.0), rows, weights=weights), want, rtol=1e-6)


BIG = np.float32(3.0e38)


@pytest.mark.parametrize(
    ("make", "rows"),
    [
        (lambda: dp.CoordinateMedian(bucket=1), [[BIG], [BIG], [1.0], [BIG]]),
        (lambda: dp.CoordinateMedian(bucket=2), [[BIG]] * 6),
        (lambda: dp.TrimmedMean(beta=0.0), [[BIG], [BIG], [-1.0]]),
        (lambda: dp.TrimmedMean(beta=0.2, bucket=2), [[BIG], [BIG], [BIG], [BIG], [0.0]]),
        (lambda: dp.Krum(byzantine=0, select=None), [[BIG], [BIG], [BIG]]),
    ],
    ids=["median", "median-buckets", "trimmed-mean", "trimmed-mean-buckets", "multi-krum"],
)
def test_finite_updates_near_float32s_limit_give_a_finite_aggregate(make, rows) -> None:
    # each rule's result is a mean or median of finite float32 values, so it fits float32; summed in float32
    # two values of 3·10³⁸ made ±inf, which the downlink then refused (a round lost) or the model took
    rule = make()
    out = _rule_out(rule, np.array(rows, np.float32), ids=list(range(len(rows))))
    assert np.isfinite(out).all() and abs(out[0]) <= float(BIG)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dp.Krum(byzantine=1),
        lambda: dp.Krum(byzantine=2, select=None),
        lambda: dp.CoordinateMedian(byzantine=2),
        lambda: dp.CoordinateMedian(),
    ],
)
def test_a_rule_closes_from_its_min_updates_on_and_refuses_one_fewer(make) -> None:
    rule = make()
    rows = np.random.default_rng(0).normal(size=(rule.min_updates, 4)).astype(np.float32)
    assert np.isfinite(_rule_out(rule, rows)).all()
    if rule.min_updates > 1:
        with pytest.raises(dp.DeltaplaneError):
            _rule_out(rule, rows[:-1])


@pytest.mark.parametrize("seed", range(4))
def test_breakdown_points_keep_the_aggregate_within_the_honest_range(seed) -> None:
    """Below each rule's documented breakdown point the attackers, however far, leave the result inside the
    honest updates' coordinate range (Krum: one of the honest updates)."""
    rng = np.random.default_rng(seed)
    n = 11
    honest = rng.normal(size=(n, 6))
    lo, hi = honest.min(axis=0), honest.max(axis=0)

    def attacked(bad: int) -> np.ndarray:
        rows = honest.copy()
        rows[:bad] = rng.choice([-1, 1], size=(bad, 6)) * 1e30
        return rows.astype(np.float32)

    cases = [
        (dp.CoordinateMedian(bucket=1), (n - 1) // 2),  # the plain median: fewer than half
        (dp.TrimmedMean(beta=0.2), 2),  # ⌊βn⌋ per side
        (dp.CoordinateMedian(byzantine=3), 3),  # mean around median: b
        (dp.Krum(byzantine=4), 4),  # n > 2f + 2
    ]
    for rule, bad in cases:
        out = _rule_out(rule, attacked(bad))
        assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all(), repr(rule)


@pytest.mark.parametrize(
    "defense",
    [
        "krum(1)",
        "multi_krum(1)",
        "median",
        "trimmed_mean(0.2, bucket=2)",
        "geometric_median",
        "geometric_median(weighted=true)",
        "centered_clip(0.5, iterations=2)",
    ],
)
def test_a_chain_gives_one_aggregate_whatever_order_the_updates_arrive_in(defense) -> None:
    # the HTTP service folds uploads in as they arrive; the in-process drivers and Flower in device order. Through
    # the chain every driver builds (Validate tells the rule each sender), the round's model must not differ
    rows = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0], [0.0, 1.0]], np.float32)
    outs = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        chain = build_aggregator(defense=defense)
        for i in order:
            assert chain.add(dp.Delta({"w": torch.from_numpy(rows[i])}), client_id=f"client-{i}")
        outs.append(chain.result()["w"])
    assert all(torch.equal(outs[0], o) for o in outs[1:]), outs


@pytest.mark.parametrize(("beta", "bucket"), [(0.1, 1), (0.2, 1), (0.25, 1), (0.3, 2), (0.45, 3), (0.01, 1)])
def test_a_trimmed_mean_trims_one_a_side_from_its_min_updates_on(beta, bucket) -> None:
    # below min_updates ⌊β·n⌋ = 0: the rule is the plain mean (scipy's trim_mean agrees), which defends nothing
    rule = dp.TrimmedMean(beta=beta, bucket=bucket)
    rows = -(-rule.min_updates // bucket)
    assert int(beta * rows) == 1 and int(beta * (-(-(rule.min_updates - 1) // bucket))) == 0
    for n, trimmed in ((rule.min_updates, 1.0), (rule.min_updates - 1, 0.0)):
        _rule_out(rule, np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32))
        assert rule.measurements["trimmed_per_side"] == trimmed


def test_a_run_whose_rounds_are_too_small_to_trim_is_refused_with_the_reason() -> None:
    from deltaplane.engine import RunConfig

    with pytest.raises(ValueError, match="needs at least 5 updates a round.*trim one a side.*trains 3"):
        RunConfig(clients=3, defense="trimmed_mean(0.2)")
    RunConfig(clients=5, defense="trimmed_mean(0.2)")
    RunConfig(clients=3, defense="trimmed_mean(0.0)")  # β = 0: the plain mean, as asked


@pytest.mark.parametrize("seed", range(4))
def test_fltrust_matches_cao_et_al(seed) -> None:
    """Cao et al. 2021, Algorithm 2 (server side): ``TSᵢ = ReLU(cos(gᵢ, g₀))``, each update rescaled to ``‖g₀‖``,
    the result ``Σ TSᵢ (‖g₀‖/‖gᵢ‖) gᵢ / Σ TSᵢ``; claimed weights play no part."""
    rng = np.random.default_rng(seed)
    g0 = rng.normal(size=9)
    rows = np.vstack([g0 * rng.uniform(0.1, 5) + rng.normal(scale=0.8, size=9) for _ in range(6)])
    rows[:2] = -rows[:2] * 30  # opposed, boosted: trust 0
    x = rows.astype(np.float32).astype(np.float64)
    cos = x @ g0 / (np.linalg.norm(x, axis=1) * np.linalg.norm(g0))
    ts = np.maximum(cos, 0.0)
    want = (ts[:, None] * x * (np.linalg.norm(g0) / np.linalg.norm(x, axis=1))[:, None]).sum(0) / ts.sum()
    rule = dp.FLTrust()
    rule.set_reference(dp.Delta({"w": torch.tensor(g0, dtype=torch.float32)}))
    for r, w in zip(rows, rng.integers(1, 10**5, size=6), strict=True):
        rule.add(dp.Delta({"w": torch.tensor(r, dtype=torch.float32)}), weight=float(w))
    np.testing.assert_allclose(rule.result()["w"].double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_sign_vote_matches_bernstein_et_al_on_dense_updates(seed) -> None:
    """signSGD with majority vote (Bernstein et al. 2019): ``sign(Σᵢ sign(gᵢ))``, scaled by the median over
    clients of each update's mean absolute value; a tie of votes (an even split) gives 0."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(6, 11)).astype(np.float32)
    rows[:3, 0], rows[3:, 0] = 1.0, -1.0  # an even split on coordinate 0
    gamma = np.median(np.abs(rows.astype(np.float64)).mean(axis=1))
    want = gamma * np.sign(np.sign(rows).sum(axis=0))
    got = _rule_out(SignVote(), rows, weights=rng.integers(1, 10**5, size=6).astype(float))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 0.0


def test_multi_krum_never_averages_more_than_the_updates_sure_to_be_honest() -> None:
    # select=m above n − f took an attacker into the average (m = n: every update, the plain mean); a round of
    # n averages at most its n − f best, and a rule asked for m needs m + f updates a round up front
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(6, 50)).astype(np.float32)
    rows[0] += 1e6  # one attacker, f = 1
    rule = dp.Krum(byzantine=1, select=6)
    got = _rule_out(rule, rows)
    want, kept = krum_reference(rows, 1, 5)
    assert 0 not in rule.selected and rule.selected == kept
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got).max() < 10
    assert dp.Krum(byzantine=1, select=6).min_updates == 7
    assert dp.Krum(byzantine=2, select=None).min_updates == 7  # n > 2f + 2 alone


@pytest.mark.parametrize(
    "make",
    [
        lambda: dp.FedAvg(),
        lambda: dp.Krum(byzantine=1),
        lambda: dp.TrimmedMean(beta=0.2, bucket=1),
        lambda: dp.CoordinateMedian(bucket=1),
    ],
)
def test_a_rule_without_enough_updates_says_so_with_its_own_error(make) -> None:
    # the service answers it with 400 and its name; before, a bare DeltaplaneError that named nothing to catch
    from deltaplane.errors import TooFewUpdates

    rule = make()
    with pytest.raises(TooFewUpdates, match="nothing to aggregate"):
        rule.result()
    if isinstance(rule, dp.Krum):
        with pytest.raises(TooFewUpdates, match="needs more than 4"):
            _rule_out(dp.Krum(byzantine=1), np.zeros((4, 3), np.float32))
