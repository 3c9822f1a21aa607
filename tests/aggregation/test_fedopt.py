import math

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import ServerOptimizerState


def _round(agg, values):
    agg.reset()
    for v in values:
        agg.add(dp.Delta({"w": torch.tensor(v, dtype=torch.float32)}))
    return agg.result()["w"].double()


def test_fedadam_matches_reddi_algorithm_by_hand() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    agg = dp.FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    m, v = torch.zeros(2, dtype=torch.float64), torch.full((2,), tau**2, dtype=torch.float64)
    for rnd in ([[1.0, -2.0], [3.0, 0.0]], [[-1.0, 1.0], [0.5, 0.5]]):
        d = torch.tensor(rnd, dtype=torch.float64).mean(0)
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        expected = lr * m / (v.sqrt() + tau)
        assert torch.allclose(_round(agg, rnd), expected, atol=1e-6)
    assert agg.state.step == 2
    # result is computed once per round even if read twice (the optimizer steps once)
    assert agg.result() is agg.result() and agg.state.step == 2


def test_yogi_adagrad_momentum_by_hand() -> None:
    d1, d2 = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    tau = 0.01
    yogi = dp.FedYogi(lr=1.0, beta1=0.0, beta2=0.5, tau=tau)
    ada = dp.FedAdagrad(lr=1.0, tau=tau)
    mom = dp.FedAvgM(lr=0.5, momentum=0.9)
    v_y = torch.full((2,), tau**2, dtype=torch.float64)
    v_a = v_y.clone()
    m_m = torch.zeros(2, dtype=torch.float64)
    for d in (d1, d2):
        v_y = v_y - 0.5 * d * d * torch.sign(v_y - d * d)
        v_a = v_a + d * d
        m_m = 0.9 * m_m + d
        assert torch.allclose(_round(yogi, [d.tolist()]), d / (v_y.sqrt() + tau), atol=1e-6)
        assert torch.allclose(_round(ada, [d.tolist()]), d / (v_a.sqrt() + tau), atol=1e-6)
        assert torch.allclose(_round(mom, [d.tolist()]), 0.5 * m_m, atol=1e-6)


def test_state_checkpoint_round_trip_resumes_identically() -> None:
    a = dp.FedAdam(lr=0.05)
    _round(a, [[1.0, 2.0]])
    b = dp.FedAdam(lr=0.05, state=ServerOptimizerState.from_state_dict(a.state.state_dict()))
    assert torch.equal(_round(a, [[0.5, -1.0]]), _round(b, [[0.5, -1.0]]))


def test_fedadam_converges_on_a_quadratic() -> None:
    # clients pull x towards their own optimum; the server should reach the mean optimum
    targets = torch.tensor([[1.0, -3.0], [3.0, 1.0], [2.0, 2.0]])
    x = torch.zeros(2)
    agg = dp.FedAdam(lr=0.1)
    for _ in range(300):
        agg.reset()
        for t in targets:
            agg.add(dp.Delta({"x": 0.5 * (t - x)}))
        x = x + agg.result()["x"]
    assert torch.allclose(x, targets.mean(0), atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -1.0}, "lr must be"), ({"beta1": 1.5}, "beta1 must be"), ({"tau": 0.0}, "tau must be")],
)
def test_validation_messages(kwargs, match) -> None:
    with pytest.raises(dp.ConfigError, match=match):
        dp.FedAdam(**kwargs)
    with pytest.raises(dp.ConfigError, match="optimizer must be one of"):
        dp.FedOpt(optimizer="sgd")


def test_layout_change_between_rounds_is_refused() -> None:
    agg = dp.FedAdam()
    _round(agg, [[1.0, 2.0]])
    with pytest.raises(dp.ShapeMismatch):
        _round(agg, [[1.0, 2.0, 3.0]])
    assert math.isfinite(agg.measurements["server_update_norm"])


@pytest.mark.parametrize("opt", [dp.FedAdam, dp.FedYogi, dp.FedAdagrad])
def test_a_float64_update_whose_square_overflows_is_refused_and_the_state_stays_restorable(opt) -> None:
    """Δ² in float64 overflows from |Δ| ≈ 1.34e154 on: v became inf, the coordinate froze at a zero step for
    good, and the snapshot taken after the round was refused at restore ("v holds NaN or Inf"). The update is
    refused on arrival (Validate skips it, the round goes on), and a mean that overflows anyway (fed directly
    past the per-update bound) refuses the round and leaves the moments as they were."""
    from deltaplane.aggregation.checkpoint import chain_state, load_chain_state

    huge = dp.Delta({"w": torch.tensor([1e155, 1.0], dtype=torch.float64)})
    chain = dp.Validate(opt(lr=0.1))
    assert not chain.add(huge, client_id="big")
    assert isinstance(chain.rejections[0].error, dp.InvalidUpdate) and "2^500" in str(
        chain.rejections[0].error
    )
    assert chain.add(dp.Delta({"w": torch.tensor([0.5, 1.0], dtype=torch.float64)}), client_id="ok")
    out = chain.result()["w"]
    assert bool(torch.isfinite(out).all()) and float(out[0]) > 0  # the coordinate still learns
    load_chain_state(dp.Validate(opt(lr=0.1)), chain_state(chain))  # the snapshot restores
    # an aggregate past the bound (the inner mean fed directly): the round is refused, nothing committed
    agg = opt(lr=0.1)
    agg.inner.add(huge)
    with pytest.raises(dp.InvalidUpdate, match=r"overflows .*v\['w'\]"):
        agg.result()
    assert agg.state.step == 0 and agg.state.v == {} and agg.state.m == {}
    # float32 updates cannot reach it (3.4e38 squared is 1.2e77), and server momentum squares nothing
    agg = dp.FedAvgM()
    agg.add(huge)
    assert bool(torch.isfinite(agg.result()["w"]).all())
