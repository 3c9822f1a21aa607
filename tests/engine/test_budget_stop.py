"""A privacy-budget stop is the same on every driver: the rounds done so far are the run (metrics, model, the
reason), and ``deltaplane run`` writes the partial report and model, then exits 3."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.engine import RunConfig
from deltaplane.errors import PrivacyBudgetExceeded
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import run_simulation

DP = RunConfig(
    clients=4,
    rounds=3,
    local_epochs=1,
    lr=0.1,
    dp_noise=1.0,
    clip="1.0",
    dp_delta=1e-3,
    dp_noise_source="seeded",  # the drivers are compared bit for bit
)


@pytest.fixture(scope="module")
def budget() -> tuple[float, list]:
    """A budget with room for two rounds, not three, and the sequential driver's run under it."""
    eps = [r.epsilon for r in run_simulation(DP).rounds]
    return (eps[1] + eps[2]) / 2, eps


@pytest.mark.parametrize("driver", ["sequential", "batched", "batched-2", "population", "http"])
def test_every_driver_stops_at_the_budget_and_keeps_its_rounds(driver, budget) -> None:
    """``batched-2``: a forked worker trains a share and scores the previous round, whose metrics are
    reported only after the next round closes; the round the budget stops must not swallow them."""
    limit, eps = budget
    cfg = DP.replace(epsilon_budget=limit)
    reference = run_simulation(cfg)
    if driver == "http":
        res = run_http_simulation(cfg)
    elif driver == "batched-2":
        res = run_simulation(cfg.replace(engine="batched", threads=2))
    else:
        res = run_simulation(cfg.replace(engine=driver))
    assert len(res.rounds) == 2 and [r.epsilon for r in res.rounds] == pytest.approx(eps[:2], rel=1e-12)
    assert [r.round for r in res.rounds] == [1, 2] and all(0 <= r.test_accuracy <= 1 for r in res.rounds)
    assert res.stopped is not None and "privacy budget exhausted at round 3" in res.stopped
    assert res.to_dict()["stopped"] == res.stopped
    if driver in ("sequential", "http"):  # the same arithmetic: the released model is the reference's
        assert all(torch.equal(res.final_state[k], v) for k, v in reference.final_state.items())


@pytest.mark.parametrize("driver", ["population", "http"])
def test_not_even_one_round_fits_raises_on_every_driver(driver, budget) -> None:
    cfg = DP.replace(epsilon_budget=budget[1][0] / 2)
    with pytest.raises(PrivacyBudgetExceeded, match="round 1"):
        run_http_simulation(cfg) if driver == "http" else run_simulation(cfg.replace(engine=driver))


def test_cli_writes_the_partial_report_and_model_then_exits_3(tmp_path, budget) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("clients: 4\nrounds: 3\nlocal_epochs: 1\nlr: 0.1\ndp_delta: 0.001\n")
    out = tmp_path / "out"
    args = ["run", "-c", str(config), "--transport", "http", "--dp-noise", "1.0", "--clip", "1.0"]
    args += ["--epsilon-budget", str(budget[0]), "--no-baseline", "--no-followup", "--codec", "identity"]
    r = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 3, r.output
    assert "privacy budget exhausted at round 3" in r.output
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    assert len(run["rounds"]) == 2 and "round 3" in run["stopped"]
    assert (out / "model.safetensors").exists() and (out / "report.html").exists()
