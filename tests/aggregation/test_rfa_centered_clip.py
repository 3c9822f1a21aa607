"""The geometric median (RFA) and centered clipping against independent references.

Geometric median: scipy's ``minimize`` of ``Σ wᵢ‖z − xᵢ‖`` (not our Weiszfeld iteration written again), the exact
median in one dimension, the middle one of three collinear points, and the breakdown point: fewer than half
the updates, however large, keep the aggregate near the honest ones. Centered clipping (Karimireddy, He & Jaggi
2021): a plain numpy transcription of the paper's update rule over several rounds that carry the centre, and the
rule's documented properties (``τ = ∞`` is the mean; an update exactly ``τ`` away or at the centre is not
scaled; ``f`` attackers move a round by at most ``L·f·τ/n``), the centre across a server checkpoint.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import deltaplane as dp
from deltaplane.aggregation import (
    CenteredClip,
    CenteredClipState,
    GeometricMedian,
    build_aggregator,
    parse_defense,
)
from deltaplane.aggregation.checkpoint import chain_state, load_chain_state
from deltaplane.codecs.layout import TensorLayout
from deltaplane.errors import IncompatibleDefense, TooFewUpdates


def _feed(rule, rows, weights=None, ids=None) -> np.ndarray:
    for i, r in enumerate(rows):
        if ids is not None:
            rule.identify(ids[i])
        rule.add(
            dp.Delta({"w": torch.tensor(r, dtype=torch.float32)}), 1.0 if weights is None else weights[i]
        )
    out = rule.result()["w"].double().numpy()
    rule.reset()
    return out


def _objective(z, x, w) -> float:
    return float((w * np.linalg.norm(x - z, axis=1)).sum())


# --- geometric median -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_geometric_median_minimises_the_weighted_sum_of_distances_as_scipy_does(seed, weighted) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(7, 4)).astype(np.float32).astype(np.float64)
    x[:2] *= 5  # a spread that makes the median differ from the mean
    claimed = rng.integers(1, 50, size=7).astype(float)
    w = claimed / claimed.sum() if weighted else np.full(7, 1 / 7)
    ref = minimize(
        lambda z: _objective(z, x, w),
        x.mean(axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 40000, "maxfev": 40000},
    )
    for start in GeometricMedian.STARTS:
        got = _feed(
            GeometricMedian(nu=1e-12, max_iter=2000, ftol=0.0, weighted=weighted, start=start), x, claimed
        )
        assert _objective(got, x, w) <= ref.fun * (1 + 1e-7)
        np.testing.assert_allclose(got, ref.x, atol=2e-4)
    # the defaults (ν = 1e-6, stop on relative improvement 1e-6) land within 1e-5 of the minimum's value
    default = _feed(GeometricMedian(weighted=weighted), x, claimed)
    assert _objective(default, x, w) <= ref.fun * (1 + 1e-5)
    assert _objective(x.mean(axis=0) if not weighted else w @ x, x, w) > ref.fun * (1 + 1e-3)  # not the mean


@pytest.mark.parametrize("seed", range(3))
def test_in_one_dimension_the_geometric_median_is_the_median(seed) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_cauchy(size=(9, 1)).astype(np.float32).astype(np.float64)
    got = _feed(GeometricMedian(nu=1e-12, max_iter=5000, ftol=0.0), x)
    assert got[0] == pytest.approx(float(np.median(x)), abs=1e-5)
    # weighted: the weighted median (the value where half the weight lies on each side)
    w = rng.integers(1, 10, size=9).astype(float)
    order = np.argsort(x[:, 0])
    cum = np.cumsum(w[order])
    wmed = x[order][np.searchsorted(cum, cum[-1] / 2), 0]
    if not np.isclose(cum, cum[-1] / 2).any():  # (a tie of half the weight: any point between is a minimiser)
        assert _feed(GeometricMedian(nu=1e-12, max_iter=5000, ftol=0.0, weighted=True), x, w)[0] == (
            pytest.approx(float(wmed), abs=1e-5)
        )


def test_of_three_collinear_points_the_geometric_median_is_the_middle_one() -> None:
    a, b = np.array([1.0, -2.0, 0.5]), np.array([3.0, 1.0, -1.0])
    x = np.stack([a, a + 0.3 * (b - a), b])  # the middle point is not the mean
    got = _feed(GeometricMedian(nu=1e-12, max_iter=5000, ftol=0.0), x)
    np.testing.assert_allclose(got, x[1], atol=1e-5)


@pytest.mark.parametrize("f", [1, 3, 5])
def test_fewer_than_half_huge_updates_keep_the_geometric_median_near_the_honest_ones(f) -> None:
    """The breakdown point of ½: ``f < n/2`` attackers sending 1e30 move the mean to ~1e29 and the median
    (default parameters) no farther from the honest mean than the honest updates' own spread."""
    rng = np.random.default_rng(f)
    n = 11
    honest = 1.0 + rng.normal(scale=0.1, size=(n - f, 6))
    bad = np.full((f, 6), 1e30) * rng.choice([-1, 1], size=(f, 6))
    got = _feed(GeometricMedian(), np.vstack([bad, honest]))
    spread = np.linalg.norm(honest - honest.mean(axis=0), axis=1).max()
    assert np.linalg.norm(got - honest.mean(axis=0)) < 2 * spread
    # from the mean, the stop on relative improvement cannot see how far off it is (g ~ 1e30 everywhere near)
    from_mean = _feed(GeometricMedian(start="mean"), np.vstack([bad, honest]))
    assert np.linalg.norm(from_mean - honest.mean(axis=0)) > 1e6
    assert np.linalg.norm(np.vstack([bad, honest]).mean(axis=0)) > 1e28  # what the mean does


def test_geometric_median_does_not_depend_on_arrival_order_nor_hear_claimed_weights_by_default() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5))
    ids = [f"client-{i}" for i in range(6)]
    want = _feed(GeometricMedian(), x, ids=ids)
    for perm in ([5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        got = _feed(
            GeometricMedian(), x[perm], weights=[10.0**i for i in range(6)], ids=[ids[i] for i in perm]
        )
        assert np.array_equal(got, want)


def test_geometric_median_refuses_a_round_of_zero_weights_and_bad_parameters() -> None:
    rule = GeometricMedian(weighted=True)
    with pytest.raises(TooFewUpdates, match="weight 0"):
        _feed(rule, np.ones((3, 2)), weights=[0.0, 0.0, 0.0])
    for bad in ({"nu": 0}, {"nu": -1.0}, {"max_iter": 0}, {"ftol": 1.0}, {"weighted": 1}):
        with pytest.raises(dp.ConfigError):
            GeometricMedian(**bad)


def stacked_weiszfeld(x: np.ndarray, *, nu: float, iterations: int) -> tuple[np.ndarray, float]:
    """RFA's smoothed Weiszfeld as :class:`GeometricMedian` computed it until 2026-12-07: the updates stacked
    into one float64 (n, d) matrix, whole-row norms, ``iterations`` steps from the coordinate-wise lower
    median, equal weights; (the aggregate in float32, the objective ``g``)."""
    xd = torch.tensor(x, dtype=torch.float32).double()
    alpha = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64)
    z = xd.median(dim=0).values
    dist = (xd - z).norm(dim=1)
    for _ in range(iterations):
        beta = alpha / dist.clamp_min(nu)
        z = (beta @ xd) / beta.sum()
        dist = (xd - z).norm(dim=1)
    return z.float().double().numpy(), float(alpha @ dist)


@pytest.mark.parametrize("block", [1 << 16, 7, 1])
@pytest.mark.parametrize("seed", range(3))
def test_geometric_median_in_column_blocks_is_the_stacked_computation_to_float_rounding(
    seed, block, monkeypatch
) -> None:
    """The median walks the updates in column blocks (no float64 copy of them); a block's partial sums of
    squares round differently from one norm over a row, so the objective is the stacked computation's to
    float64 rounding, and the aggregate within 1e-6 of it (the documented tolerance): the objective is flat at
    its minimum, so 25 steps carry a rounding of ``g`` into ``z`` at about its square root (measured: 6e-8 on
    updates of order 1 to 20; 1 to 3 steps give the same float32 values)."""
    monkeypatch.setattr(GeometricMedian, "block", block)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, 50)).astype(np.float32).astype(np.float64)
    x[:3] += 20.0  # a minority far off: the steps move z well away from the start
    want, want_g = stacked_weiszfeld(x, nu=1e-6, iterations=25)
    rule = GeometricMedian(max_iter=25, ftol=0.0)
    got = _feed(rule, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert rule.measurements["geomed_objective"] == pytest.approx(want_g, rel=1e-13)


@pytest.mark.parametrize("rule", ["GeometricMedian(max_iter=2)", "CenteredClip(tau=1.0, iterations=2)"])
def test_the_iterative_rules_hold_no_float64_copy_of_the_updates(rule) -> None:
    """Peak memory while a rule iterates: each stacked the updates (float32) and held a float64 copy with
    float64 temporaries of its size, ~7× the updates (10 updates of 1M values, 38 MiB: 250+ MiB more); now
    a column block at a time, under the size of the updates themselves."""
    code = textwrap.dedent("""
        import torch
        import deltaplane as dp
        from deltaplane.aggregation import CenteredClip, GeometricMedian
        def peak_mb():  # VmHWM: ru_maxrss would carry the (bigger) pytest parent's peak across exec
            return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        rule = RULE
        for i in range(10):
            rule.add(dp.Delta({"w": torch.randn(1_000_000, generator=g) + (5.0 if i < 2 else 0.0)}))
        before = peak_mb()
        rule.result()
        print(before, peak_mb())
    """).replace("RULE", rule)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors go back to the OS (RSS is live)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    held_mb = 10 * 4_000_000 / 2**20  # the updates, float32
    assert float(out[1]) - float(out[0]) < held_mb, (out, held_mb)


# --- centered clipping ----------------------------------------------------------------------------------------


def karimireddy_cc(rounds: list[np.ndarray], tau: float, iterations: int) -> list[np.ndarray]:
    """The paper's rule, transcribed: ``v ← v + (1/n) Σᵢ (xᵢ − v) min(1, τ/‖xᵢ − v‖)``, ``L`` times a round,
    each round starting from the last round's ``v`` (0 before the first)."""
    v = np.zeros(rounds[0].shape[1])
    out = []
    for x in rounds:
        for _ in range(iterations):
            u = x - v
            norms = np.linalg.norm(u, axis=1)
            scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
            v = v + (u * scale[:, None]).mean(axis=0)
        out.append(v.copy())
    return out


@pytest.mark.parametrize("block", [1 << 16, 7, 1])
@pytest.mark.parametrize(("tau", "iterations"), [(0.5, 1), (2.0, 3), (0.1, 5)])
def test_centered_clip_follows_the_papers_update_rule_round_after_round(
    tau, iterations, block, monkeypatch
) -> None:
    monkeypatch.setattr(CenteredClip, "block", block)  # one block, and column by column
    rng = np.random.default_rng(int(tau * 10) + iterations)
    rounds = [
        (rng.normal(loc=0.3 * r, scale=1.0, size=(6, 5)) * rng.choice([1, 1, 1, 20], size=(6, 1)))
        .astype(np.float32)
        .astype(np.float64)
        for r in range(4)
    ]
    want = karimireddy_cc(rounds, tau, iterations)
    rule = CenteredClip(tau=tau, iterations=iterations)
    for x, w in zip(rounds, want, strict=True):
        np.testing.assert_allclose(_feed(rule, x, weights=list(range(1, 7))), w, rtol=1e-6, atol=1e-6)
    assert rule.measurements["clipped"] > 0  # the radius binds on these rounds


def stacked_centered_clip(x: np.ndarray, centre: np.ndarray, *, tau: float, iterations: int) -> np.ndarray:
    """Centered clipping as :class:`CenteredClip` computed it until 2026-12-07: the updates stacked into one
    float64 (n, d) matrix, whole-row norms, ``iterations`` steps from ``centre``; the new centre in float64."""
    xd = torch.tensor(x, dtype=torch.float32).double()
    v = torch.tensor(centre, dtype=torch.float64)
    for _ in range(iterations):
        u = xd - v
        norms = u.norm(dim=1)
        far = norms > tau
        scale = torch.where(far, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
        v = v + (u * scale[:, None]).mean(dim=0)
    return v.numpy()


@pytest.mark.parametrize("block", [1 << 16, 7, 1])
@pytest.mark.parametrize("seed", range(3))
def test_centered_clip_in_column_blocks_is_the_stacked_computation_to_float_rounding(
    seed, block, monkeypatch
) -> None:
    """Centered clipping walks the updates in column blocks (no float64 copy of them); a block's partial sums of
    squares round differently from one norm over a row, so the centre it keeps (float64) is the stacked
    computation's to float64 rounding, the aggregate (float32) to float32 rounding."""
    monkeypatch.setattr(CenteredClip, "block", block)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, 50)).astype(np.float32).astype(np.float64)
    x[:3] += 20.0  # a minority far off: clipped at every iteration
    centre = rng.normal(size=50)
    want = stacked_centered_clip(x, centre, tau=2.0, iterations=3)
    rule = CenteredClip(tau=2.0, iterations=3, state=CenteredClipState(torch.tensor(centre)))
    got = _feed(rule, x)
    np.testing.assert_allclose(rule.state.center.numpy(), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert rule.measurements["clipped"] >= 3


def test_centered_clip_with_an_infinite_radius_is_the_mean_whatever_the_centre() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4))
    rule = CenteredClip(
        tau=math.inf, state=CenteredClipState(center=torch.full((4,), 7.0, dtype=torch.float64))
    )
    np.testing.assert_allclose(_feed(rule, x), x.astype(np.float32).mean(axis=0), rtol=1e-6)


def test_centered_clip_does_not_scale_an_update_exactly_tau_away_nor_one_at_the_centre() -> None:
    # centre 0, τ = 5: (3, 4) is exactly τ away (kept whole), (0, 0) is the centre (no 0/0), (30, 40) is
    # clipped to (3, 4): the mean of (3,4), (0,0), (3,4)
    rule = CenteredClip(tau=5.0)
    got = _feed(rule, np.array([[3.0, 4.0], [0.0, 0.0], [30.0, 40.0]]))
    np.testing.assert_allclose(got, [2.0, 8 / 3], rtol=1e-6)
    assert rule.measurements["clipped"] == 1


@pytest.mark.parametrize("iterations", [1, 3])
def test_attackers_move_a_centered_clip_round_by_at_most_l_f_tau_over_n(iterations) -> None:
    rng = np.random.default_rng(iterations)
    n, f, tau = 10, 3, 0.5
    honest = rng.normal(scale=0.05, size=(n - f, 8))
    bad = np.full((f, 8), 1e30)
    centre = torch.tensor(honest.mean(axis=0), dtype=torch.float64)
    alone = _feed(
        CenteredClip(tau=tau, iterations=iterations, state=CenteredClipState(centre.clone())),
        np.vstack([honest, np.tile(honest.mean(axis=0), (f, 1))]),
    )
    attacked = _feed(
        CenteredClip(tau=tau, iterations=iterations, state=CenteredClipState(centre.clone())),
        np.vstack([honest, bad]),
    )
    assert np.linalg.norm(attacked - alone) <= iterations * f * tau / n + 1e-6


def test_the_centre_survives_a_server_checkpoint_and_another_models_is_refused() -> None:
    rng = np.random.default_rng(3)
    rounds = [rng.normal(loc=1.0, size=(4, 6)) for _ in range(3)]

    def chain():
        return build_aggregator(defense="centered_clip(0.5, iterations=2)", aggregator="fedadam")

    def close(agg, x):
        for i, r in enumerate(x):
            agg.add(dp.Delta({"w": torch.tensor(r, dtype=torch.float32)}), client_id=str(i))
        out = agg.result()["w"].clone()
        agg.reset()
        return out

    control, resumed = chain(), chain()
    want = [close(control, x) for x in rounds]
    close(resumed, rounds[0])
    snapshot = chain_state(resumed)
    fresh = chain()
    layout = {"w": TensorLayout(shape=(6,), dtype=torch.float32)}
    load_chain_state(fresh, snapshot, layout=layout)
    assert [torch.equal(close(fresh, x), w) for x, w in zip(rounds[1:], want[1:], strict=True)] == [
        True,
        True,
    ]
    # the centre is what carries: without it round 2 differs
    assert not torch.equal(close(chain(), rounds[1]), want[1])
    other = chain()
    with pytest.raises(dp.ConfigError, match="centered clipping state.*another model"):
        load_chain_state(other, snapshot, layout={"w": TensorLayout(shape=(7,), dtype=torch.float32)})
    blind = chain()  # restored without the model's layout at hand: refused at the next close, by name
    load_chain_state(blind, snapshot)
    blind.add(dp.Delta({"v": torch.ones(6)}), client_id="0")
    with pytest.raises(
        dp.ShapeMismatch, match=r"centered clipping state: tensors\['w'\].*centre belongs to another"
    ):
        blind.result()
    bad = CenteredClipState(center=torch.tensor([float("nan")] * 6, dtype=torch.float64))
    with pytest.raises(dp.ConfigError, match="NaN"):
        CenteredClip(state=bad)


def test_centered_clip_refuses_bad_parameters() -> None:
    for bad in ({"tau": 0}, {"tau": -1.0}, {"tau": float("nan")}, {"iterations": 0}, {"iterations": True}):
        with pytest.raises(dp.ConfigError):
            CenteredClip(**bad)


# --- the spec grammar and the drivers' refusals ---------------------------------------------------------------


def test_both_rules_are_specs_that_build_what_they_say() -> None:
    g = parse_defense("geometric_median(nu=1e-5, max_iter=8, weighted=true, start=mean)")
    assert (g.nu, g.max_iter, g.ftol, g.weighted, g.start) == (1e-5, 8, 1e-6, True, "mean")
    assert repr(parse_defense("geometric_median")) == (
        "GeometricMedian(nu=1e-06, max_iter=100, ftol=1e-06, weighted=False, start='median')"
    )
    c = parse_defense("centered_clip(2.5, iterations=3)")
    assert (c.tau, c.iterations) == (2.5, 3) and repr(parse_defense("centered_clip")) == (
        "CenteredClip(tau=3.0, iterations=1)"
    )
    # the default radius is the measured one (benchmarks/centered_clip_tau.py), not the untuned 10
    assert CenteredClip().tau == 3.0
    for spec in (
        "geometric_median(max_iter=1.5)",
        "centered_clip(iterations=2.0)",
        "centered_clip(tau=big)",
        "geometric_median(weighted=1)",
        "centered_clip(radius=1)",
        "geometric_median(start=zero)",
    ):
        with pytest.raises(dp.ConfigError):
            parse_defense(spec)


@pytest.mark.parametrize("spec", ["geometric_median", "centered_clip(1.0)"])
def test_both_rules_are_refused_with_dp_noise_and_secagg_and_pass_a_sparsifying_codec(spec) -> None:
    from deltaplane.aggregation import check_defense_codec
    from deltaplane.engine import RunConfig

    with pytest.raises(IncompatibleDefense, match="DP-FedAvg calibrates noise to a clipped"):
        build_aggregator(defense=spec, dp_noise=1.0, clip=1.0, expected_clients=4)
    with pytest.raises(ValueError, match="secagg hides individual updates"):
        RunConfig(clients=4, secagg=True, clip="2.0", defense=spec)
    check_defense_codec(parse_defense(spec), "topk(0.01) | quant(bits=8)")  # not coordinate-wise
    RunConfig(clients=3, defense=spec, codec="topk(0.05)")  # a round of any size closes
