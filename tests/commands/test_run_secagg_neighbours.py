"""`deltaplane run --secagg-neighbours K`: SecAgg+'s degree from the command line, with the meaning and the checks
of the YAML key `secagg: {neighbours: K}` (RunConfig.secagg_neighbours), on every driver, over a --config.

Each real run is watched at the SecAgg server (the `secagg_servers` fixture): the unmasked sum does not depend on
the graph, so only the server shows whether the degree reached the round. Before the flag existed, typer refused
`--secagg-neighbours` as an unknown option (exit 2), so every test here failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltaplane import cli
from deltaplane.aggregation.secagg import default_threshold
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError

runner = CliRunner()

#: 8 devices is the smallest round whose devices accept a sparse graph (neighbourhoods of 7 = 2⌈log₂ 8⌉ + 1)
TINY = "clients: {count: 8, rounds: 1, local_epochs: 1, lr: 0.1}\n"
SPARSE = ["--secagg", "--clip", "2.0", "--secagg-neighbours", "6", "--no-followup"]
#: one run of the fp32 codec: one SecAgg server per round to watch
ONE_RUN = ["--codec", "identity", "--no-baseline"]
DRIVERS = {
    "sequential": ["--engine", "sequential"],
    "batched": [],  # deltaplane run's default engine
    "population": ["--engine", "population"],
    "http": ["--transport", "http"],
    "flower": ["--engine", "flower"],
}


def _run(tmp_path: Path, *args: str, config: str = TINY) -> tuple[int, str, Path]:
    """``deltaplane run -c CONFIG ARGS``: its exit code, its output on one line, its --out."""
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text(config)
    r = runner.invoke(cli.app, ["run", "-c", str(path), *args, "-o", str(out)], terminal_width=200)
    output = " ".join(r.output.split())
    if r.exc_info is not None and not isinstance(r.exception, SystemExit):
        import traceback

        output += "\n" + "".join(traceback.format_exception(*r.exc_info))
    return r.exit_code, output, out


def _configs(plans: list) -> list[RunConfig]:
    """The configs of the plans ``deltaplane run`` would have executed (the ``no_runs`` fixture)."""
    return [cfg for plan in plans for _, cfg in plan]


@pytest.mark.parametrize("driver", ["sequential", "batched", "population", "http"])
def test_the_flag_runs_secagg_plus_of_that_degree(secagg_servers, tmp_path: Path, driver: str) -> None:
    code, output, out = _run(tmp_path, *SPARSE, *ONE_RUN, *DRIVERS[driver])
    assert code == 0, output
    # the round ran on SecAgg+'s graph of degree 6 with the neighbourhood's threshold (⌊2·7/3⌋ + 1 = 5; the
    # complete graph's would be 6), each device joined to 6 of the 7 others
    assert [(s.config.num_clients, s.config.neighbours, s.config.threshold) for s in secagg_servers] == [
        (8, 6, default_threshold(7))
    ]
    assert all(len(secagg_servers[0].graph[u]) == 6 for u in range(8))
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    engine = "sequential" if driver == "http" else driver
    assert (run["config"]["secagg_neighbours"], run["config"]["engine"]) == (6, engine)
    assert run["config"]["transport"] == ("http" if driver == "http" else "inproc")
    assert "SecAgg+ degree 6" in output  # the summary table's title names the graph


@pytest.mark.slow
def test_the_flag_runs_secagg_plus_on_flower(secagg_servers, tmp_path: Path) -> None:
    """`--engine flower` on Ray (about 17 s on 2 cores): the strategy's SecAgg server runs the degree."""
    code, output, out = _run(tmp_path, *SPARSE, *ONE_RUN, *DRIVERS["flower"])
    assert code == 0, output
    assert [(s.config.neighbours, s.config.threshold) for s in secagg_servers] == [(6, default_threshold(7))]
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    assert run["config"]["secagg_neighbours"] == 6 and run["config"]["engine"] == "flower"


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_every_driver_accepts_the_degree_before_the_run(no_runs, tmp_path: Path, driver: str) -> None:
    """Every driver's preflight (Flower's included, whose real run is the slow test above) takes the degree, and
    the fp32 baseline keeps it beside the default codec's run (both compared on the same SecAgg+ graph)."""
    code, output, _ = _run(tmp_path, *SPARSE, *DRIVERS[driver])
    assert code == 1 and no_runs, output  # PlanStarted: every check passed
    assert [(c.secagg, c.secagg_neighbours) for c in _configs(no_runs)] == [(True, 6), (True, 6)]


def test_the_flag_overrides_the_config_and_the_config_can_turn_secagg_on(no_runs, tmp_path: Path) -> None:
    """As every flag over --config: the flag's degree wins over the file's; SecAgg may come from the file."""
    yaml = "clients: {count: 16, rounds: 1}\nsecagg: {enabled: true, neighbours: 8}\nprivacy: {clip: 2.0}\n"
    code, output, _ = _run(tmp_path, "--seed", "3", "--secagg-neighbours", "10", config=yaml)
    assert code == 1 and no_runs, output
    assert {(c.secagg, c.secagg_neighbours, c.clients, c.seed) for c in _configs(no_runs)} == {
        (True, 10, 16, 3)
    }
    no_runs.clear()
    code, output, _ = _run(tmp_path, "--seed", "3", config=yaml)  # no flag: the file's degree
    assert code == 1 and {c.secagg_neighbours for c in _configs(no_runs)} == {8}, output


def test_degree_zero_is_the_complete_graph_over_the_config(no_runs, tmp_path: Path) -> None:
    """`--secagg-neighbours 0` takes a config's SecAgg+ degree away (before, there was no way back from a file's
    degree to the complete graph on the command line: 0 was refused as below 2), and SecAgg stays on."""
    yaml = "clients: {count: 16, rounds: 1}\nsecagg: {enabled: true, neighbours: 8}\nprivacy: {clip: 2.0}\n"
    code, output, _ = _run(tmp_path, "--secagg-neighbours", "0", config=yaml)
    assert code == 1 and no_runs, output
    assert {(c.secagg, c.secagg_neighbours) for c in _configs(no_runs)} == {(True, None)}
    no_runs.clear()
    code, output, _ = _run(
        tmp_path, "--secagg-neighbours", "0", config=TINY
    )  # no SecAgg: nothing to take away
    assert code == 1 and {(c.secagg, c.secagg_neighbours) for c in _configs(no_runs)} == {(False, None)}, (
        output
    )


def test_no_secagg_over_a_config_with_a_degree_turns_secagg_plus_off(no_runs, tmp_path: Path) -> None:
    """`--no-secagg` over a file that runs SecAgg+ was refused ('secagg_neighbours ... needs secagg'): the flag
    wins, and the degree goes with SecAgg (it means nothing without it)."""
    code, output, _ = _run(
        tmp_path,
        "--no-secagg",
        config=TINY + "secagg: {enabled: true, neighbours: 6}\nprivacy: {clip: 2.0}\n",
    )
    assert code == 1 and no_runs, output
    assert {(c.secagg, c.secagg_neighbours) for c in _configs(no_runs)} == {(False, None)}


def test_no_secagg_over_distributed_dp_turns_its_floor_off_too(no_runs, tmp_path: Path) -> None:
    """`--no-secagg` over a file that runs distributed DP with an unmasking floor was refused
    ('secagg_min_contributors ... needs secagg and dp_noise'); the floor goes with SecAgg as the degree does, and the
    run is central DP with the file's noise."""
    code, output, _ = _run(
        tmp_path,
        "--no-secagg",
        config=TINY + "secagg: {enabled: true, min_contributors: 4}\nprivacy: {clip: 2.0, noise: 0.8}\n",
    )
    assert code == 1 and no_runs, output
    assert {(c.secagg, c.secagg_min_contributors, c.dp_noise) for c in _configs(no_runs)} == {
        (False, None, 0.8)
    }


@pytest.mark.parametrize(
    ("args", "config", "fix"),
    [
        (["--secagg-neighbours", "6"], TINY, "add --secagg (or set secagg.enabled: true in --config)"),
        (["--no-secagg", "--secagg-neighbours", "6"], TINY, "--no-secagg turns SecAgg off"),
        (
            ["--no-secagg", "--secagg-neighbours", "6"],
            TINY + "secagg: {enabled: true}\nprivacy: {clip: 2.0}\n",
            "--no-secagg turns SecAgg off",
        ),
    ],
    ids=["no-secagg-flag", "--no-secagg", "--no-secagg-over-config"],
)
def test_the_flag_without_secagg_is_refused(no_runs, tmp_path: Path, args, config, fix) -> None:
    code, output, out = _run(tmp_path, "--clip", "2.0", *args, config=config)
    assert code == 2 and not no_runs and not out.exists()
    assert (
        "--secagg-neighbours 6 is SecAgg+'s degree (how many devices each one masks with); it needs "
        in output
    )
    assert output.endswith(fix)


@pytest.mark.parametrize(
    ("clients", "degree", "says"),
    [
        (8, 5, "must be even"),
        (8, 8, "a round of the 8 clients this run expects gives each device at most 7"),
        (20, 8, "devices refuse fewer than 11"),
        (6, 4, "a round of 6 admits only the complete graph"),
        (8, -2, "greater than or equal to 2"),
    ],
)
def test_a_bad_degree_gets_the_config_layers_error(no_runs, tmp_path: Path, clients, degree, says) -> None:
    with pytest.raises(ConfigError) as expected:
        RunConfig(clients=clients, secagg=True, clip="2.0", secagg_neighbours=degree)
    message = " ".join(str(expected.value).removeprefix("invalid RunConfig: ").split())
    assert says in message
    args = ["--secagg", "--clip", "2.0", "--clients", str(clients), "--secagg-neighbours", str(degree)]
    code, output, out = _run(tmp_path, *args)
    assert code == 2 and not no_runs and not out.exists(), output
    assert output.endswith(message), output
