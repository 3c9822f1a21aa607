"""`deltaplane run`'s engine: batched unless `--engine` or the config names one, or the run cannot be batched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltaplane import cli
from deltaplane.cli import DEFAULT_RUN_ENGINE, app
from deltaplane.engine.config import RunConfig

runner = CliRunner()
SMALL = ["--clients", "4", "--rounds", "2", "--no-baseline", "--no-followup"]


def _run(out: Path, *args: str) -> tuple[dict, str]:
    """The compressed run's report entry and the command's output (stdout and stderr)."""
    result = runner.invoke(app, ["run", *SMALL, *args, "--out", str(out)], terminal_width=220)
    assert result.exit_code == 0, result.output
    (comp,) = json.loads((out / "report.json").read_text())["runs"]
    return comp, result.output


def test_the_default_run_federates_on_the_batched_engine(tmp_path: Path, one_thread: None) -> None:
    comp, output = _run(tmp_path / "run")
    assert DEFAULT_RUN_ENGINE == "batched"
    assert comp["config"]["engine"] == "batched"
    assert "falls back" not in output
    # the very run the library gives on the batched engine (its own run of the same config): the same bytes
    # each round and the same final model, bit for bit
    from deltaplane.sim import run_simulation

    ref = run_simulation(RunConfig.from_mapping(comp["config"]))
    assert [r["uplink_bytes"] for r in comp["rounds"]] == [r.uplink_bytes for r in ref.rounds]
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert saved.keys() == ref.final_state.keys()
    assert all(torch.equal(saved[k], ref.final_state[k]) for k in saved)


@pytest.mark.parametrize(
    ("args", "yaml", "engine"),
    [
        (["--engine", "sequential"], None, "sequential"),
        (["--engine", "inprocess"], None, "sequential"),  # the older name of sequential
        ([], "engine: sequential\n", "sequential"),
        ([], "engine:\n  name: sequential\n", "sequential"),
        (["--engine", "batched"], "engine: sequential\n", "batched"),  # the flag wins over the config
        (["--engine", "sequential"], "engine: batched\n", "sequential"),
        ([], "engine:\n  threads: 1\n", "batched"),  # an engine section without a name: the default
    ],
)
def test_an_engine_the_user_names_is_kept(
    tmp_path: Path, args: list[str], yaml: str | None, engine: str
) -> None:
    if yaml is not None:
        (tmp_path / "run.yaml").write_text(yaml)
        args = [*args, "--config", str(tmp_path / "run.yaml")]
    comp, _ = _run(tmp_path / "run", *args)
    assert comp["config"]["engine"] == engine


def test_a_run_the_batched_engine_would_not_stack_defaults_to_sequential(tmp_path: Path) -> None:
    # FedPer's devices train from their own head: batched would fall back with a warning nobody asked for
    comp, output = _run(tmp_path / "run", "--personalization", "fedper")
    assert comp["config"]["engine"] == "sequential"
    assert "falls back" not in output
    # over HTTP every device trains on its own: sequential is the engine that transport runs
    assert cli._default_engine(RunConfig(transport="http")).engine == "sequential"
    # α-mix and Ditto adapt after the round: batched
    assert cli._default_engine(RunConfig(personalization="ditto")).engine == "batched"
