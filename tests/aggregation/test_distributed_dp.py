"""Distributed DP under SecAgg (``dp_noise`` with ``secagg``): the devices add the noise, the server publishes
the unmasked sum with central DP-FedAvg's noise floor and ε. Checked against independent references: the
sample std of what SecAgg really unmasks, and a fresh dp-accounting accountant."""

from __future__ import annotations

import math

import numpy as np
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


def test_epsilon_counts_the_sampling_as_revealed_between_q_1_and_the_sampled_central_runs() -> None:
    """A sampled distributed-DP run counts its sampling as revealed (the devices' noise shares reveal who took
    part, tests/aggregation/test_dp_adjacency.py): each round, with probability q = 1/2, a Gaussian of
    multiplier z the adversary knows it faces, whose Rényi divergence is log((1 − q) + q·e^((α−1)·α/(2z²)))/(α−1)
    (composed here with numpy, converted by dp-accounting). So its ε is below q = 1's (what it reported before)
    and above the central run's, amplified by hidden sampling at q = 1/2."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    cfg = RunConfig(
        clients=6, sample_fraction=0.5, rounds=3, secagg=True, clip="1.0", dp_noise=1.2, dp_delta=1e-3,
        secagg_min_contributors=2, dp_noise_source="seeded", local_epochs=1,
    )  # fmt: skip
    rounds = run_simulation(cfg).rounds
    distributed = [r.epsilon for r in rounds]
    central_rounds = run_simulation(cfg.replace(secagg=False, secagg_min_contributors=None)).rounds
    central = [r.epsilon for r in central_rounds]
    ref = rdp_privacy_accountant.RdpAccountant()
    unsampled = rdp_privacy_accountant.RdpAccountant()
    orders = np.array(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    revealed_curve = np.log(0.5 + 0.5 * np.exp((orders - 1) * orders / (2 * 1.2**2))) / (orders - 1)
    expected, at_q_1, revealed = [], [], []
    for t in range(1, 4):  # q = m/N = 3/6, composed one round at a time
        ref.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.2)))
        expected.append(ref.get_epsilon(1e-3))
        unsampled.compose(dp_accounting.GaussianDpEvent(1.2))
        at_q_1.append(unsampled.get_epsilon(1e-3))
        revealed.append(rdp_privacy_accountant.compute_epsilon(orders, t * revealed_curve, 1e-3)[0])
    assert central == pytest.approx(expected, rel=1e-9)
    assert distributed == pytest.approx(revealed, rel=1e-9)
    assert all(c < d < u for c, d, u in zip(central, distributed, at_q_1, strict=True))
    # the run's result carries epsilon_vs_server too: the same figure, revealed sampling gives who took part
    assert [r.epsilon_vs_server for r in rounds] == pytest.approx(revealed, rel=1e-9)
    assert all(r.epsilon_vs_server is None for r in central_rounds)  # central DP: no such figure


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


# -- the ring range: its per-device clip must not bind on the noised values ---------------------------------------
# z = 2, C = 1, m_min = 2: σ_d = √2 ≈ 1.414, so C + 6σ_d ≈ 9.49, above the default range 8 (C + 4.9σ_d)
WIDE = {
    "clients": 4,
    "secagg": True,
    "clip": "1.0",
    "dp_noise": 2.0,
    "dp_delta": 1e-3,
    "secagg_min_contributors": 2,
}


def test_a_ring_range_that_would_clip_the_noised_values_is_refused_naming_the_least_range() -> None:
    with pytest.raises(ConfigError, match=r"secagg_range=8 would clip .* at least clip \+ 6·σ_d = 9\.49"):
        RunConfig(**WIDE, secagg_range=8.0)
    assert RunConfig(**WIDE, secagg_range=9.49).secagg_range == 9.49  # the quoted least range passes
    assert RunConfig(**(WIDE | {"dp_noise": 0.5}), secagg_range=4.0).secagg_range == 4.0  # C + 6·0.354 = 3.13


def test_a_ring_range_left_out_is_sized_so_the_clip_does_not_bind() -> None:
    """The default 8 stays where it is wide enough (results unchanged); under distributed DP with more noise it
    grows to C + 6σ_d, and a changed copy (replace) is sized again for its own noise."""
    auto = RunConfig(**WIDE)
    assert auto.secagg_range == 9.49 and "secagg_range" not in auto.model_fields_set
    assert auto.replace(dp_noise=0.5).secagg_range == 8.0
    assert auto.replace(dp_noise=3.0).secagg_range == pytest.approx(13.73)
    assert RunConfig(clients=4, secagg=True).secagg_range == 8.0  # no distributed DP: the plain default
    assert RunConfig.from_mapping(auto.to_sections(), source="t").secagg_range == 9.49  # its YAML round-trips


def test_a_config_with_an_auto_sized_range_runs_and_publishes() -> None:
    cfg = RunConfig(**WIDE, rounds=1, local_epochs=1, seed=2, dp_noise_source="seeded")
    (row,) = run_simulation(cfg).rounds
    assert row.epsilon > 0 and math.isfinite(row.test_accuracy)


@pytest.mark.parametrize(("sigmas", "binds"), [(None, False), (3.0, True)], ids=["enforced", "3-sigma"])
def test_with_the_enforced_range_the_ring_clip_does_not_bind_on_the_devices_noised_values(
    sigmas, binds
) -> None:
    """Independent of the formula: the device's own noise (ClientStep.distributed_privacy) on a coordinate at
    the clip's extreme ±C (the most any clipped value can be), encoded into the ring by SecAgg's RingEncoding;
    a code at either end of the ring is a clipped value. 4·10⁶ draws at the enforced range: at 6σ the expected
    number is ~0.008, so none; the same draws at C + 3σ_d clip thousands (the check can see a binding clip)."""
    from deltaplane.aggregation.secagg import RingEncoding

    cfg = RunConfig(
        **(WIDE | {"dp_noise": 3.0}), dp_noise_source="seeded"
    )  # C + 6σ_d = 13.73; 8 is C + 3.3σ_d
    sigma = cfg.device_noise_std()
    width = cfg.secagg_range if sigmas is None else C + sigmas * sigma
    step = ClientStep(cfg, make_task(cfg), base_id="t")
    enc = RingEncoding(bits=cfg.secagg_bits, clip_range=width)
    top = (1 << cfg.secagg_bits) - 1
    clipped = draws = 0
    for rnd in range(1, 5):
        noise = step.distributed_privacy(0, Delta({"w": torch.zeros(1_000_000)}), rnd)["w"]
        assert abs(noise.std().item() - sigma) < 0.01 * sigma  # the device's noise, as calibrated
        extreme = noise + torch.where(torch.arange(noise.numel()) % 2 == 0, C, -C)  # half at +C, half at -C
        codes = enc.encode(Delta({"w": extreme}), 1, np.random.default_rng(rnd))[:-1]
        clipped += int(((codes == 0) | (codes == top)).sum())
        draws += codes.size
    assert draws == 4_000_000
    if binds:
        assert clipped > 1000
    else:
        assert clipped == 0, f"{clipped} of {draws} noised values clipped at secagg_range={width}"
