"""Distributed DP under SecAgg (``dp_noise`` with ``secagg``): the devices add the noise, the server publishes
the unmasked sum with central DP-FedAvg's noise floor and ε. Checked against independent references: the
sample std of what SecAgg really unmasks, and a fresh dp-accounting accountant."""

from __future__ import annotations

import math

import pytest
import torch

from deltaplane.aggregation.dp import DistributedDP
from deltaplane.aggregation.secagg import SecAggError
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.engine.client import ClientStep, Upload
from deltaplane.engine.config import make_task
from deltaplane.engine.secure import secure_round
from deltaplane.errors import ConfigError
from deltaplane.sim import run_simulation

Z, C = 1.0, 1.0
CFG = RunConfig(
    clients=8, secagg=True, clip=str(C), dp_noise=Z, secagg_min_contributors=4, dp_delta=1e-3, seed=3
)


def _unmasked_sums(
    contributors: int, rounds: int, d: int = 3000, *, floor: int | None = None
) -> torch.Tensor:
    """What SecAgg unmasks (sum = mean · n) when ``contributors`` devices with all-zero updates take part;
    ``floor`` lowers the unmasking floor of SecAgg's devices and server (not the devices' noise, which stays
    calibrated to CFG's m_min) to measure a sum that the floor would refuse."""
    step = ClientStep(CFG, make_task(CFG), base_id="t")
    agg = CFG if floor is None else CFG.replace(secagg_min_contributors=floor)
    zeros = Delta({"w": torch.zeros(d)})
    sums = []
    for rnd in range(1, rounds + 1):
        uploads = [
            Upload(cid, 10, secure=step.distributed_privacy(cid, zeros, rnd)) for cid in range(contributors)
        ]
        mean, _ = secure_round(agg, uploads, rnd)
        sums.append(mean["w"].double() * contributors)
    return torch.cat(sums)


def test_the_unmasked_sum_carries_at_least_z_clip_of_noise_and_less_below_m_min() -> None:
    # 4 rounds × 3000 coordinates = 12,000 draws: the sample std's relative error is ~1/sqrt(2·12000) = 0.65%;
    # 4% tolerance is 6 standard errors
    full = _unmasked_sums(4, rounds=4)  # m_min = 4 contributors
    assert abs(full.mean().item()) < 0.05 * Z * C
    assert full.std().item() >= Z * C * (1 - 0.04)
    with pytest.raises(SecAggError, match="needs 4"):  # one short: never unmasked ...
        _unmasked_sums(3, rounds=1)
    short = _unmasked_sums(3, rounds=4, floor=3)  # ... since its noise is sqrt(3/4) ≈ 0.87 of z·C
    assert short.std().item() < Z * C * 0.92


def test_a_sum_short_of_m_min_is_not_published() -> None:
    agg = DistributedDP(clip=C, noise_multiplier=Z, expected_clients=4, min_contributors=4)
    mean = Delta({"w": torch.full((5,), 0.25)})
    agg.expect_sum(3)
    agg.add(mean)
    assert torch.equal(agg.result()["w"], torch.zeros(5))
    assert agg.measurements["secure_sum_published"] == 0.0
    agg.reset()
    agg.expect_sum(4)
    agg.add(mean)
    assert torch.allclose(agg.result()["w"], torch.full((5,), 0.25))  # sum 1.0 over the fixed m = 4
    assert agg.measurements["secure_sum_published"] == 1.0


def test_epsilon_is_dp_accountings_and_the_central_runs() -> None:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    cfg = RunConfig(
        clients=6, sample_fraction=0.5, rounds=3, secagg=True, clip="1.0", dp_noise=1.2, dp_delta=1e-3,
        secagg_min_contributors=2, dp_noise_source="seeded", local_epochs=1,
    )  # fmt: skip
    distributed = [r.epsilon for r in run_simulation(cfg).rounds]
    central = [
        r.epsilon for r in run_simulation(cfg.replace(secagg=False, secagg_min_contributors=None)).rounds
    ]
    ref = rdp_privacy_accountant.RdpAccountant()
    expected = []
    for _ in range(3):  # q = m/N = 3/6, composed one round at a time
        ref.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.2)))
        expected.append(ref.get_epsilon(1e-3))
    assert distributed == pytest.approx(expected, rel=1e-9)
    assert distributed == central


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"clients": 10, "sample_fraction": 0.3, "secagg_min_contributors": 4}, "exceeds the 3 clients"),
        ({"secagg_min_contributors": 1}, "at least 2"),
        ({"clip": "adaptive"}, "clip"),
        ({"clip": None}, "clip"),
        ({"dp_noise": 0.0, "secagg_min_contributors": 3}, "needs secagg and dp_noise"),
    ],
)
def test_configs_that_cannot_publish_are_refused_up_front(opts, match) -> None:
    base = {"clients": 10, "secagg": True, "clip": "1.0", "dp_noise": 1.0, "dp_delta": 1e-3}
    with pytest.raises(ConfigError, match=match):
        RunConfig(**(base | opts))


def test_the_default_m_min_is_the_secagg_threshold_of_an_expected_round() -> None:
    cfg = RunConfig(clients=20, sample_fraction=0.5, secagg=True, clip="2.0", dp_noise=1.0, dp_delta=1e-3)
    assert cfg.min_contributors() == 7  # 2·10//3 + 1
    assert cfg.device_noise_std() == pytest.approx(1.0 * 2.0 / math.sqrt(7))


def test_a_round_sampling_fewer_than_m_min_devices_unmasks_no_sum(monkeypatch) -> None:
    # the server sees every sum SecAgg unmasks, published or not: one of fewer than m_min devices carries noise
    # below z·clip, which epsilon_vs_server does not allow for. Spied on SecAgg itself, not on the chain.
    import deltaplane.aggregation.secagg as secagg

    unmasked: list[int] = []
    real = secagg.secure_mean

    def spy(deltas, **kwargs):
        unmasked.append(len(deltas))
        return real(deltas, **kwargs)

    monkeypatch.setattr(secagg, "secure_mean", spy)
    cfg = RunConfig(
        clients=12, sample_fraction=0.5, rounds=6, secagg=True, clip="1.0", dp_noise=1.0, dp_delta=1e-3,
        local_epochs=1, seed=1, dp_noise_source="seeded",
    )  # fmt: skip
    rounds = run_simulation(cfg).rounds
    m_min = cfg.min_contributors()  # 5: 2·6//3 + 1
    short = [r for r in rounds if 2 <= r.clients < m_min]
    assert short, "the seed must sample a round of 2..m_min-1 devices for this test to mean anything"
    assert unmasked and min(unmasked) >= m_min
    assert len(unmasked) == sum(r.clients >= m_min for r in rounds)
    assert [r.epsilon for r in rounds] == sorted({r.epsilon for r in rounds})  # every round still spent ε
