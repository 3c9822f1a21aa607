import math

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import build_aggregator


def test_chain_order_and_measurements() -> None:
    agg = build_aggregator(
        aggregator="fedadam", dp_noise=1.0, clip="adaptive", defense="norm_bound:5", expected_clients=40,
        sampling_rate=0.4, expected_version=3,
    )  # fmt: skip
    assert repr(agg).startswith("Validate(FedAdam(DPFedAvg(Clip(NormBound(FedAvg()")
    for i in range(40):
        agg.add(dp.Delta({"w": torch.full((3,), float(i % 5))}), base_version=3)
    agg.result()
    m = agg.measurements
    assert {"epsilon", "noise_std", "clip", "clipped_fraction", "server_step", "accepted"} <= set(m)
    assert m["accepted"] == 40.0 and m["epsilon"] > 0
    assert agg.find(dp.PrivacyAccountant) is None and agg.find(dp.DPFedAvg).accountant.state.steps == 1


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("trimmed_mean:0.2", dp.TrimmedMean), ("median", dp.CoordinateMedian), ("krum:2", dp.Krum),
     ("multi_krum:1", dp.Krum), ("fltrust", dp.FLTrust), ("none", dp.FedAvg)],
)  # fmt: skip
def test_defenses(spec, kind) -> None:
    assert isinstance(build_aggregator(defense=spec).find(kind), kind)


def test_illegal_combinations_are_config_errors() -> None:
    with pytest.raises(dp.ConfigError, match="cannot be combined with DP"):
        build_aggregator(defense="trimmed_mean:0.2", dp_noise=1.0, clip=1.0)
    with pytest.raises(dp.ConfigError, match="needs a clip"):
        build_aggregator(dp_noise=1.0)
    with pytest.raises(dp.ConfigError, match="unknown aggregator"):
        build_aggregator(aggregator="fedsgd")
    with pytest.raises(dp.ConfigError, match="unknown defense"):
        build_aggregator(defense="bulyan")
    with pytest.raises(dp.ConfigError, match="must be a number"):
        build_aggregator(defense="krum:x")
    with pytest.raises(dp.ConfigError, match="epsilon_budget needs DP"):
        build_aggregator(epsilon_budget=1.0)


@pytest.mark.parametrize("noise", [math.nan, -1.0, "1.0"])
def test_a_dp_noise_that_is_not_a_non_negative_number_is_refused(noise) -> None:
    """``dp_noise=nan`` passed the ``< 0`` check and failed the ``> 0`` one: the chain was built with no DP at all
    (no clip, no noise, no accountant) and nothing said so."""
    with pytest.raises(dp.ConfigError, match="dp_noise"):
        build_aggregator(dp_noise=noise, clip=1.0, expected_clients=5)
