import re

import pytest
import typer
from typer.testing import CliRunner

from deltaplane.aggregation import epsilon_for
from deltaplane.commands.aggregation import register


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a second command keeps typer from collapsing the group
    register(app)
    return app


def test_privacy_epsilon_and_noise_round_trip() -> None:
    runner = CliRunner()
    out = runner.invoke(
        _app(), ["privacy", "epsilon", "-z", "1.0", "-q", "0.01", "-T", "100", "--delta", "1e-5"]
    )
    assert out.exit_code == 0, out.output
    eps = float(re.search(r"ε = ([0-9.]+)", out.output).group(1))
    assert eps == round(epsilon_for(noise_multiplier=1.0, sampling_rate=0.01, steps=100, delta=1e-5), 4)
    out = runner.invoke(_app(), ["privacy", "noise", "-e", "8", "-q", "1.0", "-T", "40", "--delta", "1e-3"])
    assert out.exit_code == 0, out.output
    z = float(re.search(r"z = ([0-9.]+)", out.output).group(1))
    assert abs(z - 3.2893) < 1e-3
    assert epsilon_for(noise_multiplier=z + 1e-4, sampling_rate=1.0, steps=40, delta=1e-3) <= 8.0


def test_bad_method_is_a_usage_error() -> None:
    out = CliRunner().invoke(
        _app(), ["privacy", "epsilon", "-z", "1", "-q", "0.1", "-T", "5", "--method", "gdp"]
    )
    assert out.exit_code == 2 and "is not one of" in out.output and "rdp" in out.output


def test_ranges_are_checked_at_the_edge() -> None:
    """q = 1.5 used to print ε = 96.1; a value outside its range is a usage error in the user's words."""
    runner = CliRunner()
    for args, words in (
        (["-z", "1", "-q", "1.5", "-T", "5"], "must be in (0, 1]; got 1.5"),
        (["-z", "1", "-q", "0", "-T", "5"], "must be in (0, 1]; got 0"),
        (["-z", "0", "-q", "0.1", "-T", "5"], "--noise"),
        (["-z", "1", "-q", "0.1", "-T", "0"], "--rounds"),
        (["-z", "1", "-q", "0.1", "-T", "5", "--delta", "1"], "--delta"),
    ):
        out = runner.invoke(_app(), ["privacy", "epsilon", *args])
        assert out.exit_code == 2 and words in out.output, (args, out.output)


def test_privacy_json_output() -> None:
    import json

    out = CliRunner().invoke(_app(), ["privacy", "epsilon", "-z", "1", "-q", "0.2", "-T", "100", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["epsilon"] == epsilon_for(noise_multiplier=1.0, sampling_rate=0.2, steps=100, delta=1e-5)
    assert (doc["rounds"], doc["sampling_rate"], doc["method"]) == (100, 0.2, "rdp")
    out = CliRunner().invoke(_app(), ["privacy", "noise", "-e", "4", "-q", "0.2", "-T", "100", "--json"])
    z = json.loads(out.output)["noise_multiplier"]
    assert epsilon_for(noise_multiplier=z, sampling_rate=0.2, steps=100, delta=1e-5) <= 4.0 + 1e-9


def test_privacy_epsilon_is_what_a_dp_run_reports_fixed_or_adaptive() -> None:
    import torch

    import deltaplane as dp

    out = CliRunner().invoke(_app(), ["privacy", "epsilon", "-z", "1.0", "-q", "0.2", "-T", "6"])
    assert out.exit_code == 0, out.output
    assert "Poisson sampling" in out.output
    eps = float(re.search(r"ε = ([0-9.]+)", out.output).group(1))
    for clip in (1.0, "adaptive"):
        acc = dp.PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.2, delta=1e-5)
        agg = dp.DPFedAvg(clip=clip, noise_multiplier=1.0, expected_clients=4, accountant=acc)
        for _ in range(6):
            agg.reset()
            agg.add(dp.Delta({"w": torch.ones(2)}))
            agg.result()
        assert round(agg.measurements["epsilon"], 4) == eps


def test_impossible_schedules_are_usage_errors() -> None:
    for args, msg in [
        (["-q", "1.5", "-T", "10"], "must be in (0, 1]; got 1.5"),
        (["-q", "0.2", "-T", "-3"], "x>=1"),
        (["-q", "0.2", "-T", "10", "--delta", "2"], "must be in (0, 1); got 2"),
    ]:
        out = CliRunner().invoke(_app(), ["privacy", "epsilon", "-z", "1", *args])
        assert out.exit_code == 2 and msg in out.output, out.output
    out = CliRunner().invoke(_app(), ["privacy", "epsilon", "-z", "-1", "-q", "0.2", "-T", "10"])
    assert out.exit_code == 2 and "--noise" in out.output and "got -1" in out.output


def test_privacy_epsilon_refuses_what_the_accountant_cannot_compute() -> None:
    """Before: -z 1e-300 was a ZeroDivisionError traceback and -z 1e300 an OverflowError one (exit 1), and
    --method pld with -T 10**12 (or a weak guarantee like -z 0.5 -q 1 -T 10**7) asked numpy for 226-299 GB and
    died with an _ArrayMemoryError traceback (z=0.3, q=0.1, T=10**7 grew to 24 GB and was killed). Now usage
    errors (exit 2) that say what to change; the PLD bound is checked with RDP before any PLD work."""
    runner = CliRunner()
    for args, message in (
        (["-z", "1e-300", "-q", "0.01", "-T", "100"], "cannot compute epsilon for noise_multiplier 1e-300"),
        (["-z", "1e300", "-q", "0.01", "-T", "100"], "cannot compute epsilon for noise_multiplier 1e+300"),
        (["-z", "1", "-q", "0.01", "-T", str(10**12), "--method", "pld"], "at most 10,000,000 rounds"),
        (["-z", "0.5", "-q", "1", "-T", str(10**7), "--method", "pld"], "by RDP (vacuous)"),
        (["-z", "0.3", "-q", "0.1", "-T", str(10**6), "--method", "pld"], "use method 'rdp'"),
    ):
        out = runner.invoke(_app(), ["privacy", "epsilon", *args])
        assert out.exit_code == 2 and message in out.output, (args, out.output, out.exception)
    out = runner.invoke(
        _app(), ["privacy", "noise", "-e", "1", "-q", "0.01", "-T", str(10**12), "--method", "pld"]
    )
    assert out.exit_code == 2 and "at most 10,000,000 rounds" in out.output
    # within the bound PLD runs as before, and stays below RDP
    out = runner.invoke(
        _app(), ["privacy", "epsilon", "-z", "1", "-q", "0.01", "-T", "1000", "--method", "pld"]
    )
    pld = float(re.search(r"ε = ([0-9.]+)", out.output).group(1))
    assert out.exit_code == 0 and 0 < pld < epsilon_for(
        noise_multiplier=1, sampling_rate=0.01, steps=1000, delta=1e-5
    )


def _dp_accounting_gaussian(z: float, rounds: int, delta: float, method: str) -> float:
    """ε of ``rounds`` unsampled Gaussian mechanisms of multiplier ``z``, straight from dp-accounting."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if method == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant()
    else:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


def _privacy_json(*args: str) -> dict:
    import json

    out = CliRunner().invoke(_app(), ["privacy", *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def _revealed_rdp_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` rounds of revealed sampling (with probability q a Gaussian of multiplier z the adversary
    knows it faces): the Rényi divergence log((1 − q) + q·e^((α−1)·α/(2z²)))/(α−1), converted by dp-accounting."""
    import numpy as np
    from dp_accounting.rdp import rdp_privacy_accountant

    orders = np.array(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    curve = np.log((1 - q) + q * np.exp((orders - 1) * orders / (2 * z**2))) / (orders - 1)
    return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * curve, delta)[0])


def test_distributed_epsilon_is_what_a_sampled_distributed_dp_run_reports() -> None:
    """A distributed-DP run (DP noise under SecAgg) samples a quarter of 20 devices and reports ε 7.352 after 3
    rounds, for zero-out neighbours: its sampling counted as revealed (it reported q = 1's 9.010 before). The
    planning command gives the run's figure with --distributed, whatever m_min; below q = 1's (dp-accounting's
    3 unsampled Gaussians, RDP and PLD) and above the central amplified 4.42, which does not hold here."""
    from deltaplane.apps.runner import run_federation
    from deltaplane.engine.config import RunConfig

    cfg = RunConfig(
        clients=20,
        sample_fraction=0.25,
        rounds=3,
        local_epochs=1,
        secagg=True,
        clip="1.0",
        dp_noise=1.0,
        dp_delta=1e-5,
        secagg_min_contributors=2,
        secagg_range=20.0,
    )
    reported = run_federation(cfg).rounds[-1]
    schedule = ["-z", "1", "-q", "0.25", "-T", "3", "--delta", "1e-5"]
    doc = _privacy_json("epsilon", *schedule, "--distributed")
    assert doc["epsilon"] == pytest.approx(reported.epsilon, rel=1e-9) and reported.epsilon == pytest.approx(
        7.352, abs=1e-3
    )
    assert doc["epsilon"] == pytest.approx(_revealed_rdp_epsilon(1.0, 0.25, 3, 1e-5), rel=1e-9)
    assert doc["neighbours"] == reported.dp_adjacency == "zero-out"
    assert (doc["sampling_rate"], doc["accounted_sampling_rate"], doc["revealed_sampling"]) == (
        0.25,
        0.25,
        True,
    )
    central = _privacy_json("epsilon", *schedule)  # the default is unchanged: amplified, add/remove
    assert central["epsilon"] == epsilon_for(noise_multiplier=1.0, sampling_rate=0.25, steps=3, delta=1e-5)
    assert central["neighbours"] == "add/remove" and central["epsilon"] == pytest.approx(4.4205, abs=1e-3)
    assert central["revealed_sampling"] is False
    for method in ("rdp", "pld"):
        eps = _privacy_json("epsilon", *schedule, "--distributed", "--method", method)["epsilon"]
        assert central["epsilon"] < eps < _dp_accounting_gaussian(1.0, 3, 1e-5, method), method
    out = CliRunner().invoke(_app(), ["privacy", "epsilon", *schedule, "--distributed"])
    text = " ".join(out.output.split())  # rich wraps the line
    assert "ε = 7.3524" in text and "q = 0.25" in text and "sampling counted as revealed" in text
    assert "zero-out neighbours" in text


def test_distributed_epsilon_does_not_depend_on_m_min() -> None:
    """A published sum carries noise of std ≥ z·C whatever m_min (σ_d = z·C/√m_min), so the run's ε is z's."""
    import torch

    import deltaplane as dp
    from deltaplane.aggregation.dp import DistributedDP

    doc = _privacy_json("epsilon", "-z", "1.5", "-q", "0.1", "-T", "2", "--distributed")
    for m_min in (2, 9):
        acc = dp.PrivacyAccountant(
            noise_multiplier=1.5, sampling_rate=0.1, delta=1e-5, revealed_sampling=True
        )
        agg = DistributedDP(
            clip=1.0, noise_multiplier=1.5, expected_clients=10, min_contributors=m_min, accountant=acc
        )
        for _ in range(2):
            agg.reset()
            agg.expect_sum(10)
            agg.add(dp.Delta({"w": torch.zeros(2)}))
            agg.result()
        assert agg.measurements["epsilon"] == pytest.approx(doc["epsilon"], rel=1e-12), m_min


def test_distributed_noise_is_the_least_z_a_distributed_dp_run_needs() -> None:
    """--distributed plans with the sampling revealed: z 1.726 for ε 8 after 40 rounds at q 0.1 (it planned
    q = 1's 4.033 before); the central z (0.823, amplified by hidden sampling) would leave a distributed run
    above 8."""
    z = _privacy_json("noise", "-e", "8", "-q", "0.1", "-T", "40", "--distributed")
    assert z["neighbours"] == "zero-out" and z["revealed_sampling"] is True
    z = z["noise_multiplier"]
    assert z == pytest.approx(1.726, abs=1e-3)
    assert _revealed_rdp_epsilon(z, 0.1, 40, 1e-5) <= 8.0 + 1e-9
    assert _revealed_rdp_epsilon(z * 0.999, 0.1, 40, 1e-5) > 8.0
    central = _privacy_json("noise", "-e", "8", "-q", "0.1", "-T", "40")["noise_multiplier"]
    assert central < z / 2
    assert _revealed_rdp_epsilon(central, 0.1, 40, 1e-5) > 8.0
