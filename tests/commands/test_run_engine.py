"""`deltaplane run`'s engine: batched unless `--engine` or the config names one, or the run cannot be batched."""

from __future__ import annotations

import json
import re
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


def _planned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> list[tuple[str, str]]:
    """(run name, personalization) of each run `deltaplane run ARGS` plans; nothing is trained."""
    plans: list[list[tuple[str, RunConfig]]] = []

    def stop(stage: Path, out: Path, plan: list[tuple[str, RunConfig]], cfg: RunConfig, **kw: object) -> None:
        plans.append(plan)
        raise cli.ConfigError("planned")

    monkeypatch.setattr(cli, "_run_into", stop)
    result = runner.invoke(
        app, ["run", "--clients", "3", "--rounds", "2", *args, "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "planned" in result.output, result.output
    return [(name, c.personalization) for name, c in plans[0]]


def test_the_compressed_run_personalizes_with_alpha_mix_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow-up reports and merges the run's own personal models: by default the compressed digits run
    personalizes in every round (α-mix), the fp32 baseline does not; --personalization or the config wins, for
    both runs; another task keeps none."""
    assert cli.DEFAULT_RUN_PERSONALIZATION == "alpha_mix"
    assert _planned(monkeypatch, tmp_path) == [("baseline", "none"), ("compressed", "alpha_mix")]
    assert _planned(monkeypatch, tmp_path, "--personalization", "none") == [
        ("baseline", "none"),
        ("compressed", "none"),
    ]
    assert _planned(monkeypatch, tmp_path, "--personalization", "ditto") == [
        ("baseline", "ditto"),
        ("compressed", "ditto"),
    ]
    (tmp_path / "run.yaml").write_text("personalization: {method: none}\n")
    assert _planned(monkeypatch, tmp_path, "--config", str(tmp_path / "run.yaml"), "--no-baseline") == [
        ("compressed", "none")
    ]
    assert _planned(monkeypatch, tmp_path, "--codec", "identity") == [
        ("baseline", "alpha_mix")
    ]  # the only run
    assert cli._default_personalization(RunConfig(task="charlm")).personalization == "none"
    assert cli._default_personalization(RunConfig(engine="population")).personalization == "none"
    boxed = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", boxed).split())
    assert "'alpha_mix' for the compressed digits run" in help_text
