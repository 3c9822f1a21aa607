"""`deltaplane run` refuses a federation whose devices cannot be built before anything runs, at the size asked
for: docs/byo.md's `--engine batched` and `--transport http` commands, at their default 20 devices, failed in a
newcomer's hands (456 samples cannot give 20 label-skewed devices 20 samples each) while the docs' tests, which
set DELTAPLANE_SMALL=1 (4 devices), passed."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import PlanStarted
from typer.testing import CliRunner

from deltaplane import cli


@pytest.mark.parametrize("small", ["1", "0"])
def test_devices_that_cannot_be_built_are_refused_before_the_run_even_small(
    byo_task, no_runs, monkeypatch, tmp_path: Path, small: str
) -> None:
    monkeypatch.setenv("DELTAPLANE_SMALL", small)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli.app, ["run", "--task", byo_task, "--engine", "batched", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "cannot partition 456 training samples across 20 devices" in r.output
    assert "--clients" in r.output and "--alpha" in r.output
    assert not no_runs and not out.exists()


def test_a_guide_command_that_fits_runs_small(byo_task, no_runs, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAPLANE_SMALL", "1")
    args = ["run", "--task", byo_task, "--clients", "5", "--alpha", "2.0", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(cli.app, args)
    assert isinstance(r.exception, PlanStarted), r.output
    (plan,) = no_runs
    assert [(name, c.clients, c.alpha) for name, c in plan] == [("baseline", 4, 2.0), ("compressed", 4, 2.0)]


def test_small_runs_keep_the_devices_a_task_brings(no_runs, monkeypatch, tmp_path: Path) -> None:
    """`DELTAPLANE_SMALL=1 deltaplane run --task charlm` capped its 20 natural devices to 4, then failed with
    'task charlm brings its own 20 devices; set clients to 20'."""
    monkeypatch.setenv("DELTAPLANE_SMALL", "1")
    args = ["run", "--task", "charlm", "--task-option", "devices=6", "--task-option", "per_device=20"]
    r = CliRunner().invoke(cli.app, [*args, "--clients", "6", "-o", str(tmp_path / "o")])
    assert isinstance(r.exception, PlanStarted), r.output
    assert [(c.clients, c.rounds) for _, c in no_runs[0]] == [(6, 2), (6, 2)]


@pytest.mark.parametrize(
    ("options", "devices"),
    [(["--attack", "sign_flip:0.1"], 6), (["--defense", "krum"], 5), (["--codec", "identity"], 4)],
)
def test_small_runs_keep_enough_devices_for_their_options(
    no_runs, monkeypatch, tmp_path, options, devices
) -> None:
    """docs/aggregation.md's `deltaplane run --secagg --attack sign_flip:0.1 ...` failed under DELTAPLANE_SMALL:
    0.1 of the 4 small devices rounds to no attacker, which the run config refuses. Small mode now keeps the
    fewest devices at which the options hold (0.1 · 6 rounds to one attacker; Krum needs n > 4)."""
    monkeypatch.setenv("DELTAPLANE_SMALL", "1")
    r = CliRunner().invoke(cli.app, ["run", *options, "-o", str(tmp_path / "o")])
    assert isinstance(r.exception, PlanStarted), r.output
    assert {c.clients for _, c in no_runs[0]} == {devices}


@pytest.mark.parametrize(
    "driver", [[], ["--engine", "batched"], ["--transport", "http"], ["--engine", "flower"]]
)
def test_devices_a_weighted_ring_cannot_carry_are_refused_before_the_run(
    no_runs, tmp_path: Path, driver
) -> None:
    """8 devices of the digits task hold ~180 examples each (1,437 training samples); a weighted SecAgg ring of 6-bit
    codes carries counts up to 63 (a 6-bit slot, by hand). In process the run failed in round 1 at the first
    device's encoding, over HTTP every device sat every round out: refused now, before anything runs."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("clients: {count: 8, rounds: 1}\nsecagg: {enabled: true, bits: 6}\nprivacy: {clip: 1.0}\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli.app, ["run", "-c", str(cfg), *driver, "--no-baseline", "-o", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "carries example counts up to 63 (2^6 - 1)" in text, r.output
    assert "secagg.bits (--config) to 8 or more" in text and not no_runs and not out.exists()
    cfg.write_text("clients: {count: 8, rounds: 1}\nsecagg: {enabled: true, bits: 8}\nprivacy: {clip: 1.0}\n")
    r = CliRunner().invoke(cli.app, ["run", "-c", str(cfg), *driver, "--no-baseline", "-o", str(out)])
    assert isinstance(r.exception, PlanStarted), r.output  # 8 bits carry up to 255: past every check


def test_the_population_driver_refuses_a_ring_narrower_than_its_devices_may_hold(
    no_runs, tmp_path: Path
) -> None:
    """The population driver draws its devices lazily, so the preflight did not check them: a 6-bit weighted
    ring (counts up to 63) passed and the run failed at the first encoding of a device holding more. It now
    checks the most a synthesized device may hold (MAX_DEVICE_SAMPLES), which real draws reach past 63."""
    from deltaplane.engine import RunConfig, make_task
    from deltaplane.sim.population import MAX_DEVICE_SAMPLES, ClientPopulation

    config = RunConfig(clients=200)
    population = ClientPopulation(config, make_task(config).train, size=200)
    held = [population.client(i).num_samples for i in range(200)]
    assert 63 < max(held) <= MAX_DEVICE_SAMPLES == 100, max(held)
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    for bits, refused in ((6, True), (7, False)):  # 7 bits carry 127
        cfg.write_text(
            f"clients: {{count: 8, rounds: 1}}\nsecagg: {{enabled: true, bits: {bits}}}\nprivacy: {{clip: 1.0}}\n"
        )
        r = CliRunner().invoke(
            cli.app, ["run", "-c", str(cfg), "--engine", "population", "--no-baseline", "-o", str(out)]
        )
        text = " ".join(r.output.split())
        if refused:
            assert r.exit_code == 2 and not no_runs and not out.exists(), r.output
            assert "a device may hold up to 100 examples" in text and "(2^6 - 1)" in text, text
            assert "secagg.bits (--config) to 7 or more" in text
        else:
            assert isinstance(r.exception, PlanStarted), r.output
