"""`deltaplane run --secagg-authenticated`: authenticated SecAgg rounds from the command line, the YAML key
`secagg: {authenticated: true}` (RunConfig.secagg_authenticated), on every driver, over a --config.

Before the flag existed typer refused it as an unknown option (exit 2), so the tests that pass it failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_run_secagg_neighbours import DRIVERS
from .test_run_secagg_neighbours import _run as _run_cli

TINY = "clients: {count: 4, rounds: 1, local_epochs: 1, lr: 0.1}\n"
AUTH = ["--secagg", "--clip", "2.0", "--secagg-authenticated", "--no-followup"]


def _run(tmp_path: Path, *args: str, config: str = TINY) -> tuple[int, str, Path]:
    """test_run_secagg_neighbours' ``deltaplane run`` helper, on this file's 4-client federation by default."""
    return _run_cli(tmp_path, *args, config=config)


def _configs(plans: list) -> list:
    return [cfg for plan in plans for _, cfg in plan]


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_every_driver_takes_the_flag_before_the_run(no_runs, tmp_path: Path, driver: str) -> None:
    code, output, _ = _run(tmp_path, *AUTH, *DRIVERS[driver])
    assert code == 1 and no_runs, output  # PlanStarted: every check passed
    assert {(c.secagg, c.secagg_authenticated) for c in _configs(no_runs)} == {(True, True)}


def test_the_flag_runs_authenticated_rounds(secagg_servers, tmp_path: Path) -> None:
    code, output, out = _run(
        tmp_path, *AUTH, "--codec", "identity", "--no-baseline", "--engine", "sequential"
    )
    assert code == 0, output
    assert len(secagg_servers) == 1 and secagg_servers[0].authenticated
    assert len(secagg_servers[0].signatures) == 4  # the consistency check ran
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    assert run["config"]["secagg_authenticated"] is True
    assert "authenticated SecAgg" in output  # the summary table's title says so


@pytest.mark.parametrize(
    ("args", "config", "fix"),
    [
        (["--secagg-authenticated"], TINY, "add --secagg (or set secagg.enabled: true in --config)"),
        (["--no-secagg", "--secagg-authenticated"], TINY, "--no-secagg turns SecAgg off"),
    ],
    ids=["no-secagg-flag", "--no-secagg"],
)
def test_the_flag_without_secagg_is_refused(no_runs, tmp_path: Path, args, config, fix) -> None:
    code, output, out = _run(tmp_path, "--clip", "2.0", *args, config=config)
    assert code == 2 and not no_runs and not out.exists()
    assert "--secagg-authenticated authenticates secure aggregation rounds" in output
    assert output.endswith(fix)


def test_the_config_key_and_no_secagg_over_it(no_runs, tmp_path: Path) -> None:
    """`secagg.authenticated` in the file turns it on; `--no-secagg` over that file turns it off with SecAgg
    (it means nothing without it), as it does SecAgg+'s degree; `--no-secagg-authenticated` keeps SecAgg."""
    yaml = TINY + "secagg: {enabled: true, authenticated: true}\nprivacy: {clip: 2.0}\n"
    code, output, _ = _run(tmp_path, config=yaml)
    assert code == 1 and {(c.secagg, c.secagg_authenticated) for c in _configs(no_runs)} == {(True, True)}, (
        output
    )
    for flag, expected in [("--no-secagg", (False, False)), ("--no-secagg-authenticated", (True, False))]:
        no_runs.clear()
        code, output, _ = _run(tmp_path, flag, config=yaml)
        assert code == 1 and {(c.secagg, c.secagg_authenticated) for c in _configs(no_runs)} == {expected}, (
            output
        )


@pytest.mark.slow
def test_the_flag_runs_authenticated_rounds_on_flower(secagg_servers, tmp_path: Path) -> None:
    """`--engine flower` on Ray: run_flower enrolls each virtual node through its node_config, and the
    strategy's SecAgg server runs the consistency check."""
    code, output, out = _run(tmp_path, *AUTH, "--codec", "identity", "--no-baseline", *DRIVERS["flower"])
    assert code == 0, output
    assert [(s.authenticated, len(s.signatures)) for s in secagg_servers] == [(True, 4)]
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    assert run["config"]["secagg_authenticated"] is True and run["config"]["engine"] == "flower"
